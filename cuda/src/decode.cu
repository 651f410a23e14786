// Instantiations of the decode kernel (decode.cuh): 2 element types x 3 token-tile counts, plus
// the split-K reduction; spmm.cu picks one through launch_decode.
#include "decode.cuh"

namespace vnm::cuda::dev {

template cudaError_t launch_decode<F16>(const KernelArgs&, const sp::DecodePlan&, float*, cudaStream_t);
template cudaError_t launch_decode<BF16>(const KernelArgs&, const sp::DecodePlan&, float*, cudaStream_t);

}  // namespace vnm::cuda::dev
