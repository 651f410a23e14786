// The packed (mma.sp kernel) layout on the CPU: packing, unpacking and a plain SpMM straight from
// it. The layout itself and its index maps live in sp_layout.h, shared with the CUDA kernels.
// Only 16-bit value types (float16, bfloat16) are packed: the kernels run mma.sp on them.
#pragma once

#include <cstdint>

#include "vnm/dtype.h"
#include "vnm/format.h"
#include "vnm/sp_layout.h"

namespace vnm {

// Geometry of the packed form of a matrix with canonical layout L.
sp::PackedGeom packed_geom(const Layout& L);

// Canonical storage (format.h) -> packed arrays (sizes from packed_geom). perm may be null.
void pack(const sp::PackedGeom& p, const uint16_t* values, const uint8_t* meta,
          const uint8_t* columns, const int32_t* perm, uint16_t* values_p, uint32_t* meta_p,
          int32_t* kidx);

// Packed arrays -> canonical storage. inv_perm is the inverse of the perm the packing used
// (inv_perm[perm[c]] = c), null without one.
void unpack(const sp::PackedGeom& p, const uint16_t* values_p, const uint32_t* meta_p,
            const int32_t* kidx, const int32_t* inv_perm, uint16_t* values, uint8_t* meta,
            uint8_t* columns);

// y[n, o(r)] = sum over kept weights of value * x[n, kidx] (+ bias[o(r)]) for r < R, with
// o = sp::out_row(out_rows, .), straight from the packed arrays (kidx already holds perm). x is
// n_tokens x K, y n_tokens x R, dtype t (float16 or bfloat16); fp32 accumulation, one rounding.
// The CPU implementation of vnm::spmm_packed.
void spmm_packed_reference(const sp::PackedGeom& p, DType t, const uint16_t* values_p,
                           const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                           const void* x, int64_t n_tokens, const void* bias, void* y);

// The dense R x K matrix D with y = x @ D^T in x's column order (perm folded in), written into
// `dense` (dtype t, zero-filled here first). Used for the gradient with respect to x.
void packed_to_dense(const sp::PackedGeom& p, DType t, const uint16_t* values_p,
                     const uint32_t* meta_p, const int32_t* kidx, void* dense);

}  // namespace vnm
