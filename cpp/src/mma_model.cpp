// CPU model of mma.sp m16n8k32 and ldmatrix .x4, and CPU emulations of the SpMM kernels.
//
// The model's own reading of the registers follows the PTX ISA text (see sp_layout.h, section 1):
// A and B by the fragment formulas a_elem / b_elem, C/D by c_elem, and the metadata register
// decoded here literally ("lane (g, t) with t - 2 * selector = h holds rows g (bits 15:0) and
// g + 8 (bits 31:16), chunks 4h .. 4h+3, chunk j in nibble j"), not through the packer's
// meta_lane / meta_shift helpers, so a slip in those shows up as a mismatch.
// The decode emulation here mirrors cuda/src/decode.cuh step by step (the tiled one,
// tiled_model.cpp, mirrors cuda/src/tiled.cuh): the same copy slots, shared-memory offsets,
// ldmatrix addresses and epilogue mapping (all from sp_layout.h).
#include "vnm/mma_model.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "vnm/format.h"

namespace vnm::sp {
namespace {

float half_bits_to_float(DType t, uint16_t bits) {
  return t == DType::bf16 ? bf16_to_float(bits) : half_to_float(bits);
}

uint16_t float_to_bits16(DType t, float v) {
  return t == DType::bf16 ? float_to_bf16(v) : float_to_half(v);
}

uint16_t lo16(uint32_t w) { return uint16_t(w & 0xFFFFu); }
uint16_t hi16(uint32_t w) { return uint16_t(w >> 16); }
uint32_t pack16(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

}  // namespace

std::string mma_sp_m16n8k32(DType t, const uint32_t a[kWarp][4], const uint32_t b[kWarp][4],
                            const uint32_t e[kWarp], int selector, float acc[kWarp][4]) {
  // Metadata nibbles [row][chunk], decoded from the supplying lanes (PTX figure, literally).
  uint32_t nib[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    const int g = lane >> 2, t_in = lane & 3;
    const int h = t_in - 2 * selector;
    if (h < 0 || h > 1) continue;  // this lane's e is ignored
    for (int upper = 0; upper < 2; ++upper)
      for (int j = 0; j < 4; ++j)
        nib[g + 8 * upper][4 * h + j] = (e[lane] >> (16 * upper + 4 * j)) & 0xFu;
  }
  // Dense A (16 x 32) from the compressed fragment and the metadata.
  float A[16][32] = {};
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const AElem el = a_elem(lane, i);
      const uint32_t n = nib[el.row][el.chunk];
      const int idx0 = int(n & 3), idx1 = int(n >> 2);
      if (idx0 >= idx1) {
        std::ostringstream os;
        os << "invalid mma.sp metadata nibble 0x" << std::hex << n << std::dec << " for row "
           << el.row << ", chunk " << el.chunk
           << " (::ordered_metadata needs two ascending positions)";
        return os.str();
      }
      const uint16_t bits = (i & 1) ? hi16(a[lane][i >> 1]) : lo16(a[lane][i >> 1]);
      A[el.row][4 * el.chunk + (el.slot ? idx1 : idx0)] = half_bits_to_float(t, bits);
    }
  }
  float B[32][8] = {};
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const BElem el = b_elem(lane, i);
      const uint16_t bits = (i & 1) ? hi16(b[lane][i >> 1]) : lo16(b[lane][i >> 1]);
      B[el.k][el.n] = half_bits_to_float(t, bits);
    }
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const CElem el = c_elem(lane, i);
      float sum = 0.0f;
      for (int k = 0; k < 32; ++k) sum += A[el.row][k] * B[k][el.n];
      acc[lane][i] += sum;
    }
  }
  return {};
}

void ldmatrix_x4(const uint16_t* smem, const int row_offset[kWarp], uint32_t out[kWarp][4]) {
  // Lane l receives, for each matrix m, row (l >> 2), columns 2 (l & 3) and 2 (l & 3) + 1; the
  // address of row r of matrix m came from lane 8 m + r.
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int m = 0; m < 4; ++m) {
      const int base = row_offset[8 * m + (lane >> 2)] + 2 * (lane & 3);
      out[lane][m] = pack16(smem[base], smem[base + 1]);
    }
  }
}

void ldmatrix_x4_trans(const uint16_t* smem, const int row_offset[kWarp], uint32_t out[kWarp][4]) {
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int m = 0; m < 4; ++m) {
      const int col = lane >> 2, row = 2 * (lane & 3);
      out[lane][m] = pack16(smem[row_offset[8 * m + row] + col], smem[row_offset[8 * m + row + 1] + col]);
    }
  }
}

namespace {

struct Problem {
  const PackedGeom& p;
  DType t;
  const uint16_t* values_p;
  const uint32_t* meta_p;
  const int32_t* kidx;
  const int32_t* out_rows;
  const uint16_t* x;
  int64_t n_tokens, ldx;
  const uint16_t* bias;
  uint16_t* y;
  int64_t ldy;
};

uint16_t x_at(const Problem& q, int64_t tok, int64_t col) {
  return q.x[tok * q.ldx + col];
}

// Bias of stored row r, read at its output row as the kernels do.
float bias_at(const Problem& q, int64_t r) {
  return (q.bias && r < q.p.R) ? half_bits_to_float(q.t, q.bias[out_row(q.out_rows, r)]) : 0.0f;
}

// ---- decode kernel (cuda/src/decode.cuh) -------------------------------------------------------

std::string emulate_decode(const Problem& q, int64_t decode_splits) {
  const PackedGeom& p = q.p;
  const DecodePlan d = decode_plan(p, q.n_tokens, decode_splits);
  const int64_t N = q.n_tokens, R = p.R, KS = p.KS;
  constexpr int KPS = kDecodeStepsPerStage, STAGES = kDecodeStages;
  std::vector<float> ws(size_t(d.workspace_floats(N, R)));
  // The CTA's dynamic shared memory, addressed only through the decode_*_byte functions the
  // kernel uses, poisoned before every CTA: a slot read before it was written holds 0xFF bytes
  // (an invalid metadata nibble, a NaN A or B) and fails the comparison or the model.
  std::vector<unsigned char> smem(size_t(d.smem_bytes()));
  auto word = [&](int64_t byte) -> uint32_t& { return *reinterpret_cast<uint32_t*>(smem.data() + byte); };
  auto fword = [&](int64_t byte) -> float& { return *reinterpret_cast<float*>(smem.data() + byte); };
  std::vector<float> acc(size_t(kDecodeWarps) * d.nt * kWarp * 4);
  auto acc_at = [&](int warp, int j) {
    return reinterpret_cast<float(*)[4]>(acc.data() + (size_t(warp) * d.nt + j) * kWarp * 4);
  };
  for (int64_t cx = 0; cx < d.row_ctas; ++cx)
    for (int64_t cy = 0; cy < d.splits; ++cy)
      for (int64_t cz = 0; cz < d.token_ctas; ++cz) {
        std::fill(smem.begin(), smem.end(), 0xFF);
        const int64_t mt0 = cx * d.wt, ks_cta0 = cy * d.ks_cta, tok0 = cz * d.nt * kTileTokens;
        // Per warp: row tile, k-range, valid k-steps (past KS or past the last tile: none).
        int64_t n_valid[kDecodeWarps], ks_w0[kDecodeWarps];
        for (int warp = 0; warp < kDecodeWarps; ++warp) {
          const int tile = warp % d.wt, part = warp / d.wt;
          ks_w0[warp] = ks_cta0 + part * d.ks_warp;
          n_valid[warp] = mt0 + tile < p.MT ? std::max<int64_t>(std::min(d.ks_warp, KS - ks_w0[warp]), 0) : 0;
        }
        // Pipeline stage g of every warp into slot g % STAGES: its valid k-steps only.
        auto issue = [&](int64_t g) {
          for (int warp = 0; warp < kDecodeWarps; ++warp) {
            const int64_t mt = mt0 + warp % d.wt;
            for (int s = 0; s < KPS; ++s) {
              const int64_t i = g * KPS + s;
              if (i >= n_valid[warp]) continue;
              const int64_t ks = ks_w0[warp] + i;
              for (int lane = 0; lane < kWarp; ++lane) {
                const uint16_t* src = q.values_p + packed_value_index(p, mt, ks, lane, 0);
                for (int r = 0; r < 4; ++r)
                  word(decode_a_byte(int(g % STAGES), warp, s, lane) + 4 * r) = pack16(src[2 * r], src[2 * r + 1]);
                word(decode_meta_byte(int(g % STAGES), warp, s, lane)) =
                    q.meta_p[packed_meta_index(p, mt, ks, meta_word_of_lane(lane))];
              }
            }
          }
        };
        for (int64_t g = 0; g < STAGES - 1; ++g) issue(g);
        // The gather, thread by thread: B-fragment words of every local k-step and token tile.
        const int32_t* kcta = q.kidx + kidx_step_index(p, p.kidx_block(mt0 * kTileRows), ks_cta0);
        const int64_t kl_end = std::max<int64_t>(0, std::min(d.ks_cta, KS - ks_cta0));
        for (int tid = 0; tid < kDecodeThreads; ++tid) {
          const int b_lane = tid >> 2, r = tid & 3;
          const BElem e0 = b_elem(b_lane, 2 * r);
          for (int64_t kl = 0; kl < d.ks_cta; ++kl)
            for (int j = 0; j < d.nt; ++j) {
              const int64_t tok = tok0 + j * kTileTokens + e0.n;
              uint16_t half[2] = {0, 0};
              for (int h = 0; h < 2; ++h) {
                const int32_t col = kl < kl_end ? kcta[kl * kStepK + e0.k + h] : -1;
                if (tok < N && col >= 0) half[h] = x_at(q, tok, col);
              }
              word(decode_b_byte(d.nt, int(kl), j, b_lane, r)) = pack16(half[0], half[1]);
            }
        }
        // Main loop in lockstep: stage g of every warp, after stage g + STAGES - 1 went out.
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int64_t stages = (*std::max_element(n_valid, n_valid + kDecodeWarps) + KPS - 1) / KPS;
        for (int64_t g = 0; g < stages; ++g) {
          issue(g + STAGES - 1);
          for (int warp = 0; warp < kDecodeWarps; ++warp) {
            const int part = warp / d.wt;
            for (int s = 0; s < KPS; ++s) {
              const int64_t i = g * KPS + s;
              if (i >= n_valid[warp]) continue;
              const int64_t kl = part * d.ks_warp + i;
              uint32_t a[kWarp][4], e[kWarp], b[kWarp][4];
              for (int lane = 0; lane < kWarp; ++lane) {
                for (int r = 0; r < 4; ++r) a[lane][r] = word(decode_a_byte(int(g % STAGES), warp, s, lane) + 4 * r);
                e[lane] = word(decode_meta_byte(int(g % STAGES), warp, s, lane));
              }
              for (int j = 0; j < d.nt; ++j) {
                for (int lane = 0; lane < kWarp; ++lane)
                  for (int r = 0; r < 4; ++r) b[lane][r] = word(decode_b_byte(d.nt, int(kl), j, lane, r));
                std::string err = mma_sp_m16n8k32(q.t, a, b, e, 0, acc_at(warp, j));
                if (!err.empty()) return err;
              }
            }
          }
        }
        // Reduction along k through shared memory (parts 1.. write, part 0 adds in part order),
        // then the store or the partials.
        for (int warp = d.wt; warp < kDecodeWarps; ++warp)
          for (int j = 0; j < d.nt; ++j)
            for (int lane = 0; lane < kWarp; ++lane)
              for (int c = 0; c < 4; ++c)
                fword(decode_red_byte(d.wt, d.nt, warp / d.wt, warp % d.wt, j, c, lane)) = acc_at(warp, j)[lane][c];
        for (int tile = 0; tile < d.wt; ++tile) {
          for (int part = 1; part < d.kparts; ++part)
            for (int j = 0; j < d.nt; ++j)
              for (int lane = 0; lane < kWarp; ++lane)
                for (int c = 0; c < 4; ++c)
                  acc_at(tile, j)[lane][c] += fword(decode_red_byte(d.wt, d.nt, part, tile, j, c, lane));
          for (int j = 0; j < d.nt; ++j)
            for (int lane = 0; lane < kWarp; ++lane)
              for (int c = 0; c < 4; ++c) {
                const CElem el = c_elem(lane, c);
                const int64_t r = (mt0 + tile) * kTileRows + el.row;
                const int64_t tok = tok0 + j * kTileTokens + el.n;
                if (r >= R || tok >= N) continue;
                const float v = acc_at(tile, j)[lane][c];
                if (d.splits > 1)
                  ws[size_t((cy * N + tok) * R + r)] = v;
                else
                  q.y[tok * q.ldy + out_row(q.out_rows, r)] = float_to_bits16(q.t, v + bias_at(q, r));
              }
        }
      }
  if (d.splits > 1) {  // decode_reduce_kernel: split order, then bias, one rounding
    const int64_t total = N * R;
    for (int64_t i = 0; i < total; ++i) {
      float v = ws[size_t(i)];
      for (int64_t s = 1; s < d.splits; ++s) v += ws[size_t(s * total + i)];
      const int64_t tok = i / R, r = i % R;
      q.y[tok * q.ldy + out_row(q.out_rows, r)] = float_to_bits16(q.t, v + bias_at(q, r));
    }
  }
  return {};
}

// The tiled kernel is emulated in tiled_model.cpp (emulate_tiled).

}  // namespace

std::string emulate_spmm(const PackedGeom& p, DType t, const uint16_t* values_p,
                         const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                         const void* x, int64_t n_tokens, int64_t ldx, const void* bias, void* y,
                         int64_t ldy, Path path, bool contiguous_b, int64_t decode_splits) {
  if (t == DType::f32) return "the mma.sp kernels take float16 or bfloat16, not float32";
  if (contiguous_b && (!p.keeps_every_column() || p.K % 8 != 0))
    return "the gather-free B path needs M == 4 and K % 8 == 0 (use contiguous_b=false)";
  const Problem q{p, t, values_p, meta_p, kidx, out_rows, static_cast<const uint16_t*>(x), n_tokens, ldx,
                  static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), ldy};
  if (n_tokens <= 0) return {};
  if (path == Path::automatic) path = choose_path(p, n_tokens);
  // The decode kernel has one B path (gathered once into shared memory): contiguous_b is moot.
  if (path == Path::decode) return emulate_decode(q, decode_splits);
  return emulate_tiled(p, t, values_p, meta_p, kidx, out_rows, q.x, n_tokens, ldx, q.bias, q.y,
                       ldy, contiguous_b);
}

}  // namespace vnm::sp
