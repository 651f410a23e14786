// Entry points of the CUDA library (no torch): raw pointers, sizes and a stream.
#pragma once

namespace vnm::cuda {

// Number of CUDA devices visible (0 when there is no driver or no GPU).
int device_count();

}  // namespace vnm::cuda
