// CPU model of mma.sp m16n8k32 and ldmatrix .x4, and CPU emulations of the SpMM kernels.
//
// The model's own reading of the registers follows the PTX ISA text (see sp_layout.h, section 1):
// A and B by the fragment formulas a_elem / b_elem, C/D by c_elem, and the metadata register
// decoded here literally ("lane (g, t) with t - 2 * selector = h holds rows g (bits 15:0) and
// g + 8 (bits 31:16), chunks 4h .. 4h+3, chunk j in nibble j"), not through the packer's
// meta_lane / meta_shift helpers, so a slip in those shows up as a mismatch.
// The emulations mirror cuda/src/spmm_kernels.cuh step by step: the same copy slots, B staging
// slots, shared-memory offsets, ldmatrix addresses and epilogue mapping (all from sp_layout.h).
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

// The gathered B element of token `tok` at k-step entry `kk` (kernel: gather path).
uint16_t gather_b(const Problem& q, const int32_t* step, int64_t tok, int k) {
  const int32_t col = step[k];
  return (tok < q.n_tokens && col >= 0) ? x_at(q, tok, col) : uint16_t(0);
}

// The B element without a gather (M == 4, no perm): x column 32 ks + k.
uint16_t contig_b(const Problem& q, int64_t ks, int64_t tok, int k) {
  const int64_t col = ks * kStepK + k;
  return (tok < q.n_tokens && col < q.p.K) ? x_at(q, tok, col) : uint16_t(0);
}

// Bias of stored row r, read at its output row as the kernels do.
float bias_at(const Problem& q, int64_t r) {
  return (q.bias && r < q.p.R) ? half_bits_to_float(q.t, q.bias[out_row(q.out_rows, r)]) : 0.0f;
}

// ---- decode kernel -------------------------------------------------------------------------

std::string emulate_decode(const Problem& q, bool contiguous_b) {
  const PackedGeom& p = q.p;
  const int64_t ctas_n = ceil_div(q.n_tokens, kDecodeTiles * kTileTokens);
  for (int64_t mt = 0; mt < p.MT; ++mt) {
    for (int64_t cy = 0; cy < ctas_n; ++cy) {
      const int64_t tok0 = cy * kDecodeTiles * kTileTokens;
      const int tiles = int(std::min<int64_t>(kDecodeTiles, ceil_div(q.n_tokens - tok0, kTileTokens)));
      const int32_t* kbase = q.kidx + kidx_step_index(p, p.kidx_block(mt * kTileRows), 0);
      std::vector<float> red(size_t(kDecodeWarps) * kDecodeTiles * kWarp * 4);
      for (int w = 0; w < kDecodeWarps; ++w) {
        float acc[kDecodeTiles][kWarp][4] = {};
        for (int64_t ks = w; ks < p.KS; ks += kDecodeWarps) {
          uint32_t a[kWarp][4], e[kWarp];
          for (int lane = 0; lane < kWarp; ++lane) {
            const uint16_t* src = q.values_p + packed_value_index(p, mt, ks, lane, 0);
            for (int r = 0; r < 4; ++r) a[lane][r] = pack16(src[2 * r], src[2 * r + 1]);
            e[lane] = q.meta_p[packed_meta_index(p, mt, ks, meta_word_of_lane(lane))];
          }
          const int32_t* step = kbase + ks * kStepK;
          for (int j = 0; j < tiles; ++j) {
            uint32_t b[kWarp][4];
            for (int lane = 0; lane < kWarp; ++lane) {
              for (int r = 0; r < 4; ++r) {
                const BElem e0 = b_elem(lane, 2 * r), e1 = b_elem(lane, 2 * r + 1);
                const int64_t tok = tok0 + kTileTokens * j + e0.n;
                const uint16_t lo = contiguous_b ? contig_b(q, ks, tok, e0.k) : gather_b(q, step, tok, e0.k);
                const uint16_t hi = contiguous_b ? contig_b(q, ks, tok, e1.k) : gather_b(q, step, tok, e1.k);
                b[lane][r] = pack16(lo, hi);
              }
            }
            std::string err = mma_sp_m16n8k32(q.t, a, b, e, 0, acc[j]);
            if (!err.empty()) return err;
          }
        }
        std::memcpy(red.data() + size_t(w) * kDecodeTiles * kWarp * 4, acc, sizeof(acc));
      }
      // Cross-warp reduction in warp order, then bias, rounding and the store.
      for (int j = 0; j < tiles; ++j) {
        for (int lane = 0; lane < kWarp; ++lane) {
          for (int i = 0; i < 4; ++i) {
            float v = 0.0f;
            for (int w = 0; w < kDecodeWarps; ++w)
              v += red[((size_t(w) * kDecodeTiles + j) * kWarp + lane) * 4 + i];
            const CElem el = c_elem(lane, i);
            const int64_t r = mt * kTileRows + el.row;
            const int64_t tok = tok0 + kTileTokens * j + el.n;
            if (r < p.R && tok < q.n_tokens)
              q.y[tok * q.ldy + out_row(q.out_rows, r)] = float_to_bits16(q.t, v + bias_at(q, r));
          }
        }
      }
    }
  }
  return {};
}

// ---- tiled kernel --------------------------------------------------------------------------

template <class S>
std::string emulate_tiled(const Problem& q, bool contiguous_b) {
  const PackedGeom& p = q.p;
  const int64_t ctas_m = ceil_div(p.MT, S::MT_CTA);
  const int64_t ctas_n = ceil_div(q.n_tokens, S::BN);
  std::vector<uint16_t> As(size_t(S::MT_CTA) * kWarp * 8);
  std::vector<uint32_t> Ms(size_t(S::MT_CTA) * 16);
  std::vector<uint16_t> Bs(size_t(S::BN) * kStepK);
  std::vector<uint16_t> Cs(size_t(S::BN) * S::C_PITCH);
  constexpr int WARPS = S::WARPS_M * S::WARPS_N;
  std::vector<float> acc(size_t(WARPS) * S::WM * S::WN * kWarp * 4);
  auto acc_at = [&](int warp, int i, int j) {
    return reinterpret_cast<float(*)[4]>(acc.data() + (((size_t(warp) * S::WM + i) * S::WN + j) * kWarp * 4));
  };
  for (int64_t bx = 0; bx < ctas_m; ++bx) {
    for (int64_t by = 0; by < ctas_n; ++by) {
      const int64_t m0 = bx * S::BM, n0 = by * S::BN, mt0 = m0 / kTileRows;
      const int32_t* kbase = q.kidx + kidx_step_index(p, p.kidx_block(m0), 0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t ks = 0; ks < p.KS; ++ks) {
        // A and metadata: the cp.async chunks, thread by thread (zero-filled past MT).
        for (int tid = 0; tid < S::THREADS; ++tid) {
          for (int c = tid; c < S::COPY_CHUNKS; c += S::THREADS) {
            const CopySlot s = copy_slot<S>(c);
            const int64_t mt = mt0 + s.mt_local;
            const bool ok = mt < p.MT;
            if (!s.meta) {
              uint16_t* dst = As.data() + (size_t(s.mt_local) * kWarp + s.part) * 8;
              for (int i = 0; i < 8; ++i)
                dst[i] = ok ? q.values_p[packed_value_index(p, mt, ks, s.part, 0) + i] : uint16_t(0);
            } else {
              uint32_t* dst = Ms.data() + size_t(s.mt_local) * 16 + 4 * s.part;
              for (int i = 0; i < 4; ++i)
                dst[i] = ok ? q.meta_p[packed_meta_index(p, mt, ks, 4 * s.part) + i] : 0u;
            }
          }
        }
        // B: the staging registers of every thread, stored at the swizzled offsets.
        const int32_t* step = kbase + ks * kStepK;
        for (int tid = 0; tid < S::THREADS; ++tid) {
          if (contiguous_b) {
            for (int j = 0; j < S::B_CHUNKS; ++j) {
              const int n = b_chunk_token<S>(tid, j), k = b_chunk_k(tid);
              for (int i = 0; i < 8; ++i) Bs[size_t(bs_offset(n, k) + i)] = contig_b(q, ks, n0 + n, k + i);
            }
          } else {
            for (int j = 0; j < S::B_PAIRS; ++j) {
              const int n = b_pair_token<S>(tid, j), k = b_pair_k(tid);
              Bs[size_t(bs_offset(n, k))] = gather_b(q, step, n0 + n, k);
              Bs[size_t(bs_offset(n, k) + 1)] = gather_b(q, step, n0 + n, k + 1);
            }
          }
        }
        // Every warp: A and metadata from shared memory, B by ldmatrix, then mma.sp.
        for (int warp = 0; warp < WARPS; ++warp) {
          const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
          uint32_t a[S::WM][kWarp][4], e[S::WM][kWarp];
          for (int i = 0; i < S::WM; ++i) {
            const int mtl = wm * S::WM + i;
            for (int lane = 0; lane < kWarp; ++lane) {
              const uint16_t* src = As.data() + (size_t(mtl) * kWarp + lane) * 8;
              for (int r = 0; r < 4; ++r) a[i][lane][r] = pack16(src[2 * r], src[2 * r + 1]);
              e[i][lane] = Ms[size_t(mtl) * 16 + meta_word_of_lane(lane)];
            }
          }
          for (int j = 0; j < S::WN; ++j) {
            int offs[kWarp];
            for (int lane = 0; lane < kWarp; ++lane)
              offs[lane] = bs_ldsm_offset(lane, (wn * S::WN + j) * kTileTokens);
            uint32_t b[kWarp][4];
            ldmatrix_x4(Bs.data(), offs, b);
            for (int i = 0; i < S::WM; ++i) {
              if (mt0 + wm * S::WM + i >= p.MT) continue;
              std::string err = mma_sp_m16n8k32(q.t, a[i], b, e[i], 0, acc_at(warp, i, j));
              if (!err.empty()) return err;
            }
          }
        }
      }
      // Epilogue: through the shared tile, then coalesced stores.
      for (int warp = 0; warp < WARPS; ++warp) {
        const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
        for (int i = 0; i < S::WM; ++i)
          for (int j = 0; j < S::WN; ++j)
            for (int lane = 0; lane < kWarp; ++lane)
              for (int c = 0; c < 4; ++c) {
                const CElem el = c_elem(lane, c);
                const int rr = (wm * S::WM + i) * kTileRows + el.row;
                const int nn = (wn * S::WN + j) * kTileTokens + el.n;
                const float v = acc_at(warp, i, j)[lane][c] + bias_at(q, m0 + rr);
                Cs[size_t(nn) * S::C_PITCH + rr] = float_to_bits16(q.t, v);
              }
      }
      for (int idx = 0; idx < S::BN * S::BM; ++idx) {
        const int nn = idx / S::BM, rr = idx % S::BM;
        const int64_t tok = n0 + nn, r = m0 + rr;
        if (tok < q.n_tokens && r < p.R)
          q.y[tok * q.ldy + out_row(q.out_rows, r)] = Cs[size_t(nn) * S::C_PITCH + rr];
      }
    }
  }
  return {};
}

}  // namespace

std::string emulate_spmm(const PackedGeom& p, DType t, const uint16_t* values_p,
                         const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                         const void* x, int64_t n_tokens, int64_t ldx, const void* bias, void* y,
                         int64_t ldy, Path path, bool contiguous_b) {
  if (t == DType::f32) return "the mma.sp kernels take float16 or bfloat16, not float32";
  if (contiguous_b && (!p.keeps_every_column() || p.K % 8 != 0))
    return "the gather-free B path needs M == 4 and K % 8 == 0 (use contiguous_b=false)";
  const Problem q{p, t, values_p, meta_p, kidx, out_rows, static_cast<const uint16_t*>(x), n_tokens, ldx,
                  static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), ldy};
  if (n_tokens <= 0) return {};
  if (path == Path::automatic) path = choose_path(p, n_tokens);
  if (path == Path::decode) return emulate_decode(q, contiguous_b);
  switch (tiled_bm(p)) {
    case 64: return emulate_tiled<TileM64>(q, contiguous_b);
    case 32: return emulate_tiled<TileM32>(q, contiguous_b);
    default: return emulate_tiled<TileM16>(q, contiguous_b);
  }
}

}  // namespace vnm::sp
