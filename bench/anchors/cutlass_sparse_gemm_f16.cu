// Anchor for bench/sass_report.py: CUTLASS's Ampere sparse GEMM (2:4, mma.sp) in fp16, compiled
// and counted by the same nvcc and the same rules as vnm's kernels. Not part of the build.
//
// C (fp16) = A (fp16, 2:4, row-major, K contiguous) x B (fp16, column-major, K contiguous) with
// fp32 accumulation: the operand layout of vnm's y^T = W x^T. Threadblock 128x128x64, warp
// 64x64x64, mma 16x8x32, 3 stages: CUTLASS's own example 15 configuration re-instantiated in fp16
// (that example is int4 / int8). Headers: the nvidia-cutlass wheel (cutlass_library/source/include).
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_sparse.h"

namespace vnm_anchor {

using Element = cutlass::half_t;
using Accumulator = float;
using Epilogue = cutlass::epilogue::thread::LinearCombination<
    Element, 128 / cutlass::sizeof_bits<Element>::value, Accumulator, Accumulator>;

using SparseGemmF16 = cutlass::gemm::device::SparseGemm<
    Element, cutlass::layout::RowMajor,     // A: sparse weights
    Element, cutlass::layout::ColumnMajor,  // B: activations
    Element, cutlass::layout::RowMajor,     // C / D
    Accumulator, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 64>,  // threadblock
    cutlass::gemm::GemmShape<64, 64, 64>,    // warp
    cutlass::gemm::GemmShape<16, 8, 32>,     // mma.sp m16n8k32
    Epilogue, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
    3>;                                      // stages

// Taking the kernel's address instantiates it (and nothing is launched).
const void* kernel_address() {
  return reinterpret_cast<const void*>(&cutlass::Kernel<SparseGemmF16::GemmKernel>);
}

}  // namespace vnm_anchor
