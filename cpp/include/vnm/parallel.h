// A minimal parallel-for over an index range: the core has a few embarrassingly parallel loops
// (row blocks, token tiles) and no other use for a thread pool.
#pragma once

#include <cstdint>
#include <functional>

namespace vnm {

// Threads the core uses: VNM_NUM_THREADS if set (>= 1), else std::thread::hardware_concurrency.
int num_threads();
void set_num_threads(int n);  // n <= 0 restores the default

// Calls fn(begin, end) on disjoint chunks covering [0, n), in parallel. Chunks are at least
// `grain` long. The first exception thrown by any chunk is rethrown on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace vnm
