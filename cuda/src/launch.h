// Arguments and launcher of the decode kernel (N <= 32; cuda/src/decode.cuh), which the dispatch
// (spmm.cu) calls. decode.cu instantiates the launcher for both element types, so spmm.cu holds
// no kernel code. The tiled kernel (N > 32) has its own header, tiled.h.
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

// Decode kernel (decode.cuh): what it reads of sp::DecodePlan, plus the split-K workspace.
struct DecodeArgs {
  int wt_shift = 0;      // log2 of the row tiles per CTA
  int kparts = 1;        // warps along k per row tile
  int ks_cta = 0;        // k-steps per CTA
  int ks_warp = 0;       // k-steps per warp
  float* ws = nullptr;   // [splits][N][R] fp32 partials, null when the plan has one split
};

// Grid (row_ctas, splits, token_ctas) of sp::decode_plan, kDecodeThreads threads, then (splits
// > 1) the reduction over `ws` (DecodePlan::workspace_floats floats). Small N, memory bound.
template <class T>
cudaError_t launch_decode(const KernelArgs& a, const sp::DecodePlan& d, float* ws,
                          cudaStream_t stream);

// The tiled kernel (N > 32) has its own arguments and launcher: tiled.h.

}  // namespace vnm::cuda::dev
