// Arguments and launcher of the tiled SpMM kernel (N > 32; cuda/src/tiled.cuh). The dispatch
// (spmm.cu) fills TiledArgs; tiled_f16.cu / tiled_bf16.cu instantiate the launcher.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vnm/sp_layout.h"

namespace vnm::cuda::dev {

struct F16;
struct BF16;

// 32-bit sizes: the dispatch refuses problems whose element offsets do not fit.
struct TiledArgs {
  const uint16_t* values_p;  // [MT][KS][32][8]
  const uint32_t* meta_p;    // [MT][KS][16]
  const int32_t* kidx;       // [KB][Gp][4]
  const uint16_t* b;         // contiguous path: x (n_tokens x ldb); gathered: x^T (K x ldb)
  int ldb;                   // elements; gathered: a multiple of 8, >= n_tokens
  int n_tokens, K, R, MT, KS;
  int kidx_block_rows;       // V, or 0 when every row block reads kidx block 0 (M == 4)
  int kidx_block_stride;     // Gp * 4
  const uint16_t* bias;      // [R] in output order, or null
  const int32_t* out_rows;   // [R] or null
  uint16_t* y;               // n_tokens x ldy
  int ldy;
  int vector_store;          // out_rows null, ldy % 8 == 0, y 16-byte aligned: 16-byte stores
};

// S: an sp::TileShape; kGather: B from x^T by kidx (else x read without a gather).
template <class T, class S, bool kGather>
cudaError_t launch_tiled(const TiledArgs& a, cudaStream_t stream);

}  // namespace vnm::cuda::dev
