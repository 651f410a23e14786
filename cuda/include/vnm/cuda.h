// Entry points of the CUDA library (no torch, no Python): plain params structs of pointers,
// sizes and a stream in, a status code out. Nothing here allocates device memory or
// synchronises, so every call can be captured into a CUDA graph.
//
// The kernels use the packed layout of vnm/sp_layout.h (pack/unpack convert from/to the
// canonical storage of vnm/format.h). Values are float16 or bfloat16 (vnm::DType codes 1, 2).
#pragma once

#include <cstdint>

#include "vnm/sp_layout.h"

namespace vnm::cuda {

enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,   // sizes or pointers inconsistent
  kUnsupportedDtype = 2,  // float32 (the kernels run mma.sp on float16 / bfloat16)
  kUnsupportedArch = 3,   // GPU older than sm_80
  kMisaligned = 4,        // a pointer lacks the alignment its loads need
  kNoDevice = 5,          // no CUDA device / driver
  kCudaError = 6,         // a CUDA runtime call or launch failed
};

// What went wrong in the last call on this thread that returned a status other than kOk.
const char* last_error();

// Number of CUDA devices visible (0 when there is no driver or no GPU).
int device_count();

// y = x @ W^T (+ bias) for W in packed form: x is n_tokens x K with row pitch ldx (elements),
// y n_tokens x R with row pitch ldy, bias R values or null, all of one dtype. fp32 accumulation,
// one rounding into y. With out_rows (a permutation of 0..R-1), stored row r is written to
// column out_rows[r] of y and reads bias[out_rows[r]] (the layer's output order).
//   alignment: values_p and meta_p 16 bytes, kidx 8 bytes, out_rows 4, x / y / bias 2 bytes.
struct SpmmParams {
  sp::PackedGeom geom;
  int dtype = 1;                       // vnm::DType code: 1 float16, 2 bfloat16
  const void* values_p = nullptr;      // [MT][KS][32][8]
  const uint32_t* meta_p = nullptr;    // [MT][KS][16]
  const int32_t* kidx = nullptr;       // [KB][Gp][4]
  bool has_perm = false;               // kidx holds a permutation (B is gathered even for M == 4)
  const int32_t* out_rows = nullptr;   // [R] or null
  const void* x = nullptr;
  int64_t n_tokens = 0;
  int64_t ldx = 0;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t ldy = 0;
  int device = 0;
  void* stream = nullptr;              // cudaStream_t
  int path = 0;                        // sp::Path: 0 automatic, 1 decode, 2 tiled (for tests)
  bool force_gather = false;           // tests: gather B even where the contiguous path applies
  // The tiled kernel's gathered path (N > 32 with M > 4, a perm, or an x it cannot read
  // directly; Plan::transposed_x) reads x transposed: xt is K x ldxt, k-major (xt[k * ldxt + n]
  // = x[n, k]), ldxt a multiple of 8 >= n_tokens (sp::transposed_x_pitch), 16-byte aligned.
  // Columns n_tokens .. ldxt-1 are read but only feed outputs that are never stored. One
  // transposed x serves every layer that reads the same x (q/k/v, gate/up).
  const void* xt = nullptr;
  int64_t ldxt = 0;
  // Decode kernel split-K (sp::decode_plan): fp32 scratch of sp::spmm_workspace_floats floats,
  // stream-ordered with the launch (the Python op passes a torch allocation). Null: spmm()
  // takes it from cudaMallocAsync on the stream and frees it there after the reduction.
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
  int64_t decode_splits = 0;           // tests: force the decode kernel's k splits (0 automatic)
};
int spmm(const SpmmParams& params);

// Which kernel spmm() would run (sp::Path code 1 decode / 2 tiled), its row tile (tiled),
// whether B is read without a gather, and whether it needs SpmmParams::xt (x transposed).
struct Plan {
  int path = 0;
  int bm = 0;
  bool contiguous_b = false;
  bool transposed_x = false;
  int64_t splits = 1;  // decode: CTAs along k (sp::DecodePlan::splits)
};
Plan plan(const SpmmParams& params);

// Canonical storage -> packed arrays, on the GPU (one thread per output element).
struct PackParams {
  sp::PackedGeom geom;
  const uint16_t* values = nullptr;    // [R'][G][2] 16-bit values
  const uint8_t* meta = nullptr;       // [R'][ceil(G/2)]
  const uint8_t* columns = nullptr;    // [R'/V][G][4]
  const int32_t* perm = nullptr;       // [K] or null
  uint16_t* values_p = nullptr;
  uint32_t* meta_p = nullptr;
  int32_t* kidx = nullptr;
  int device = 0;
  void* stream = nullptr;
};
int pack(const PackParams& params);

// Packed arrays -> canonical storage, on the GPU. inv_perm: the inverse of the perm used when
// packing (inv_perm[perm[c]] = c), or null.
struct UnpackParams {
  sp::PackedGeom geom;
  const uint16_t* values_p = nullptr;
  const uint32_t* meta_p = nullptr;
  const int32_t* kidx = nullptr;
  const int32_t* inv_perm = nullptr;
  uint16_t* values = nullptr;
  uint8_t* meta = nullptr;
  uint8_t* columns = nullptr;
  int device = 0;
  void* stream = nullptr;
};
int unpack(const UnpackParams& params);

// The dense R x K matrix D with y = x @ D^T (x's column order, perm folded in), for the
// gradient with respect to x. `dense` must be zero-filled by the caller.
struct DenseParams {
  sp::PackedGeom geom;
  const uint16_t* values_p = nullptr;
  const uint32_t* meta_p = nullptr;
  const int32_t* kidx = nullptr;
  uint16_t* dense = nullptr;
  int device = 0;
  void* stream = nullptr;
};
int packed_to_dense(const DenseParams& params);

}  // namespace vnm::cuda
