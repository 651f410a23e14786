// Exact V:N:M selection of one block, shared by mask selection (select.cpp) and the
// permutation search (permute.cpp), so the search scores a block exactly as select_mask does.
// Internal to the core: not installed, not part of the public headers.
#pragma once

#include <cstdint>
#include <vector>

#include "vnm/format.h"

namespace vnm {
namespace detail {


inline constexpr int kLanes = 8;

// Sum over rows of f(r), in kLanes interleaved partial sums combined in a fixed order.
template <typename F>
inline float lane_sum(int V, F&& f) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int r = 0;
  for (; r + kLanes <= V; r += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(r + l);
  for (; r < V; ++r) acc[r % kLanes] += f(r);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// Per-thread scratch for one block, column-major: col(c)[r] is the score of row r, column c.
struct BlockScratch {
  int V = 0, M = 0;
  std::vector<float> nat;         // M x V, columns in natural order (the block as loaded)
  std::vector<float> s;           // M x V, columns in search order
  std::vector<float> suf1, suf2;  // (M + 1) x V: best and second best of columns >= i
  std::vector<float> t1a, t2a;    // V: top two after a, b
  std::vector<float> t1b, t2b;    // V: top two after a, b, c
  std::vector<int> order;         // search position -> column offset

  void resize(int V_, int M_) {
    V = V_;
    M = M_;
    nat.assign(size_t(M) * V, 0.0f);
    s.assign(size_t(M) * V, 0.0f);
    suf1.assign(size_t(M + 1) * V, 0.0f);
    suf2.assign(size_t(M + 1) * V, 0.0f);
    t1a.assign(V, 0.0f);
    t2a.assign(V, 0.0f);
    t1b.assign(V, 0.0f);
    t2b.assign(V, 0.0f);
    order.resize(M);
  }
  float* natural(int c) { return nat.data() + size_t(c) * V; }
  float* col(int i) { return s.data() + size_t(i) * V; }
  float* s1(int i) { return suf1.data() + size_t(i) * V; }
  float* s2(int i) { return suf2.data() + size_t(i) * V; }
};

// Finds the best 4 columns of the block loaded in b.nat (M > 4); writes their offsets, ascending,
// to best[] and returns the kept score of the block, sum over rows of the top two of the 4, as
// the float lane sum of the search (the value select_mask maximises). Of sets with equal kept
// score it returns the one whose ascending offsets come first lexicographically.
float best_columns(BlockScratch& b, int best[4]);

// Throws std::invalid_argument naming the first score (of n, rows of K) that is negative, NaN or
// infinite.
void check_scores(const float* scores, int64_t n, int64_t K);

}  // namespace detail
}  // namespace vnm
