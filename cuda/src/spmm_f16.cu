// Instantiations of the SpMM kernels for F16 (the only place they are compiled for this type).
#include "spmm_kernels.cuh"

namespace vnm::cuda::dev {

template cudaError_t launch_tiled<F16, sp::TileM64>(const KernelArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM32>(const KernelArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM16>(const KernelArgs&, cudaStream_t);

}  // namespace vnm::cuda::dev
