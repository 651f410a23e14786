// The packed (mma.sp kernel) layout on the CPU. Every element is produced by the same
// __host__ __device__ function the CUDA packing kernels run (sp_layout.h), one call each.
#include "vnm/pack.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "vnm/parallel.h"

namespace vnm {

sp::PackedGeom packed_geom(const Layout& L) {
  sp::PackedGeom p;
  p.R = L.rows;
  p.K = L.cols;
  p.M = L.pattern.M;
  p.row_block = L.row_block;
  p.Rp = L.padded_rows;
  p.G = L.groups;
  p.MT = L.padded_rows / sp::kTileRows;
  p.KS = ceil_div(L.groups, sp::kStepGroups);
  p.Gp = p.KS * sp::kStepGroups;
  p.KB = p.M == kSelectedColumns ? 1 : L.row_blocks;
  p.meta_cols = L.meta_cols;
  return p;
}

void pack(const sp::PackedGeom& p, const uint16_t* values, const uint8_t* meta,
          const uint8_t* columns, const int32_t* perm, uint16_t* values_p, uint32_t* meta_p,
          int32_t* kidx) {
  parallel_for(p.values_count(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) values_p[i] = sp::packed_value_at(p, values, i);
  });
  parallel_for(p.meta_words(), 1 << 12, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) meta_p[i] = sp::packed_meta_at(p, meta, i);
  });
  for (int64_t i = 0; i < p.kidx_count(); ++i) kidx[i] = sp::packed_kidx_at(p, columns, perm, i);
}

void unpack(const sp::PackedGeom& p, const uint16_t* values_p, const uint32_t* meta_p,
            const int32_t* kidx, const int32_t* inv_perm, uint16_t* values, uint8_t* meta,
            uint8_t* columns) {
  parallel_for(p.Rp * p.G * 2, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) values[i] = sp::canonical_value_at(p, values_p, i);
  });
  parallel_for(p.Rp * p.meta_cols, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) meta[i] = sp::canonical_meta_at(p, meta_p, i);
  });
  const int64_t ncols = (p.Rp / p.row_block) * p.G * 4;
  for (int64_t i = 0; i < ncols; ++i) columns[i] = sp::canonical_column_at(p, kidx, inv_perm, i);
}

namespace {

constexpr int64_t kChunkTokens = 256;

template <DType t>
void spmm_packed_impl(const sp::PackedGeom& p, const uint16_t* values_p, const uint32_t* meta_p,
                      const int32_t* kidx, const int32_t* out_rows, const void* x, int64_t n_tokens,
                      const void* bias, void* y) {
  const int64_t K = p.K, R = p.R;
  std::vector<float> xt;
  for (int64_t n0 = 0; n0 < n_tokens; n0 += kChunkTokens) {
    const int64_t T = std::min(kChunkTokens, n_tokens - n0);
    // k-major copy of the chunk; row K is zeros, read by negative (padding) kidx entries.
    xt.assign(size_t((K + 1) * T), 0.0f);
    for (int64_t i = 0; i < T; ++i)
      for (int64_t k = 0; k < K; ++k) xt[k * T + i] = load_as_float(t, x, (n0 + i) * K + k);
    parallel_for(R, 8, [&](int64_t r_begin, int64_t r_end) {
      std::vector<float> acc(static_cast<size_t>(T));
      for (int64_t r = r_begin; r < r_end; ++r) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int32_t* kb = kidx + p.kidx_block(r) * p.Gp * 4;
        for (int64_t g = 0; g < p.G; ++g) {
          const uint32_t nib = sp::packed_nibble(p, meta_p, r, g);
          for (int slot = 0; slot < 2; ++slot) {
            const int pos = slot ? int(nib >> 2) : int(nib & 3);
            const int32_t col = kb[g * 4 + pos];
            const float w = load_as_float(t, values_p, sp::packed_value_of(p, r, g, slot));
            const float* xr = xt.data() + (col < 0 ? K : int64_t(col)) * T;
            for (int64_t i = 0; i < T; ++i) acc[size_t(i)] += w * xr[i];
          }
        }
        const int64_t out = sp::out_row(out_rows, r);
        const float b = bias ? load_as_float(t, bias, out) : 0.0f;
        for (int64_t i = 0; i < T; ++i) store_from_float(t, y, (n0 + i) * R + out, acc[size_t(i)] + b);
      }
    });
  }
}

}  // namespace

void spmm_packed_reference(const sp::PackedGeom& p, DType t, const uint16_t* values_p,
                           const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                           const void* x, int64_t n_tokens, const void* bias, void* y) {
  switch (t) {
    case DType::f16:
      return spmm_packed_impl<DType::f16>(p, values_p, meta_p, kidx, out_rows, x, n_tokens, bias, y);
    case DType::bf16:
      return spmm_packed_impl<DType::bf16>(p, values_p, meta_p, kidx, out_rows, x, n_tokens, bias, y);
    case DType::f32: break;
  }
  throw std::invalid_argument("the packed layout holds float16 or bfloat16 values, not float32");
}

void packed_to_dense(const sp::PackedGeom& p, DType t, const uint16_t* values_p,
                     const uint32_t* meta_p, const int32_t* kidx, void* dense) {
  if (t == DType::f32)
    throw std::invalid_argument("the packed layout holds float16 or bfloat16 values, not float32");
  uint16_t* out = static_cast<uint16_t*>(dense);
  std::memset(out, 0, size_t(p.R * p.K) * 2);
  parallel_for(p.R, 16, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int32_t* kb = kidx + p.kidx_block(r) * p.Gp * 4;
      for (int64_t g = 0; g < p.G; ++g) {
        const uint32_t nib = sp::packed_nibble(p, meta_p, r, g);
        for (int slot = 0; slot < 2; ++slot) {
          const int32_t col = kb[g * 4 + (slot ? int(nib >> 2) : int(nib & 3))];
          if (col >= 0) out[r * p.K + col] = values_p[sp::packed_value_of(p, r, g, slot)];
        }
      }
    }
  });
}

}  // namespace vnm
