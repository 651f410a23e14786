// Kernel arguments and the launchers the dispatch (spmm.cu) calls. The launchers are explicitly
// instantiated once per element type (spmm_f16.cu, spmm_bf16.cu), so the two types compile in
// parallel and spmm.cu holds no kernel code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vnm/sp_layout.h"

namespace vnm::cuda::dev {

struct F16;
struct BF16;

struct KernelArgs {
  sp::PackedGeom p;
  const uint16_t* values_p;
  const uint32_t* meta_p;
  const int32_t* kidx;
  const uint16_t* x;
  int64_t n_tokens;
  int64_t ldx;
  const uint16_t* bias;     // or null; in output order
  const int32_t* out_rows;  // or null: output row of each stored row (sp::out_row)
  uint16_t* y;
  int64_t ldy;
  int contig;  // B without a gather: x column 32 ks + k (M == 4, no perm, 16-byte aligned rows)
};

// Grid (MT, ceil(N / 32)), kDecodeWarps warps: small N, memory bound.
template <class T>
cudaError_t launch_decode(const KernelArgs& a, cudaStream_t stream);

// The tiled kernel (N > 32) has its own arguments and launcher: tiled.h.

}  // namespace vnm::cuda::dev
