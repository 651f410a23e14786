// Instantiations of the tiled SpMM kernel for F16 (the only place they are compiled for this
// type): the gathered path for every row tile, the contiguous path where it applies (M == 4,
// whose row tile is always 128).
#include "tiled.cuh"

namespace vnm::cuda::dev {

template cudaError_t launch_tiled<F16, sp::TileM128, false>(const TiledArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM128, true>(const TiledArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM64, true>(const TiledArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM32, true>(const TiledArgs&, cudaStream_t);
template cudaError_t launch_tiled<F16, sp::TileM16, true>(const TiledArgs&, cudaStream_t);

}  // namespace vnm::cuda::dev
