// Exact mask selection.
//
// V:N:M. For a V x M block with scores s[r][c] >= 0 we want the 4 columns S maximising
//   f(S) = sum_r top2_r(S),  top2_r(S) = sum of the two largest s[r][c], c in S,
// after which every row keeps its top 2 inside S. f(S) is evaluated in float as one lane sum
// (detail::lane_sum: 8 interleaved partial sums in a fixed order) of the per-row terms
// top1 + top2; the torch backend (python/vnm/mask.py) evaluates the same sums in the same order,
// so both see the same value for every set. Among sets of equal value the one whose ascending
// column offsets come first lexicographically wins (the first set of a plain enumeration
// a < b < c < d over the offsets, keeping the first best), so the selection is a function of the
// block alone, whatever order the search visits the sets in.
//
// The C(M, 4) sets are searched as a < b < c < d over the columns sorted by descending column
// sum (good sets come first), with branch and bound. Two kinds of bound, both >= the float value
// of every completion of a prefix:
//  * Per row (exact in float). Every per-row term, bound or exact, is one addition P + Q of the
//    largest and second largest of a set of scores, and the bound's P and Q are >= the
//    completion's (a superset's top two). Float addition is monotone and the lane sums run in
//    one order, so the float bound is never below the float value of a completion:
//      - after a:    sum_r top2{ s_a, best two of the columns after a }
//      - after a,b:  sum_r top2{ top two of (s_a, s_b), best two after b }
//      - after a,b,c with per-row top two t1 >= t2: adding d gives t1 + max(t2, s_d) exactly,
//                    and t1 + max(t2, best after c) bounds every d.
//    A prefix is cut when its bound is below the best value, or equal to it and even its
//    lexicographically smallest completion comes after the best set (so ties stay exact).
//  * Marginal gains (after a,b). f is monotone and submodular (per row, the sum of the two
//    largest scores of a set is the weighted rank of a uniform matroid), so for T = {a, b}
//      f(T + c + d) <= f(T) + g(c) + g(d),  g(q) = f(T + q) - f(T) = sum_r max(0, s_q - t2_r),
//    with t1 >= t2 the per-row top two of T. This is separable in c and d: one pass over the
//    columns after b gives g, and every c and then every d is cut in O(1) without touching its
//    rows. The per-row bounds above let each row pick its own best columns and become loose as V
//    and M grow; this one uses real columns. It is not monotone in float (it subtracts), so it
//    is argued in real numbers: every quantity in it, and a completion's lane-sum value, is a sum
//    of non-negative terms that passes through at most V/8 + 12 roundings of relative 2^-24
//    (under 3e-6 relative for each at V <= 256). Inflated by kGainSlack = 1e-4 (and FLT_MIN for
//    subnormal round-off) it is above the float value of every completion, and it cuts only
//    when strictly below the best value: no completion it cuts can reach or tie the best.
// For M = 8 this is at most 70 sets of V rows; for large M the bounds prune most of C(M, 4).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "block_select.h"
#include "vnm/core.h"
#include "vnm/parallel.h"

namespace vnm {
namespace detail {
namespace {

// Relative inflation of the marginal-gain bound, covering its float round-off (see the top).
constexpr float kGainSlack = 1e-4f;

// The marginal-gain bound as a value that no completion's float value exceeds.
inline float inflated(float bound) {
  return bound * (1.0f + kGainSlack) + std::numeric_limits<float>::min();
}

// Column offsets (< 256) sorted ascending and packed so that integer order is lexicographic
// order of the sorted offsets.
inline uint32_t set_key(int o0, int o1, int o2, int o3) {
  int x[4] = {o0, o1, o2, o3};
  std::sort(x, x + 4);
  return uint32_t(x[0]) << 24 | uint32_t(x[1]) << 16 | uint32_t(x[2]) << 8 | uint32_t(x[3]);
}

}  // namespace

float best_columns(BlockScratch& b, int best[4]) {
  const int V = b.V, M = b.M;
  // Search order: descending column sum, ties by offset.
  float colsum[kMaxM];
  for (int c = 0; c < M; ++c) colsum[c] = lane_sum(V, [&](int r) { return b.natural(c)[r]; });
  std::iota(b.order.begin(), b.order.end(), 0);
  std::stable_sort(b.order.begin(), b.order.end(),
                   [&](int x, int y) { return colsum[x] > colsum[y]; });
  const int* order = b.order.data();
  for (int i = 0; i < M; ++i) std::copy_n(b.natural(order[i]), V, b.col(i));
  // Suffix best two per row, and the three smallest offsets at search positions >= i (for the
  // lexicographically smallest completion of a prefix).
  std::fill_n(b.s1(M), V, 0.0f);
  std::fill_n(b.s2(M), V, 0.0f);
  int low[kMaxM + 1][3];
  low[M][0] = low[M][1] = low[M][2] = kMaxM;
  for (int i = M - 1; i >= 0; --i) {
    const float *x = b.col(i), *n1 = b.s1(i + 1), *n2 = b.s2(i + 1);
    float *o1 = b.s1(i), *o2 = b.s2(i);
    for (int r = 0; r < V; ++r) {
      o1[r] = std::max(x[r], n1[r]);
      o2[r] = std::max(std::min(x[r], n1[r]), n2[r]);
    }
    int l[4] = {low[i + 1][0], low[i + 1][1], low[i + 1][2], order[i]};
    std::sort(l, l + 4);
    std::copy_n(l, 3, low[i]);
  }

  float best_value = -1.0f;  // scores are >= 0, so the first complete set replaces this
  uint32_t best_key = 0;
  int best_pos[4] = {0, 1, 2, 3};
  // Whether a prefix whose exact per-row bound is `bound` can hold a set that beats the best:
  // `smallest_key` gives the key of its lexicographically smallest completion (asked on ties).
  auto may_win = [&](float bound, auto&& smallest_key) {
    return bound > best_value || (bound == best_value && smallest_key() < best_key);
  };
  float gain[kMaxM];      // g(q) for the current a, b
  float gain_suf[kMaxM + 1];  // max of g over search positions >= q
  for (int a = 0; a + 3 < M; ++a) {
    const float *xa = b.col(a), *sa1 = b.s1(a + 1), *sa2 = b.s2(a + 1);
    // top two of {x, s1, s2} with s1 >= s2: max(x, s1) + max(min(x, s1), s2).
    const float bound_a = lane_sum(V, [&](int r) {
      return std::max(xa[r], sa1[r]) + std::max(std::min(xa[r], sa1[r]), sa2[r]);
    });
    if (!may_win(bound_a, [&] {
          return set_key(order[a], low[a + 1][0], low[a + 1][1], low[a + 1][2]);
        }))
      continue;
    for (int bb = a + 1; bb + 2 < M; ++bb) {
      const float *xb = b.col(bb), *sb1 = b.s1(bb + 1), *sb2 = b.s2(bb + 1);
      for (int r = 0; r < V; ++r) {
        b.t1a[r] = std::max(xa[r], xb[r]);
        b.t2a[r] = std::min(xa[r], xb[r]);
      }
      const float* t1 = b.t1a.data();
      const float* t2 = b.t2a.data();
      // top two of two sorted pairs: max(t1, s1) + max(min(t1, s1), max(t2, s2)).
      const float bound_b = lane_sum(V, [&](int r) {
        return std::max(t1[r], sb1[r]) + std::max(std::min(t1[r], sb1[r]), std::max(t2[r], sb2[r]));
      });
      if (!may_win(bound_b, [&] {
            return set_key(order[a], order[bb], low[bb + 1][0], low[bb + 1][1]);
          }))
        continue;
      // Marginal gains of the columns after b, and the bound of the best two of them. The pass
      // costs one lane sum per column after b and one for f(T); when the subtree has no more
      // sets than that (3 columns or fewer after b) it is skipped: gains of +inf cut nothing.
      const int rest = M - 1 - bb;
      const bool use_gains = rest * (rest - 1) / 2 > rest + 1;
      constexpr float kNoBound = std::numeric_limits<float>::infinity();
      const float kept_ab = use_gains ? lane_sum(V, [&](int r) { return t1[r] + t2[r]; }) : 0.0f;
      gain_suf[M] = 0.0f;
      float top_gain1 = 0.0f, top_gain2 = 0.0f;
      for (int q = M - 1; q > bb; --q) {
        const float* xq = b.col(q);
        gain[q] = use_gains ? lane_sum(V, [&](int r) { return std::max(0.0f, xq[r] - t2[r]); })
                            : kNoBound;
        gain_suf[q] = std::max(gain[q], gain_suf[q + 1]);
        top_gain2 = std::max(top_gain2, std::min(top_gain1, gain[q]));
        top_gain1 = std::max(top_gain1, gain[q]);
      }
      if (inflated(kept_ab + top_gain1 + top_gain2) < best_value) continue;
      for (int c = bb + 1; c + 1 < M; ++c) {
        if (inflated(kept_ab + gain[c] + gain_suf[c + 1]) < best_value) continue;
        const float *xc = b.col(c), *sc1 = b.s1(c + 1);
        for (int r = 0; r < V; ++r) {
          b.t1b[r] = std::max(t1[r], xc[r]);
          b.t2b[r] = std::max(t2[r], std::min(t1[r], xc[r]));
        }
        const float* u1 = b.t1b.data();
        const float* u2 = b.t2b.data();
        const float bound_c = lane_sum(V, [&](int r) { return u1[r] + std::max(u2[r], sc1[r]); });
        if (!may_win(bound_c, [&] {
              return set_key(order[a], order[bb], order[c], low[c + 1][0]);
            }))
          continue;
        const float kept_abc = kept_ab + gain[c];
        for (int d = c + 1; d < M; ++d) {
          if (inflated(kept_abc + gain[d]) < best_value) continue;
          const float* xd = b.col(d);
          const float value = lane_sum(V, [&](int r) { return u1[r] + std::max(u2[r], xd[r]); });
          if (value < best_value) continue;
          const uint32_t key = set_key(order[a], order[bb], order[c], order[d]);
          if (value > best_value || key < best_key) {
            best_value = value;
            best_key = key;
            best_pos[0] = a;
            best_pos[1] = bb;
            best_pos[2] = c;
            best_pos[3] = d;
          }
        }
      }
    }
  }
  for (int i = 0; i < 4; ++i) best[i] = order[best_pos[i]];
  std::sort(best, best + 4);
  return best_value;
}

[[noreturn]] void bad_score(const float* scores, int64_t i, int64_t K) {
  std::ostringstream os;
  os << "scores must be finite and non-negative importance values (e.g. weight.abs()); got "
     << scores[i] << " at (" << i / K << ", " << i % K << ")";
  throw std::invalid_argument(os.str());
}

void check_scores(const float* scores, int64_t n, int64_t K) {
  for (int64_t i = 0; i < n; ++i)
    if (!(scores[i] >= 0.0f) || std::isinf(scores[i])) bad_score(scores, i, K);
}

}  // namespace detail

namespace {

using detail::BlockScratch;
using detail::best_columns;
using detail::check_scores;

void select_vnm(const float* scores, int64_t R, int64_t K, const Pattern& p, uint8_t* mask) {
  const int V = p.row_block(), M = p.M;
  const int64_t row_blocks = ceil_div(R, V), groups = ceil_div(K, M);
  parallel_for(row_blocks * groups, 4, [&](int64_t begin, int64_t end) {
    BlockScratch b;
    b.resize(V, M);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = (blk / groups) * V, c0 = (blk % groups) * M;
      const int rows = int(std::min<int64_t>(V, R - r0));
      const int cols = int(std::min<int64_t>(M, K - c0));
      std::fill(b.nat.begin(), b.nat.end(), 0.0f);  // padding scores are zero
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) b.natural(c)[r] = scores[(r0 + r) * K + c0 + c];
      int sel[4] = {0, 1, 2, 3};
      if (M > kSelectedColumns) best_columns(b, sel);
      // Each row keeps its top 2 of the 4 selected columns, ties to the lower offset.
      for (int r = 0; r < rows; ++r) {
        int i0 = 0, i1 = 1;
        float v[4];
        for (int i = 0; i < 4; ++i) v[i] = b.natural(sel[i])[r];
        if (v[1] > v[0]) std::swap(i0, i1);
        for (int i = 2; i < 4; ++i) {
          if (v[i] > v[i0]) {
            i1 = i0;
            i0 = i;
          } else if (v[i] > v[i1]) {
            i1 = i;
          }
        }
        uint8_t* out = mask + (r0 + r) * K + c0;
        for (int c = 0; c < cols; ++c) out[c] = 0;
        if (sel[i0] < cols) out[sel[i0]] = 1;
        if (sel[i1] < cols) out[sel[i1]] = 1;
      }
    }
  });
}

void select_nm(const float* scores, int64_t R, int64_t K, const Pattern& p, uint8_t* mask) {
  const int N = p.N, M = p.M;
  const int64_t groups = ceil_div(K, M);
  parallel_for(R, 16, [&](int64_t begin, int64_t end) {
    // A group never holds more than K columns: size by that, not by M (N:M allows any M).
    std::vector<int> idx(size_t(std::min<int64_t>(M, K)));
    for (int64_t r = begin; r < end; ++r) {
      const float* row = scores + r * K;
      uint8_t* out = mask + r * K;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * M;
        const int cols = int(std::min<int64_t>(M, K - c0));
        for (int c = 0; c < cols; ++c) out[c0 + c] = 0;
        const int keep = std::min(N, cols);
        std::iota(idx.begin(), idx.begin() + cols, 0);
        std::partial_sort(idx.begin(), idx.begin() + keep, idx.begin() + cols, [&](int x, int y) {
          return row[c0 + x] > row[c0 + y] || (row[c0 + x] == row[c0 + y] && x < y);
        });
        for (int i = 0; i < keep; ++i) out[c0 + idx[i]] = 1;
      }
    }
  });
}

}  // namespace

void select_mask(const float* scores, int64_t R, int64_t K, const Pattern& p, uint8_t* mask) {
  if (R <= 0 || K <= 0) return;
  check_scores(scores, R * K, K);
  if (p.is_vnm())
    select_vnm(scores, R, K, p, mask);
  else
    select_nm(scores, R, K, p, mask);
}

}  // namespace vnm
