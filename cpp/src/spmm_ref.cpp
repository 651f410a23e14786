// Reference SpMM on the CPU, straight from the canonical storage (W is never densified).
//
// Tokens are processed in chunks: a chunk of x is converted to fp32 and transposed to k-major
// (xt[k][t], with the input permutation applied), so the 4 selected columns of a group are 4
// contiguous token vectors and the inner loop over tokens vectorises. Work is split over
// (row block, token tile) pairs; each owns its accumulators, so no synchronisation is needed.
#include <algorithm>
#include <vector>

#include "vnm/core.h"
#include "vnm/parallel.h"

namespace vnm {
namespace {

constexpr int64_t kChunkTokens = 256;  // tokens converted per chunk (K x 256 floats)
constexpr int64_t kTileTokens = 32;    // accumulator tile: row block x 32 tokens

// The element type is a template parameter so the conversions in the loops inline.
template <DType t>
void spmm_impl(const Layout& L, const void* values, const uint8_t* meta, const uint8_t* columns,
               const int32_t* perm, const int32_t* row_perm, const void* x, int64_t n_tokens,
               const void* bias, void* y) {
  const int64_t R = L.rows, K = L.cols, M = L.pattern.M, V = L.row_block, G = L.groups;
  std::vector<float> xt;
  for (int64_t n0 = 0; n0 < n_tokens; n0 += kChunkTokens) {
    const int64_t T = std::min(kChunkTokens, n_tokens - n0);
    // Row K of xt is zeros: selected columns in the padding (their values are zero) read it.
    xt.assign(size_t((K + 1) * T), 0.0f);
    parallel_for(K, 256, [&](int64_t k_begin, int64_t k_end) {
      for (int64_t k = k_begin; k < k_end; ++k) {
        const int64_t src = perm ? perm[k] : k;
        for (int64_t i = 0; i < T; ++i) xt[k * T + i] = load_as_float(t, x, (n0 + i) * K + src);
      }
    });
    const int64_t tiles = ceil_div(T, kTileTokens);
    parallel_for(L.row_blocks * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(size_t(V * kTileTokens));
      for (int64_t job = begin; job < end; ++job) {
        const int64_t rb = job / tiles;
        const int64_t t0 = (job % tiles) * kTileTokens;
        const int64_t tn = std::min(kTileTokens, T - t0);
        const int64_t r_end = std::min(R, (rb + 1) * V);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* cols = columns + (rb * G + g) * kSelectedColumns;
          const float* xg[kSelectedColumns];
          for (int i = 0; i < kSelectedColumns; ++i) {
            const int64_t k = std::min(g * M + cols[i], K);
            xg[i] = xt.data() + k * T + t0;
          }
          for (int64_t r = rb * V; r < r_end; ++r) {
            const int nibble = (meta[L.meta_index(r, g)] >> Layout::meta_shift(g)) & 0xF;
            const int64_t v = (r * G + g) * kKeptPerRow;
            const float w0 = load_as_float(t, values, v), w1 = load_as_float(t, values, v + 1);
            const float* a = xg[nibble & 3];
            const float* b = xg[nibble >> 2];
            float* out = acc.data() + (r - rb * V) * kTileTokens;
            for (int64_t i = 0; i < tn; ++i) out[i] += w0 * a[i] + w1 * b[i];
          }
        }
        for (int64_t r = rb * V; r < r_end; ++r) {
          const int64_t out = row_perm ? row_perm[r] : r;  // stored row r is output row out
          const float b = bias ? load_as_float(t, bias, out) : 0.0f;
          const float* in = acc.data() + (r - rb * V) * kTileTokens;
          for (int64_t i = 0; i < tn; ++i) store_from_float(t, y, (n0 + t0 + i) * R + out, in[i] + b);
        }
      }
    });
  }
}

}  // namespace

void spmm_reference(const Layout& L, DType t, const void* values, const uint8_t* meta,
                    const uint8_t* columns, const int32_t* perm, const int32_t* row_perm,
                    const void* x, int64_t n_tokens, const void* bias, void* y) {
  switch (t) {
    case DType::f32:
      return spmm_impl<DType::f32>(L, values, meta, columns, perm, row_perm, x, n_tokens, bias, y);
    case DType::f16:
      return spmm_impl<DType::f16>(L, values, meta, columns, perm, row_perm, x, n_tokens, bias, y);
    case DType::bf16:
      return spmm_impl<DType::bf16>(L, values, meta, columns, perm, row_perm, x, n_tokens, bias, y);
  }
}

}  // namespace vnm
