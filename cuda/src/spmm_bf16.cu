// Instantiations of the SpMM kernels for BF16 (the only place they are compiled for this type).
#include "spmm_kernels.cuh"

namespace vnm::cuda::dev {

template cudaError_t launch_decode<BF16>(const KernelArgs&, cudaStream_t);

}  // namespace vnm::cuda::dev
