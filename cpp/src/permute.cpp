// Channel-permutation search for V:2:M and 2:M masks (see permute.h for the contract).
//
// The objective is a sum of independent block values: block (b, g) holds the V rows in row slots
// [bV, bV + V) and the M columns in column slots [gM, gM + M), and its value is the kept score of
// its exact selection (detail::best_columns, the function select_mask uses). The search keeps the
// permuted matrix transposed (T: one contiguous column of row slots per original column), every
// block's value and its 4 selected columns, and alternates two moves, each of which can only
// raise the total:
//
//  * Column round. The column groups are paired (disjoint pairs, so pairs run in parallel with no
//    locks and the result does not depend on the thread count). For a pair (g1, g2) every swap of
//    a column of g1 with a column of g2 gets a lower bound on its gain from the blocks' current
//    selections alone: after x leaves and y enters, a block can still keep "its set with one
//    member replaced by y", "its set with x replaced by one of its own unselected columns", or
//    (x unselected) its old set. Per row the top two of a set minus one member come from the top
//    three of the set, so all M x M swaps of a pair cost O(M * 4 * V) per block instead of M^2
//    exact re-selections. The best swap with a positive bound is applied and its two groups are
//    re-evaluated exactly (undone if the exact total did not rise), until the pair has no
//    improving swap. For groups of 4 with no column choice (2:4, V:2:4) the pair move is exact
//    and larger instead: the best of the 35 ways to split the pair's 8 columns into two groups
//    (double swaps included). Pairings alternate between a round-robin tournament (every pair
//    once per sweep, so "no swap in a whole sweep" is a local optimum) and pairing the groups
//    that lose the most score with those that lose the least. With segments (e.g. heads),
//    columns only trade places inside their segment.
//  * Row phase (V:2:M with M > 4). With every block's 4 columns fixed, the kept score of row r
//    placed in row block b is v(r, b) = sum_g top2(S[r, selected(b, g)]), and the total is
//    linear in the assignment of rows to blocks, like an assignment step of k-means with blocks
//    of V rows. The best swap of two rows between blocks b1 and b2 is the best leaver of b1
//    towards b2 plus the best leaver of b2 towards b1, so swaps are applied greedily from per
//    block-pair maxima (kept in one max tree per block, so a swap costs O((V + log RB) * RB), not
//    a scan of all RB^2 / 2 block pairs), at most R swaps per phase. Re-selecting the blocks
//    afterwards can only add: the old selections are still valid.
//
// When both moves are exhausted (a local optimum) the search escapes with a few random swaps,
// starting again from the best state found if the last escape did not beat it, until the time
// budget, the round limit or the patience runs out. Inside a round the clock is read every 64
// row swaps, between batches of the row phase's tables and before every column pair; the row
// phase runs on the calling thread and calls the progress callback at those points too (that is
// where Python sees Ctrl-C). A zig-zag dealing of the columns by column sum (each group gets one
// column of every importance band, as in RIA's channel reallocation) is tried as a starting
// point and kept if it beats the identity. The final permutations are checked in double against
// the identity with the selection select_mask makes.
#include "vnm/permute.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "block_select.h"
#include "vnm/parallel.h"

namespace vnm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kLanes = detail::kLanes;
// Rows per block for patterns whose rows do not share columns (2:M, V:2:4): the block is only a
// unit of work and of float summation there.
constexpr int kRowChunk = 64;
// Work (in inner-loop element operations) below which a parallel loop runs on the calling
// thread: starting threads costs more than it saves on small matrices.
constexpr double kMinParallelWork = 2e5;
// Seconds between progress reports (and so between the checks for a pending Ctrl-C in Python).
constexpr double kReportInterval = 0.2;
// Row swaps between looks at the clock and the progress callback inside a row phase.
constexpr int64_t kSwapsPerPoll = 64;
// Element operations between polls in the other long loops of a row phase.
constexpr double kPollWork = 5e7;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

inline float combine(const float acc[kLanes]) {
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// sum_r max(a[r], b[r]) over V rows (V a multiple of kLanes), in fixed lane order.
inline float sum_max(const float* a, const float* b, int V) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int r = 0; r < V; r += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += std::max(a[r + l], b[r + l]);
  return combine(acc);
}

inline float sum_of(const float* a, int V) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int r = 0; r < V; r += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[r + l];
  return combine(acc);
}

// Top two of four, as P + Q with P the largest and Q the second largest.
inline float top2_of4(float a, float b, float c, float d) {
  const float p1 = std::max(a, b), p2 = std::min(a, b);
  const float q1 = std::max(c, d), q2 = std::min(c, d);
  return std::max(p1, q1) + std::max(std::min(p1, q1), std::max(p2, q2));
}

// 64-bit generator with a portable bounded draw (std::uniform_int_distribution and std::shuffle
// differ between standard libraries; the search must not).
struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  int64_t below(int64_t n) { return n <= 1 ? 0 : int64_t(gen() % uint64_t(n)); }
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (int64_t i = int64_t(v.size()) - 1; i > 0; --i) std::swap(v[i], v[below(i + 1)]);
  }
};

struct Geometry {
  int64_t R = 0, K = 0;  // logical shape
  int V = 0;             // rows per block
  int M = 0;             // columns per group
  bool choose = false;   // blocks choose 4 of their M columns (V:2:M, M > 4)
  int set_size = 0;      // columns a block keeps values in: 4 when choose, else M
  int64_t RB = 0, G = 0, Rp = 0, Kp = 0;
};

// Per-thread scratch.
struct Worker {
  detail::BlockScratch bs;
  std::vector<float> t1, t2;         // V: per-row top two (blocks without column choice)
  std::vector<float> u1, u2;         // set_size x V: per-row top two of the set minus member k
  std::vector<float> h;              // (2M) x set_size: lower-bound values per candidate column
  std::vector<double> d1, d2;        // M x M: bound on the gain of each swap, per group
  std::vector<float> vals;           // 2 x RB: exact values of a pair's blocks after a swap
  std::vector<uint8_t> sels;         // 2 x RB x 4
  std::vector<float> a1, a2, a3;     // V: per-row top three of a block's set

  void init(const Geometry& g) {
    bs.resize(g.V, g.M);
    t1.assign(g.V, 0.0f);
    t2.assign(g.V, 0.0f);
    a1.assign(g.V, 0.0f);
    a2.assign(g.V, 0.0f);
    a3.assign(g.V, 0.0f);
    u1.assign(size_t(g.set_size) * g.V, 0.0f);
    u2.assign(size_t(g.set_size) * g.V, 0.0f);
    h.assign(size_t(2 * g.M) * g.set_size, 0.0f);
    d1.assign(size_t(g.M) * g.M, 0.0);
    d2.assign(size_t(g.M) * g.M, 0.0);
    vals.assign(size_t(2 * g.RB), 0.0f);
    sels.assign(size_t(2 * g.RB) * 4, 0);
  }
};

// Values a V:2:M or 2:M pattern keeps in a row of K columns.
int64_t kept_per_row(int64_t K, int M) { return 2 * (K / M) + std::min<int64_t>(2, K % M); }

// Sum (double) over rows of each row's best kept_per_row scores: an upper bound of every valid
// mask, and apex ASP's "50% rows" reference at 2:4.
double unstructured_rows_kept(const float* S, int64_t R, int64_t K, int M) {
  const int64_t keep = kept_per_row(K, M);
  std::vector<double> per_row(R, 0.0);
  parallel_for(R, std::max<int64_t>(1, int64_t(kMinParallelWork / double(K))), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t r = begin; r < end; ++r) {
      std::copy_n(S + size_t(r) * K, K, row.begin());
      std::nth_element(row.begin(), row.begin() + (keep - 1), row.end(), std::greater<float>());
      double sum = 0;
      for (int64_t i = 0; i < keep; ++i) sum += row[i];
      per_row[r] = sum;
    }
  });
  double total = 0;
  for (double x : per_row) total += x;
  return total;
}

// Sum (double) of the R * kept_per_row best scores of the whole matrix: unstructured pruning at
// the pattern's density.
double unstructured_kept(const float* S, int64_t R, int64_t K, int M) {
  const int64_t keep = R * kept_per_row(K, M);
  std::vector<float> all(S, S + size_t(R) * K);
  std::nth_element(all.begin(), all.begin() + (keep - 1), all.end(), std::greater<float>());
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += all[i];
  return total;
}

class Search {
 public:
  Search(const float* S, const Geometry& geo, const PermuteOptions& opt)
      : S_(S), g_(geo), opt_(opt), rng_(opt.seed) {
    col_at_.resize(g_.Kp);
    std::iota(col_at_.begin(), col_at_.end(), int64_t(0));
    row_at_.resize(g_.Rp);
    std::iota(row_at_.begin(), row_at_.end(), int64_t(0));
    T_.assign(size_t(g_.Kp) * g_.Rp, 0.0f);
    val_.assign(size_t(g_.RB) * g_.G, 0.0f);
    sel_.assign(size_t(g_.RB) * g_.G * 4, 0);
    colsum_.assign(g_.Kp, 0.0);
    rows_enabled_ = opt.permute_rows && g_.choose && g_.RB > 1 &&
                    (opt.row_segment == 0 || opt.row_segment > g_.V);
    col_seg_ = opt.col_segment;
    seg_aligned_ = col_seg_ == 0 || col_seg_ % g_.M == 0;
    cols_enabled_ = opt.permute_cols && g_.G > 1 &&
                    (col_seg_ == 0 || (seg_aligned_ ? col_seg_ > g_.M : col_seg_ > 1));
    // Segments made of whole groups are paired inside themselves; otherwise groups are paired
    // globally and only swaps inside one segment are allowed.
    col_seg_groups_ = (col_seg_ > 0 && seg_aligned_) ? col_seg_ / g_.M : g_.G;
    row_seg_blocks_ = g_.choose && opt.row_segment > 0 ? opt.row_segment / g_.V : g_.RB;
    pair_work_ = double(g_.RB) * 2.0 * (2.0 * g_.M) * g_.set_size * g_.V * 2.0;
    block_work_ = g_.choose ? double(g_.V) * 70.0 * 2.0 : double(g_.V) * g_.M * 2.0;
  }

  PermuteResult run(const PermuteCallback& progress);

 private:
  // ---- state -----------------------------------------------------------------------------
  const float* column(int64_t slot) const { return T_.data() + size_t(col_at_[slot]) * g_.Rp; }
  bool real_col_slot(int64_t slot) const { return col_at_[slot] < g_.K; }
  bool real_row_slot(int64_t slot) const { return row_at_[slot] < g_.R; }
  // Whether the columns in two slots may trade places (they sit in the same segment).
  bool same_segment(int64_t a, int64_t b) const { return col_seg_ == 0 || a / col_seg_ == b / col_seg_; }
  // Whether any column of g1 may trade places with a column of g2.
  bool groups_share_segment(int64_t g1, int64_t g2) const {
    if (col_seg_ == 0) return true;
    const int64_t M = g_.M;
    return g1 * M / col_seg_ <= (g2 * M + M - 1) / col_seg_ &&
           g2 * M / col_seg_ <= (g1 * M + M - 1) / col_seg_;
  }
  bool budget_spent() const { return seconds_since(t0_) >= opt_.time_budget_s; }
  float& val(int64_t b, int64_t g) { return val_[size_t(b) * g_.G + g]; }
  uint8_t* sel(int64_t b, int64_t g) { return sel_.data() + (size_t(b) * g_.G + g) * 4; }

  void load_T();
  float eval_block(int64_t b, int64_t g, Worker& w, uint8_t* sel_out);
  void eval_all();
  void eval_row_blocks(const std::vector<char>& changed);
  double sum_values() const;
  void swap_row_slots(int64_t s1, int64_t s2);

  // ---- moves -----------------------------------------------------------------------------
  void snake_columns();
  void pair_bounds(int64_t g, int64_t other, Worker& w, double* d);
  double improve_pair(int64_t g1, int64_t g2, Worker& w);
  bool best_split(int64_t g1, int64_t g2, double tol, Worker& w, int64_t* new_slots);
  double column_round(const std::vector<std::pair<int64_t, int64_t>>& pairs);
  std::vector<std::pair<int64_t, int64_t>> tournament_pairs();
  std::vector<std::pair<int64_t, int64_t>> loss_pairs();
  int64_t row_phase(const std::function<bool()>& keep_going);
  void escape();

  const float* S_;
  Geometry g_;
  PermuteOptions opt_;
  Rng rng_;
  Clock::time_point t0_;          // start of run()
  std::vector<float> T_;          // Kp x Rp: T_[c * Rp + s] = score of (row at slot s, column c)
  std::vector<int64_t> col_at_;   // column slot -> column (>= K: a zero padding column)
  std::vector<int64_t> row_at_;   // row slot -> row (>= R: a zero padding row)
  std::vector<float> val_;        // RB x G block values
  std::vector<uint8_t> sel_;      // RB x G x 4 selected offsets (blocks with column choice)
  std::vector<double> colsum_;    // per column: sum over rows (the score a group holds)
  double total_ = 0;
  bool rows_enabled_ = false, cols_enabled_ = false;
  int64_t col_seg_ = 0;  // columns per segment (0: no segments)
  bool seg_aligned_ = true;  // segments are made of whole column groups
  int64_t col_seg_groups_ = 0, row_seg_blocks_ = 0;
  double pair_work_ = 0, block_work_ = 0;
  // tournament state: shuffled group labels per segment and the next round of the sweep
  std::vector<int64_t> tour_;
  int64_t tour_round_ = 0, tour_rounds_ = 0;
  bool sweep_improved_ = false;
};

// ---- state ---------------------------------------------------------------------------------

void Search::load_T() {
  // Tiles of 64 rows x 64 columns keep both the reads of S and the writes of T in cache.
  const int64_t tile = 64;
  const int64_t col_tiles = ceil_div(g_.K, tile);
  const float* S = S_;
  parallel_for(col_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ct = begin; ct < end; ++ct) {
      const int64_t c0 = ct * tile, c1 = std::min(g_.K, c0 + tile);
      for (int64_t s0 = 0; s0 < g_.Rp; s0 += tile) {
        const int64_t s1 = std::min(g_.Rp, s0 + tile);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t r = row_at_[s];
          for (int64_t c = c0; c < c1; ++c)
            T_[size_t(c) * g_.Rp + s] = r < g_.R ? S[size_t(r) * g_.K + c] : 0.0f;
        }
      }
    }
  });
}

float Search::eval_block(int64_t b, int64_t g, Worker& w, uint8_t* sel_out) {
  const int V = g_.V, M = g_.M;
  const int64_t r0 = b * V;
  if (g_.choose) {
    for (int j = 0; j < M; ++j) std::copy_n(column(g * M + j) + r0, V, w.bs.natural(j));
    int best[4];
    const float value = detail::best_columns(w.bs, best);
    for (int k = 0; k < 4; ++k) sel_out[k] = uint8_t(best[k]);
    return value;
  }
  float* t1 = w.t1.data();
  float* t2 = w.t2.data();
  std::fill_n(t1, V, 0.0f);  // scores are >= 0 and M >= 2, so zeros never survive as a top two
  std::fill_n(t2, V, 0.0f);
  for (int j = 0; j < M; ++j) {
    const float* x = column(g * M + j) + r0;
    for (int r = 0; r < V; ++r) {
      const float lo = std::min(x[r], t1[r]);
      t1[r] = std::max(x[r], t1[r]);
      t2[r] = std::max(t2[r], lo);
    }
  }
  for (int k = 0; k < 4; ++k) sel_out[k] = uint8_t(k);
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int r = 0; r < V; r += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += t1[r + l] + t2[r + l];
  return combine(acc);
}

void Search::eval_all() {
  const int64_t n = g_.RB * g_.G;
  const int64_t grain = std::max<int64_t>(1, int64_t(kMinParallelWork / block_work_));
  parallel_for(n, grain, [&](int64_t begin, int64_t end) {
    Worker w;
    w.init(g_);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / g_.G, g = i % g_.G;
      val(b, g) = eval_block(b, g, w, sel(b, g));
    }
  });
  total_ = sum_values();
}

void Search::eval_row_blocks(const std::vector<char>& changed) {
  std::vector<int64_t> blocks;
  for (int64_t b = 0; b < g_.RB; ++b)
    if (changed[b]) blocks.push_back(b);
  const int64_t n = int64_t(blocks.size()) * g_.G;
  const int64_t grain = std::max<int64_t>(1, int64_t(kMinParallelWork / block_work_));
  parallel_for(n, grain, [&](int64_t begin, int64_t end) {
    Worker w;
    w.init(g_);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = blocks[i / g_.G], g = i % g_.G;
      val(b, g) = eval_block(b, g, w, sel(b, g));
    }
  });
  total_ = sum_values();
}

double Search::sum_values() const {
  double t = 0;
  for (float v : val_) t += double(v);
  return t;
}

void Search::swap_row_slots(int64_t s1, int64_t s2) {
  std::swap(row_at_[s1], row_at_[s2]);
  for (int64_t c = 0; c < g_.Kp; ++c) {
    float* col = T_.data() + size_t(c) * g_.Rp;
    std::swap(col[s1], col[s2]);
  }
}

// ---- column moves --------------------------------------------------------------------------

void Search::snake_columns() {
  // Deal the real columns, by descending column sum, over the groups of each segment in
  // alternating direction: every group gets one column of each importance band.
  const int64_t seg_groups = col_seg_groups_;
  for (int64_t g0 = 0; g0 < g_.G; g0 += seg_groups) {
    const int64_t g1 = std::min(g_.G, g0 + seg_groups);
    std::vector<int64_t> cols;
    for (int64_t slot = g0 * g_.M; slot < g1 * g_.M; ++slot)
      if (real_col_slot(slot)) cols.push_back(col_at_[slot]);
    std::stable_sort(cols.begin(), cols.end(),
                     [&](int64_t a, int64_t b) { return colsum_[a] > colsum_[b]; });
    std::vector<int64_t> fill(g1 - g0, 0);
    std::vector<int64_t> cap(g1 - g0, 0);
    for (int64_t g = g0; g < g1; ++g)
      for (int j = 0; j < g_.M; ++j) cap[g - g0] += real_col_slot(g * g_.M + j) ? 1 : 0;
    size_t next = 0;
    for (int64_t band = 0; next < cols.size(); ++band) {
      for (int64_t i = 0; i < g1 - g0 && next < cols.size(); ++i) {
        const int64_t gi = (band % 2 == 0) ? i : (g1 - g0 - 1 - i);
        if (fill[gi] < cap[gi]) {
          col_at_[(g0 + gi) * g_.M + fill[gi]] = cols[next++];
          ++fill[gi];
        }
      }
    }
  }
}

// d[i * M + j]: lower bound, summed over the row blocks, of the change in group g's kept score
// when its slot i gives its column away and receives the column in slot j of group `other`.
void Search::pair_bounds(int64_t g, int64_t other, Worker& w, double* d) {
  const int V = g_.V, M = g_.M, s = g_.set_size;
  std::fill_n(d, size_t(M) * M, 0.0);
  float* h = w.h.data();  // h[z * s + k]: kept score of (set - member k + candidate z)
  for (int64_t b = 0; b < g_.RB; ++b) {
    const int64_t r0 = b * V;
    const float f = val(b, g);
    int members[kMaxM];
    int member_of_slot[kMaxM];
    std::fill_n(member_of_slot, M, -1);
    if (g_.choose) {
      const uint8_t* sl = sel(b, g);
      for (int k = 0; k < 4; ++k) members[k] = sl[k];
    } else {
      for (int k = 0; k < M; ++k) members[k] = k;
    }
    for (int k = 0; k < s; ++k) member_of_slot[members[k]] = k;
    // Per row, the top three a1 >= a2 >= a3 of the set give the top two of the set minus any
    // member k (u1_k, u2_k).
    const float* xs[kMaxM];
    for (int k = 0; k < s; ++k) xs[k] = column(g * M + members[k]) + r0;
    // Column by column over all rows with min and max only (the loops vectorise). Values
    // decide which of the top three a member holds: removing a member whose value is >= a1
    // leaves (a2, a3), one >= a2 leaves (a1, a3), any other (a1, a2); with ties either reading
    // gives the same values.
    float* __restrict a1 = w.a1.data();
    float* __restrict a2 = w.a2.data();
    float* __restrict a3 = w.a3.data();
    std::fill_n(a1, V, -1.0f);
    std::fill_n(a2, V, -1.0f);
    std::fill_n(a3, V, -1.0f);
    for (int k = 0; k < s; ++k) {
      const float* __restrict x = xs[k];
      for (int r = 0; r < V; ++r) {
        const float xr = x[r], b1 = a1[r], b2 = a2[r];
        a3[r] = std::max(a3[r], std::min(b2, xr));
        a2[r] = std::max(b2, std::min(b1, xr));
        a1[r] = std::max(b1, xr);
      }
    }
    for (int k = 0; k < s; ++k) {
      const float* __restrict x = xs[k];
      float* __restrict o1 = w.u1.data() + size_t(k) * V;
      float* __restrict o2 = w.u2.data() + size_t(k) * V;
      for (int r = 0; r < V; ++r) {
        // loads before the selects: a conditional load would keep the loop scalar
        const float xr = x[r], b1 = a1[r], b2 = a2[r], b3 = a3[r];
        o1[r] = xr >= b1 ? b2 : b1;
        o2[r] = xr >= b2 ? b3 : b2;
      }
    }
    float U1[kMaxM];
    for (int k = 0; k < s; ++k) U1[k] = sum_of(w.u1.data() + size_t(k) * V, V);
    // Candidates: the M columns of `other` (z = j) and this group's unselected columns
    // (z = M + slot), which the block may pick instead of a member that leaves.
    for (int j = 0; j < M; ++j) {
      const float* y = column(other * M + j) + r0;
      for (int k = 0; k < s; ++k) h[j * s + k] = U1[k] + sum_max(w.u2.data() + size_t(k) * V, y, V);
    }
    float drop[kMaxM];  // lower bound of the block's kept score without member k
    if (g_.choose) {
      for (int k = 0; k < s; ++k) drop[k] = 0.0f;
      for (int slot = 0; slot < M; ++slot) {
        if (member_of_slot[slot] >= 0) continue;
        const float* y = column(g * M + slot) + r0;
        for (int k = 0; k < s; ++k)
          drop[k] = std::max(drop[k], U1[k] + sum_max(w.u2.data() + size_t(k) * V, y, V));
      }
    }
    for (int i = 0; i < M; ++i) {
      const int k = member_of_slot[i];
      double* di = d + size_t(i) * M;
      if (!g_.choose) {
        for (int j = 0; j < M; ++j) di[j] += double(h[j * s + k]) - double(f);
      } else if (k >= 0) {
        for (int j = 0; j < M; ++j) di[j] += double(std::max(h[j * s + k], drop[k])) - double(f);
      } else {
        for (int j = 0; j < M; ++j) {
          float lb = f;
          for (int kk = 0; kk < s; ++kk) lb = std::max(lb, h[j * s + kk]);
          di[j] += double(lb) - double(f);
        }
      }
    }
  }
}

// Improves the pair (g1, g2) by column swaps until no swap has a positive bound; returns the
// exact gain. Touches only the two groups' slots, values and selections.
double Search::improve_pair(int64_t g1, int64_t g2, Worker& w) {
  const int M = g_.M;
  const int64_t RB = g_.RB;
  // Groups of 4 columns with no column choice (2:4, V:2:4): all 35 ways to split the pair's 8
  // columns into two groups are cheap to score exactly, and they include the double swaps that
  // single swaps cannot reach.
  const bool split_pairs = !g_.choose && M == 4 && seg_aligned_ && real_col_slot(g1 * M + 3) &&
                           real_col_slot(g2 * M + 3);
  if (!groups_share_segment(g1, g2)) return 0.0;
  double gained = 0;
  for (int iter = 0; iter < 2 * M; ++iter) {
    double pair_value = 0;
    for (int64_t b = 0; b < RB; ++b) pair_value += double(val(b, g1)) + double(val(b, g2));
    // Float sums of V-row blocks: gains below this are rounding, not improvement.
    const double tol = 1e-6 * pair_value + 1e-30;
    int64_t new_slots[2 * kMaxM];
    bool found = false;
    if (split_pairs) {
      found = best_split(g1, g2, tol, w, new_slots);
    } else {
      pair_bounds(g1, g2, w, w.d1.data());
      pair_bounds(g2, g1, w, w.d2.data());
      double best = tol;
      int bi = -1, bj = -1;
      for (int i = 0; i < M; ++i) {
        if (!real_col_slot(g1 * M + i)) continue;
        for (int j = 0; j < M; ++j) {
          if (!real_col_slot(g2 * M + j) || !same_segment(g1 * M + i, g2 * M + j)) continue;
          const double gain = w.d1[size_t(i) * M + j] + w.d2[size_t(j) * M + i];
          if (gain > best) {
            best = gain;
            bi = i;
            bj = j;
          }
        }
      }
      if (bi >= 0) {
        found = true;
        for (int i = 0; i < M; ++i) {
          new_slots[i] = col_at_[g1 * M + i];
          new_slots[M + i] = col_at_[g2 * M + i];
        }
        std::swap(new_slots[bi], new_slots[M + bj]);
      }
    }
    if (!found) break;
    int64_t old_slots[2 * kMaxM];
    for (int i = 0; i < M; ++i) {
      old_slots[i] = col_at_[g1 * M + i];
      old_slots[M + i] = col_at_[g2 * M + i];
      col_at_[g1 * M + i] = new_slots[i];
      col_at_[g2 * M + i] = new_slots[M + i];
    }
    double delta = 0;
    for (int64_t b = 0; b < RB; ++b) {
      w.vals[b] = eval_block(b, g1, w, &w.sels[size_t(b) * 4]);
      w.vals[RB + b] = eval_block(b, g2, w, &w.sels[size_t(RB + b) * 4]);
      delta += double(w.vals[b]) - double(val(b, g1)) + double(w.vals[RB + b]) - double(val(b, g2));
    }
    if (!(delta > 0)) {  // the estimate was rounding noise: undo and stop
      for (int i = 0; i < M; ++i) {
        col_at_[g1 * M + i] = old_slots[i];
        col_at_[g2 * M + i] = old_slots[M + i];
      }
      break;
    }
    for (int64_t b = 0; b < RB; ++b) {
      val(b, g1) = w.vals[b];
      val(b, g2) = w.vals[RB + b];
      std::copy_n(&w.sels[size_t(b) * 4], 4, sel(b, g1));
      std::copy_n(&w.sels[size_t(RB + b) * 4], 4, sel(b, g2));
    }
    gained += delta;
  }
  return gained;
}

// The best of the 35 splits of two full groups of 4 (no column choice) into two groups, scored
// exactly; writes the new slot contents (g1's 4 then g2's 4) and returns true if it beats the
// current split by more than `tol`.
bool Search::best_split(int64_t g1, int64_t g2, double tol, Worker& w, int64_t* new_slots) {
  const int V = g_.V;
  const float* cols[8];
  int64_t ids[8];
  for (int i = 0; i < 4; ++i) {
    ids[i] = col_at_[g1 * 4 + i];
    ids[4 + i] = col_at_[g2 * 4 + i];
  }
  for (int i = 0; i < 8; ++i) cols[i] = T_.data() + size_t(ids[i]) * g_.Rp;
  // splits: 4-subsets of the 8 columns that contain column 0 (the rest is the other group)
  int splits[35][4];
  int n = 0;
  for (int a = 1; a < 8; ++a)
    for (int b = a + 1; b < 8; ++b)
      for (int c = b + 1; c < 8; ++c) {
        splits[n][0] = 0;
        splits[n][1] = a;
        splits[n][2] = b;
        splits[n][3] = c;
        ++n;
      }
  double value[35];
  for (int k = 0; k < 35; ++k) {
    int other[4], m = 0;
    for (int i = 0; i < 8; ++i)
      if (i != splits[k][0] && i != splits[k][1] && i != splits[k][2] && i != splits[k][3])
        other[m++] = i;
    double v = 0;
    for (int64_t b = 0; b < g_.RB; ++b) {
      const int64_t r0 = b * V;
      const float *x0 = cols[splits[k][0]] + r0, *x1 = cols[splits[k][1]] + r0,
                  *x2 = cols[splits[k][2]] + r0, *x3 = cols[splits[k][3]] + r0;
      const float *y0 = cols[other[0]] + r0, *y1 = cols[other[1]] + r0, *y2 = cols[other[2]] + r0,
                  *y3 = cols[other[3]] + r0;
      float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int r = 0; r < V; r += kLanes)
        for (int l = 0; l < kLanes; ++l)
          acc[l] += top2_of4(x0[r + l], x1[r + l], x2[r + l], x3[r + l]) +
                    top2_of4(y0[r + l], y1[r + l], y2[r + l], y3[r + l]);
      v += double(combine(acc));
    }
    value[k] = v;
  }
  (void)w;
  // split 0 is {0, 1, 2, 3}: the current one
  int best = 0;
  for (int k = 1; k < 35; ++k)
    if (value[k] > value[best]) best = k;
  if (!(value[best] - value[0] > tol)) return false;
  int m = 0, o = 4;
  for (int i = 0; i < 8; ++i) {
    const bool in = i == splits[best][0] || i == splits[best][1] || i == splits[best][2] ||
                    i == splits[best][3];
    new_slots[in ? m++ : o++] = ids[i];
  }
  return true;
}

double Search::column_round(const std::vector<std::pair<int64_t, int64_t>>& pairs) {
  std::vector<double> gains(pairs.size(), 0.0);
  const int64_t grain = std::max<int64_t>(1, int64_t(kMinParallelWork / pair_work_));
  parallel_for(int64_t(pairs.size()), grain, [&](int64_t begin, int64_t end) {
    Worker w;
    w.init(g_);
    for (int64_t i = begin; i < end; ++i) {
      // Past the budget the remaining pairs stay as they are: a round on a large matrix takes
      // seconds, and a result the budget ends depends on timing anyway.
      if (budget_spent()) break;
      gains[i] = improve_pair(pairs[i].first, pairs[i].second, w);
    }
  });
  double gained = 0;
  for (double x : gains) gained += x;
  total_ = sum_values();
  return gained;
}

// One round of a round-robin tournament inside every column segment (circle method: every pair
// of groups meets once per sweep); the group labels are reshuffled at the start of each sweep.
std::vector<std::pair<int64_t, int64_t>> Search::tournament_pairs() {
  const int64_t n = col_seg_groups_;
  const int64_t n_even = n + (n & 1);
  if (tour_round_ == 0) {
    tour_.resize(g_.G);
    std::iota(tour_.begin(), tour_.end(), int64_t(0));
    for (int64_t g0 = 0; g0 < g_.G; g0 += n) {
      std::vector<int64_t> seg(tour_.begin() + g0, tour_.begin() + std::min(g_.G, g0 + n));
      rng_.shuffle(seg);
      std::copy(seg.begin(), seg.end(), tour_.begin() + g0);
    }
    tour_rounds_ = n_even - 1;
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  const int64_t t = tour_round_;
  for (int64_t g0 = 0; g0 < g_.G; g0 += n) {
    const int64_t len = std::min(n, g_.G - g0);  // every segment has n groups (checked)
    auto add = [&](int64_t a, int64_t b) {
      if (a < len && b < len) pairs.emplace_back(tour_[g0 + a], tour_[g0 + b]);
    };
    add(t % (n_even - 1), n_even - 1);
    for (int64_t i = 1; i < n_even / 2; ++i)
      add((t + i) % (n_even - 1), (t - i + (n_even - 1)) % (n_even - 1));
  }
  tour_round_ = (tour_round_ + 1) % tour_rounds_;
  return pairs;
}

// Pairs, inside every segment, the group that loses the most score with the one that loses the
// least, the second most with the second least, and so on: a group that drops strong columns
// meets one whose selected columns are weak.
std::vector<std::pair<int64_t, int64_t>> Search::loss_pairs() {
  const int64_t n = col_seg_groups_;
  std::vector<double> loss(g_.G, 0.0);
  for (int64_t g = 0; g < g_.G; ++g) {
    double mass = 0, kept = 0;
    for (int j = 0; j < g_.M; ++j) mass += colsum_[col_at_[g * g_.M + j]];
    for (int64_t b = 0; b < g_.RB; ++b) kept += double(val(b, g));
    loss[g] = mass - kept;
  }
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t g0 = 0; g0 < g_.G; g0 += n) {
    std::vector<int64_t> order(std::min(n, g_.G - g0));
    std::iota(order.begin(), order.end(), g0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return loss[a] > loss[b]; });
    for (size_t i = 0, j = order.size() - 1; i < j; ++i, --j) pairs.emplace_back(order[i], order[j]);
  }
  return pairs;
}

// ---- row moves -----------------------------------------------------------------------------

int64_t Search::row_phase(const std::function<bool()>& keep_going) {
  const int V = g_.V;
  const int64_t RB = g_.RB, G = g_.G, Rp = g_.Rp;
  // v[s * RB + b]: kept score of the row in slot s if it sat in row block b (selections fixed).
  std::vector<float> v(size_t(Rp) * RB, 0.0f);
  const int64_t chunk = 64;
  const int64_t chunks = ceil_div(Rp, chunk);
  const double chunk_work = double(chunk) * RB * G * 8.0;
  auto fill_chunks = [&](int64_t first, int64_t begin, int64_t end) {
    std::vector<float> acc(size_t(RB) * chunk);
    for (int64_t ch = first + begin; ch < first + end; ++ch) {
      const int64_t s0 = ch * chunk, n = std::min(chunk, Rp - s0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t b = 0; b < RB; ++b) {
          const uint8_t* sl = sel(b, g);
          const float* c0 = column(g * g_.M + sl[0]) + s0;
          const float* c1 = column(g * g_.M + sl[1]) + s0;
          const float* c2 = column(g * g_.M + sl[2]) + s0;
          const float* c3 = column(g * g_.M + sl[3]) + s0;
          float* a = acc.data() + size_t(b) * chunk;
          for (int64_t r = 0; r < n; ++r) a[r] += top2_of4(c0[r], c1[r], c2[r], c3[r]);
        }
      }
      for (int64_t r = 0; r < n; ++r)
        for (int64_t b = 0; b < RB; ++b) v[size_t(s0 + r) * RB + b] = acc[size_t(b) * chunk + r];
    }
  };
  // v costs Rp * RB * G, quadratic in the rows: computed in batches of chunks with a poll
  // between them. An interrupted phase changes nothing.
  const int64_t grain = std::max<int64_t>(1, int64_t(kMinParallelWork / chunk_work));
  const int64_t batch =
      std::max<int64_t>(2 * int64_t(num_threads()), int64_t(kPollWork / chunk_work));
  for (int64_t first = 0; first < chunks; first += batch) {
    if (first > 0 && !keep_going()) return 0;
    parallel_for(std::min(batch, chunks - first), grain,
                 [&](int64_t begin, int64_t end) { fill_chunks(first, begin, end); });
  }

  // out[b1 * RB + b2]: best gain of moving one row of b1 to b2 (-inf: b1 holds no real row).
  std::vector<float> out(size_t(RB) * RB, 0.0f);
  auto refresh = [&](int64_t b1) {
    float* __restrict o = out.data() + size_t(b1) * RB;
    std::fill_n(o, RB, -std::numeric_limits<float>::infinity());
    for (int64_t s = b1 * V; s < (b1 + 1) * V; ++s) {
      if (!real_row_slot(s)) continue;
      const float* __restrict vs = v.data() + size_t(s) * RB;
      const float here = vs[b1];
      for (int64_t b2 = 0; b2 < RB; ++b2) o[b2] = std::max(o[b2], vs[b2] - here);
    }
  };
  // The row that leaves b1 for b2: the first real slot of b1 whose gain is out[b1][b2] (the
  // same float expression as in refresh, so the comparison is exact).
  auto leaver = [&](int64_t b1, int64_t b2) {
    for (int64_t s = b1 * V; s < (b1 + 1) * V; ++s) {
      if (!real_row_slot(s)) continue;
      const float* vs = v.data() + size_t(s) * RB;
      if (vs[b2] - vs[b1] == out[b1 * RB + b2]) return s;
    }
    return int64_t(-1);  // unreachable: out[b1][b2] is the gain of one of these slots
  };
  for (int64_t b = 0; b < RB; ++b) refresh(b);

  // The best swap is the pair b1 < b2 (same segment) of largest gain(b1, b2) = out[b1][b2] +
  // out[b2][b1], the first in (b1, b2) order on ties. A swap changes only the pairs that involve
  // its two blocks, so every row b1 keeps a max tree over its partners b2 (leftmost maximum on
  // ties): a swap rebuilds the two blocks' trees and updates one leaf in each other tree,
  // O(RB log RB) instead of a scan of all RB^2 / 2 pairs, with the same picks. Memory: 12 bytes
  // x RB x 2P (P the power of two >= RB), below 48 bytes x RB^2; v takes 4 bytes x V x RB^2.
  const int64_t seg = row_seg_blocks_;
  int64_t P = 1;
  while (P < RB) P *= 2;
  std::vector<double> tree_val(size_t(RB) * 2 * P);
  std::vector<int32_t> tree_arg(size_t(RB) * 2 * P);
  auto pair_gain = [&](int64_t b1, int64_t b2) {
    const int64_t seg_end = std::min(RB, (b1 / seg + 1) * seg);
    if (b2 <= b1 || b2 >= seg_end) return -std::numeric_limits<double>::infinity();
    // a block without a real row has out = -inf: such pairs are never picked
    return double(out[b1 * RB + b2]) + double(out[b2 * RB + b1]);
  };
  // Recomputes a node from its children; returns whether it changed.
  auto pull = [&](double* tv, int32_t* ta, int64_t node) {
    const int64_t l = 2 * node, r = l + 1;
    const bool left = tv[l] >= tv[r];
    const double value = left ? tv[l] : tv[r];
    const int32_t at = left ? ta[l] : ta[r];
    const bool changed = value != tv[node] || at != ta[node];
    tv[node] = value;
    ta[node] = at;
    return changed;
  };
  auto build_tree = [&](int64_t b1) {
    double* tv = tree_val.data() + size_t(b1) * 2 * P;
    int32_t* ta = tree_arg.data() + size_t(b1) * 2 * P;
    for (int64_t b2 = 0; b2 < P; ++b2) {
      tv[P + b2] = b2 < RB ? pair_gain(b1, b2) : -std::numeric_limits<double>::infinity();
      ta[P + b2] = int32_t(b2);
    }
    for (int64_t node = P - 1; node >= 1; --node) pull(tv, ta, node);
  };
  auto update_tree = [&](int64_t b1, int64_t b2) {
    double* tv = tree_val.data() + size_t(b1) * 2 * P;
    int32_t* ta = tree_arg.data() + size_t(b1) * 2 * P;
    const double leaf = pair_gain(b1, b2);
    if (leaf == tv[P + b2]) return;
    tv[P + b2] = leaf;
    // an ancestor whose winner did not change leaves all above it as they were
    for (int64_t node = (P + b2) / 2; node >= 1 && pull(tv, ta, node); node /= 2) {
    }
  };
  for (int64_t b = 0; b < RB; ++b) build_tree(b);

  const double tol = 1e-6 * total_ / double(std::max<int64_t>(1, g_.R));
  std::vector<std::pair<int64_t, int64_t>> moves;
  std::vector<char> changed(RB, 0);
  for (int64_t it = 0; it < g_.R; ++it) {
    // The clock and the progress callback (where Python raises a pending Ctrl-C) are seen every
    // kSwapsPerPoll swaps: a tall matrix makes thousands of them in one phase.
    if (it > 0 && it % kSwapsPerPoll == 0 && !keep_going()) break;
    double best = tol;
    int64_t bb1 = -1, bb2 = -1;
    for (int64_t b1 = 0; b1 < RB; ++b1) {
      const double gain = tree_val[size_t(b1) * 2 * P + 1];
      if (gain > best) {
        best = gain;
        bb1 = b1;
        bb2 = tree_arg[size_t(b1) * 2 * P + 1];
      }
    }
    if (bb1 < 0) break;
    const int64_t s1 = leaver(bb1, bb2), s2 = leaver(bb2, bb1);
    std::swap(row_at_[s1], row_at_[s2]);
    std::swap_ranges(v.begin() + s1 * RB, v.begin() + (s1 + 1) * RB, v.begin() + s2 * RB);
    moves.emplace_back(s1, s2);
    changed[bb1] = changed[bb2] = 1;
    refresh(bb1);
    refresh(bb2);
    build_tree(bb1);
    build_tree(bb2);
    // bb1 < bb2 share a segment; only rows before bb2 in it have them as partners
    for (int64_t b1 = (bb1 / seg) * seg; b1 < bb2; ++b1) {
      if (b1 == bb1) continue;
      if (b1 < bb1) update_tree(b1, bb1);
      update_tree(b1, bb2);
    }
  }
  if (moves.empty()) return 0;
  // Move the rows in T (row_at_ already holds the new order), then re-select the changed blocks.
  // new slot s holds what old slot src[s] held: the swaps, in order, applied to the identity
  std::vector<int64_t> src(Rp);
  std::iota(src.begin(), src.end(), int64_t(0));
  for (const auto& m : moves) std::swap(src[m.first], src[m.second]);
  parallel_for(g_.Kp, std::max<int64_t>(1, int64_t(kMinParallelWork / double(Rp))),
               [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(Rp);
    for (int64_t c = begin; c < end; ++c) {
      float* col = T_.data() + size_t(c) * Rp;
      std::copy_n(col, Rp, tmp.data());
      for (int64_t s = 0; s < Rp; ++s) col[s] = tmp[src[s]];
    }
  });
  const double before = total_;
  std::vector<float> old_val(val_);
  std::vector<uint8_t> old_sel(sel_);
  eval_row_blocks(changed);
  if (!(total_ > before)) {  // rounding noise only: undo the swaps, last first
    for (auto it = moves.rbegin(); it != moves.rend(); ++it) swap_row_slots(it->first, it->second);
    val_ = old_val;
    sel_ = old_sel;
    total_ = before;
    return 0;
  }
  return int64_t(moves.size());
}

// ---- escapes -------------------------------------------------------------------------------

void Search::escape() {
  const int M = g_.M;
  std::vector<char> changed_rows(g_.RB, 0);
  bool any_rows = false;
  if (cols_enabled_) {
    const int64_t n = 1 + rng_.below(3);
    std::vector<char> changed(g_.G, 0);
    for (int64_t t = 0; t < n; ++t) {
      // a random real column and a random real column of another group of the same segment
      const int64_t s1 = rng_.below(g_.K);
      const int64_t g1 = s1 / M;
      const int64_t seg = col_seg_ > 0 ? col_seg_ : g_.K;
      const int64_t seg0 = (s1 / seg) * seg;
      const int64_t s2 = seg0 + rng_.below(std::min(seg, g_.K - seg0));
      if (s2 / M == g1 || !real_col_slot(s1) || !real_col_slot(s2)) continue;
      std::swap(col_at_[s1], col_at_[s2]);
      changed[g1] = changed[s2 / M] = 1;
    }
    Worker w;
    w.init(g_);
    for (int64_t g = 0; g < g_.G; ++g)
      if (changed[g])
        for (int64_t b = 0; b < g_.RB; ++b) val(b, g) = eval_block(b, g, w, sel(b, g));
  }
  if (rows_enabled_) {
    const int64_t n = 1 + rng_.below(3);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t s1 = rng_.below(g_.R);
      const int64_t b1 = s1 / g_.V;
      const int64_t seg0 = (b1 / row_seg_blocks_) * row_seg_blocks_;
      const int64_t seg_rows = std::min(g_.RB, seg0 + row_seg_blocks_) * g_.V - seg0 * g_.V;
      const int64_t s2 = seg0 * g_.V + rng_.below(seg_rows);
      if (s2 / g_.V == b1 || !real_row_slot(s1) || !real_row_slot(s2)) continue;
      swap_row_slots(s1, s2);
      changed_rows[b1] = changed_rows[s2 / g_.V] = 1;
      any_rows = true;
    }
  }
  if (any_rows) eval_row_blocks(changed_rows);
  total_ = sum_values();
}

PermuteResult Search::run(const PermuteCallback& progress) {
  t0_ = Clock::now();
  const auto t0 = t0_;
  PermuteResult res;
  load_T();
  for (int64_t c = 0; c < g_.K; ++c) {
    const float* col = T_.data() + size_t(c) * g_.Rp;
    double s = 0;
    for (int64_t r = 0; r < g_.Rp; ++r) s += col[r];
    colsum_[c] = s;
  }
  // No mask keeps more than every row's own best 2 per group: reaching that bound is optimal.
  const double row_bound = unstructured_rows_kept(S_, g_.R, g_.K, g_.M);
  res.kept_unstructured_rows = row_bound;
  eval_all();
  const double identity_total = total_;
  // float block sums carry relative rounding of about 1e-7
  auto optimal = [&](double value) { return value >= row_bound * (1.0 - 1e-6); };
  std::vector<int64_t> best_cols = col_at_, best_rows = row_at_;
  double best_total = total_;
  if (cols_enabled_ && seg_aligned_) {
    std::vector<float> identity_val(val_);
    std::vector<uint8_t> identity_sel(sel_);
    snake_columns();
    eval_all();
    if (total_ > best_total) {
      best_total = total_;
      best_cols = col_at_;
    } else {
      col_at_ = best_cols;
      val_.swap(identity_val);
      sel_.swap(identity_sel);
      total_ = best_total;
    }
  }

  PermuteProgress pr;
  pr.time_budget_s = opt_.time_budget_s;
  pr.kept_identity = identity_total;
  auto report = [&]() {
    pr.elapsed_s = seconds_since(t0);
    pr.rounds = res.rounds;
    pr.escapes = res.escapes;
    pr.kept_best = best_total;
    return progress ? progress(pr) : true;
  };
  bool go = report();
  double last_report = 0;
  auto maybe_report = [&]() {
    const double now = seconds_since(t0);
    if (go && now - last_report >= kReportInterval) {
      last_report = now;
      go = report();
    }
  };
  // Polled from inside long phases: false once the budget is spent or the callback said stop.
  auto keep_going = [&]() {
    maybe_report();
    return go && !budget_spent();
  };

  // Rows are re-assigned about as often as their cost allows: a row phase costs about as much
  // as `row_interval` column rounds. After a phase with no move, rows wait twice as long.
  const double row_work = double(g_.Rp) * g_.RB * g_.G * 8.0 + double(g_.RB) * g_.G * block_work_;
  const double round_work = pair_work_ * double(std::max<int64_t>(1, g_.G / 2)) * 2.0;
  const int64_t base_interval =
      cols_enabled_ ? std::max<int64_t>(1, int64_t(std::llround(row_work / round_work))) : 0;
  int64_t row_interval = base_interval, since_rows = base_interval;  // rows first
  bool cols_converged = !cols_enabled_, rows_converged = !rows_enabled_;
  bool use_loss_pairs = false;
  int64_t stale_escapes = 0;
  const bool anything = cols_enabled_ || rows_enabled_;

  while (go && anything) {
    if (optimal(best_total) || optimal(total_)) {
      res.converged = true;
      break;
    }
    if (budget_spent()) break;
    if (opt_.max_rounds > 0 && res.rounds >= opt_.max_rounds) break;
    if (cols_converged && rows_converged) {
      res.converged = true;
      if (total_ > best_total) {
        best_total = total_;
        best_cols = col_at_;
        best_rows = row_at_;
        stale_escapes = 0;
      } else {
        ++stale_escapes;
      }
      if (opt_.patience >= 0 && stale_escapes > opt_.patience) break;
      if (total_ < best_total) {  // restart the escape from the best state
        col_at_ = best_cols;
        if (row_at_ != best_rows) {
          row_at_ = best_rows;
          load_T();
        }
        eval_all();
      }
      escape();
      ++res.escapes;
      cols_converged = !cols_enabled_;
      rows_converged = !rows_enabled_;
      tour_round_ = 0;
      sweep_improved_ = false;
    }
    if (rows_enabled_ && !rows_converged && (since_rows >= row_interval || cols_converged)) {
      const int64_t moved = row_phase(keep_going);
      since_rows = 0;
      if (moved > 0) {
        row_interval = base_interval;
        cols_converged = !cols_enabled_;
        tour_round_ = 0;
        sweep_improved_ = false;
      } else {
        rows_converged = true;
        row_interval = std::min<int64_t>(row_interval * 2, 1 << 20);
      }
    } else if (cols_enabled_ && !cols_converged) {
      double gained;
      if (use_loss_pairs) {
        gained = column_round(loss_pairs());
        if (gained > 0) sweep_improved_ = true;
      } else {
        const bool sweep_start = tour_round_ == 0;
        if (sweep_start) sweep_improved_ = false;
        gained = column_round(tournament_pairs());
        if (gained > 0) sweep_improved_ = true;
        if (tour_round_ == 0 && !sweep_improved_) cols_converged = true;  // a full quiet sweep
      }
      use_loss_pairs = !use_loss_pairs && col_seg_groups_ > 2;
      if (gained > 0) rows_converged = !rows_enabled_;
      ++since_rows;
    } else {
      continue;  // both moves are exhausted: the top of the loop escapes
    }
    ++res.rounds;
    if (total_ > best_total) {
      best_total = total_;
      best_cols = col_at_;
      best_rows = row_at_;
    }
    maybe_report();
  }
  if (total_ > best_total) {
    best_total = total_;
    best_cols = col_at_;
    best_rows = row_at_;
  }
  report();

  // Exact check against the identity, with the selection select_mask makes.
  res.row_perm.assign(best_rows.begin(), best_rows.begin() + g_.R);
  std::vector<int64_t> cols;
  cols.reserve(g_.K);
  for (int64_t slot = 0; slot < g_.K; ++slot) cols.push_back(best_cols[slot]);
  res.col_perm = cols;
  return res;
}

// ---- exact kept score ----------------------------------------------------------------------

// Sum, in double, of what select_mask keeps on P = S[row_perm][:, col_perm] (null: identity).
double exact_kept(const float* S, int64_t R, int64_t K, const Pattern& p, const int64_t* row_perm,
                  const int64_t* col_perm) {
  auto at = [&](int64_t r, int64_t c) -> float {
    const int64_t rr = row_perm ? row_perm[r] : r;
    const int64_t cc = col_perm ? col_perm[c] : c;
    return S[size_t(rr) * K + cc];
  };
  if (!p.is_vnm()) {
    const int N = p.N, M = p.M;
    const int64_t groups = ceil_div(K, M);
    std::vector<double> row_kept(R, 0.0);
    parallel_for(R, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(M);
      for (int64_t r = begin; r < end; ++r) {
        double acc = 0;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t c0 = g * M;
          const int cols = int(std::min<int64_t>(M, K - c0));
          for (int c = 0; c < cols; ++c) buf[c] = at(r, c0 + c);
          const int keep = std::min(N, cols);
          std::partial_sort(buf.begin(), buf.begin() + keep, buf.begin() + cols,
                            std::greater<float>());
          for (int i = 0; i < keep; ++i) acc += double(buf[i]);
        }
        row_kept[r] = acc;
      }
    });
    double total = 0;
    for (double x : row_kept) total += x;
    return total;
  }
  const int V = p.V, M = p.M;
  const int64_t RB = ceil_div(R, V), G = ceil_div(K, M);
  std::vector<double> block_kept(size_t(RB) * G, 0.0);
  parallel_for(RB * G, 4, [&](int64_t begin, int64_t end) {
    detail::BlockScratch bs;
    bs.resize(V, M);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = (blk / G) * V, c0 = (blk % G) * M;
      const int rows = int(std::min<int64_t>(V, R - r0));
      const int cols = int(std::min<int64_t>(M, K - c0));
      std::fill(bs.nat.begin(), bs.nat.end(), 0.0f);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) bs.natural(c)[r] = at(r0 + r, c0 + c);
      int sl[4] = {0, 1, 2, 3};
      if (M > kSelectedColumns) detail::best_columns(bs, sl);
      double acc = 0;
      for (int r = 0; r < rows; ++r) {
        float x[4];
        for (int i = 0; i < 4; ++i) x[i] = bs.natural(sl[i])[r];
        std::sort(x, x + 4, std::greater<float>());
        acc += double(x[0]) + double(x[1]);
      }
      block_kept[blk] = acc;
    }
  });
  double total = 0;
  for (double x : block_kept) total += x;
  return total;
}

}  // namespace

double kept_score(const float* scores, int64_t R, int64_t K, const Pattern& p) {
  if (R <= 0 || K <= 0) return 0.0;
  detail::check_scores(scores, R * K, K);
  return exact_kept(scores, R, K, p, nullptr, nullptr);
}

PermuteResult search_permutation(const float* scores, int64_t R, int64_t K, const Pattern& p,
                                 const PermuteOptions& options, const PermuteCallback& progress) {
  const auto t0 = Clock::now();
  if (R <= 0 || K <= 0) {
    std::ostringstream os;
    os << "scores must be a non-empty matrix, got shape (" << R << ", " << K << ")";
    fail(os.str());
  }
  if (p.N != kKeptPerRow)
    fail("the permutation search handles patterns that keep 2 per group (V:2:M or 2:M); got '" +
         p.str() + "'");
  if (!(options.time_budget_s >= 0) || std::isinf(options.time_budget_s))
    fail("time_budget must be a finite number of seconds >= 0, got " +
         std::to_string(options.time_budget_s));
  if (options.max_rounds < 0)
    fail("max_rounds must be >= 0 (0: no limit), got " + std::to_string(options.max_rounds));
  Geometry geo;
  geo.R = R;
  geo.K = K;
  geo.M = p.M;
  geo.choose = p.is_vnm() && p.M > kSelectedColumns;
  geo.V = p.is_vnm() ? p.V : kRowChunk;
  geo.set_size = geo.choose ? kSelectedColumns : p.M;
  geo.RB = ceil_div(R, geo.V);
  geo.G = ceil_div(K, geo.M);
  geo.Rp = geo.RB * geo.V;
  geo.Kp = geo.G * geo.M;
  if (options.col_segment < 0 || (options.col_segment > 0 && K % options.col_segment != 0))
    fail("col_segment must be 0 (no restriction) or divide the column count " +
         std::to_string(K) + "; got " + std::to_string(options.col_segment));
  // Checked alike for every pattern, also those whose rows never move (2:M, V:2:4), so that
  // options valid for one pattern are valid for the others.
  if (options.row_segment < 0 ||
      (options.row_segment > 0 &&
       (R % options.row_segment != 0 || (p.is_vnm() && options.row_segment % p.V != 0)))) {
    if (p.is_vnm())
      fail("row_segment must be 0 (no restriction) or a multiple of V=" + std::to_string(p.V) +
           " that divides the row count " + std::to_string(R) + "; got " +
           std::to_string(options.row_segment));
    fail("row_segment must be 0 (no restriction) or divide the row count " + std::to_string(R) +
         "; got " + std::to_string(options.row_segment));
  }
  detail::check_scores(scores, R * K, K);

  Search search(scores, geo, options);
  PermuteResult res = search.run(progress);
  res.kept_identity = exact_kept(scores, R, K, p, nullptr, nullptr);
  res.kept_unstructured = unstructured_kept(scores, R, K, p.M);
  {
    // a random permutation of the permutable axes, drawn from the seed: the baseline that tells
    // whether the given order was special
    Rng rng(options.seed ^ 0x9E3779B97F4A7C15ull);
    std::vector<int64_t> rows(R), cols(K);
    std::iota(rows.begin(), rows.end(), int64_t(0));
    std::iota(cols.begin(), cols.end(), int64_t(0));
    if (geo.choose) rng.shuffle(rows);
    rng.shuffle(cols);
    res.kept_random = exact_kept(scores, R, K, p, rows.data(), cols.data());
  }
  res.kept = exact_kept(scores, R, K, p, res.row_perm.data(), res.col_perm.data());
  if (!(res.kept > res.kept_identity)) {  // not beaten: the identity is the answer
    std::iota(res.row_perm.begin(), res.row_perm.end(), int64_t(0));
    std::iota(res.col_perm.begin(), res.col_perm.end(), int64_t(0));
    res.kept = res.kept_identity;
  }
  res.seconds = seconds_since(t0);
  return res;
}

}  // namespace vnm
