// CPU model of mma.sp m16n8k32 and ldmatrix .x4, and CPU emulations of the SpMM kernels.
//
// The model's own reading of the registers follows the PTX ISA text (see sp_layout.h, section 1):
// A and B by the fragment formulas a_elem / b_elem, C/D by c_elem, and the metadata register
// decoded here literally ("lane (g, t) with t - 2 * selector = h holds rows g (bits 15:0) and
// g + 8 (bits 31:16), chunks 4h .. 4h+3, chunk j in nibble j"), not through the packer's
// meta_lane / meta_shift helpers, so a slip in those shows up as a mismatch.
// The decode emulation mirrors cuda/src/spmm_kernels.cuh step by step (the tiled one,
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

// The tiled kernel is emulated in tiled_model.cpp (emulate_tiled).

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
  return emulate_tiled(p, t, values_p, meta_p, kidx, out_rows, q.x, n_tokens, ldx, q.bias, q.y,
                       ldy, contiguous_b);
}

}  // namespace vnm::sp
