// Packing kernels: canonical storage <-> packed layout, and the dense matrix for gradients. One
// thread per output element, each running the __host__ __device__ function of sp_layout.h that
// the CPU version (cpp/src/pack.cpp) runs too.
#include <cuda_runtime.h>

#include <algorithm>

#include "vnm/cuda.h"
#include "vnm/sp_layout.h"

namespace vnm::cuda::dev {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 16));
}

// Grid-stride loops: any size with a bounded grid.
__global__ void pack_kernel(const sp::PackedGeom p, const uint16_t* values, const uint8_t* meta,
                            const uint8_t* columns, const int32_t* perm, uint16_t* values_p,
                            uint32_t* meta_p, int32_t* kidx) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < p.values_count(); i += stride)
    values_p[i] = sp::packed_value_at(p, values, i);
  for (int64_t i = first; i < p.meta_words(); i += stride) meta_p[i] = sp::packed_meta_at(p, meta, i);
  for (int64_t i = first; i < p.kidx_count(); i += stride)
    kidx[i] = sp::packed_kidx_at(p, columns, perm, i);
}

__global__ void unpack_kernel(const sp::PackedGeom p, const uint16_t* values_p,
                              const uint32_t* meta_p, const int32_t* kidx, const int32_t* inv_perm,
                              uint16_t* values, uint8_t* meta, uint8_t* columns) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < p.Rp * p.G * 2; i += stride)
    values[i] = sp::canonical_value_at(p, values_p, i);
  for (int64_t i = first; i < p.Rp * p.meta_cols; i += stride)
    meta[i] = sp::canonical_meta_at(p, meta_p, i);
  for (int64_t i = first; i < (p.Rp / p.row_block) * p.G * 4; i += stride)
    columns[i] = sp::canonical_column_at(p, kidx, inv_perm, i);
}

// One thread per (row, group): both kept values scattered to their x columns.
__global__ void to_dense_kernel(const sp::PackedGeom p, const uint16_t* values_p,
                                const uint32_t* meta_p, const int32_t* kidx, uint16_t* dense) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.R * p.G; i += stride) {
    const int64_t r = i / p.G, g = i % p.G;
    const int32_t* kb = kidx + p.kidx_block(r) * p.Gp * 4;
    const uint32_t nib = sp::packed_nibble(p, meta_p, r, g);
    for (int slot = 0; slot < 2; ++slot) {
      const int32_t col = kb[g * 4 + (slot ? int(nib >> 2) : int(nib & 3))];
      if (col >= 0) dense[r * p.K + col] = values_p[sp::packed_value_of(p, r, g, slot)];
    }
  }
}

}  // namespace

cudaError_t launch_pack(const PackParams& q, cudaStream_t stream) {
  const int64_t n = std::max(q.geom.values_count(), q.geom.kidx_count());
  pack_kernel<<<blocks_for(n), kThreads, 0, stream>>>(q.geom, q.values, q.meta, q.columns, q.perm,
                                                      q.values_p, q.meta_p, q.kidx);
  return cudaGetLastError();
}

cudaError_t launch_unpack(const UnpackParams& q, cudaStream_t stream) {
  const int64_t n = q.geom.Rp * q.geom.G * 2;
  unpack_kernel<<<blocks_for(n), kThreads, 0, stream>>>(q.geom, q.values_p, q.meta_p, q.kidx,
                                                        q.inv_perm, q.values, q.meta, q.columns);
  return cudaGetLastError();
}

cudaError_t launch_to_dense(const DenseParams& q, cudaStream_t stream) {
  to_dense_kernel<<<blocks_for(q.geom.R * q.geom.G), kThreads, 0, stream>>>(
      q.geom, q.values_p, q.meta_p, q.kidx, q.dense);
  return cudaGetLastError();
}

}  // namespace vnm::cuda::dev
