// Channel-permutation search: reorder the rows (output channels) and columns (input channels) of
// a score matrix so that the V:N:M (or 2:M) mask selected on the reordered matrix keeps more
// total score. Plain pointers and shapes in, no Python and no torch.
//
// Conventions. A permutation `perm` of n lists, for every new position i, the original index it
// holds: the permuted matrix is P[i][j] = S[row_perm[i]][col_perm[j]] (torch:
// S[row_perm][:, col_perm]). The kept score of a permutation is the sum of P over the mask that
// select_mask chooses for P: for every V x M block the best 4 columns and, per row, the best 2.
//
// Which permutations matter. V:2:M with M > 4: rows (which rows share a block's 4 columns) and
// columns (which columns share a group). V:2:4 and 2:M: columns only; every row keeps its own
// best 2 of each group, so the row order changes nothing and row_perm is the identity.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "vnm/format.h"

namespace vnm {

struct PermuteOptions {
  // Seconds of search (finite, >= 0). The set-up before the search and the exact scoring after
  // it come on top. Inside a round the clock is read every 64 row swaps, between batches of the
  // row phase's tables and before every column pair, so a round past the budget ends early.
  double time_budget_s = 10.0;
  uint64_t seed = 0;            // seeds every random choice (pairings, escapes)
  // Stop after this many rounds (0: no limit). A round is one column round (a set of disjoint
  // column-group pairs improved in parallel) or one row phase. A search that ends by its round
  // limit (or its patience) inside the time budget depends only on the inputs, the options and
  // the seed (not on timing or the number of threads); one the budget ends depends on timing.
  int64_t max_rounds = 0;
  // At a local optimum (no improving move left) the search escapes with a few random swaps and
  // searches on. Stop after this many escapes in a row that do not beat the best state (< 0: no
  // limit; 0: stop at the first local optimum).
  int64_t patience = 100;
  bool permute_rows = true;  // search a row permutation (V:2:M, M > 4)
  bool permute_cols = true;  // search a column permutation
  // Restrict the permutations to map every consecutive segment of this many columns (rows) onto
  // itself, e.g. head_dim for the input columns of an attention output projection. 0: no
  // restriction. A column segment must divide K; a row segment must divide R and, for V:N:M
  // patterns, be a multiple of V (checked also where rows never move: 2:M, V:2:4).
  int64_t col_segment = 0;
  int64_t row_segment = 0;
};

struct PermuteProgress {
  double elapsed_s = 0;      // since the search started
  double time_budget_s = 0;  // as requested
  int64_t rounds = 0;        // rounds done
  int64_t escapes = 0;       // random escapes from local optima so far
  double kept_identity = 0;  // kept score of the identity (search arithmetic, float blocks)
  double kept_best = 0;      // best kept score so far (same arithmetic)
};

// Called from the calling thread (never from a worker thread) between rounds and inside row
// phases, at most about every 0.2 s. Return false to stop the search early; the best
// permutation found so far is returned. Exceptions thrown by the callback propagate out of
// search_permutation (the Python binding turns a pending Ctrl-C into one).
using PermuteCallback = std::function<bool(const PermuteProgress&)>;

struct PermuteResult {
  std::vector<int64_t> row_perm;  // R entries
  std::vector<int64_t> col_perm;  // K entries
  double kept_identity = 0;  // sum, in double, of the scores select_mask keeps on S
  double kept = 0;           // the same on S[row_perm][:, col_perm]; always >= kept_identity
  // References, sums in double: one random permutation (rows too where they matter) drawn from
  // the seed; every row keeping its own best values, as many as the pattern keeps per row (apex
  // ASP's "50% rows" at 2:4, an upper bound of every valid mask); the best values of the whole
  // matrix at the same density (unstructured pruning).
  double kept_random = 0;
  double kept_unstructured_rows = 0;
  double kept_unstructured = 0;
  int64_t rounds = 0;
  int64_t escapes = 0;
  double seconds = 0;  // wall time of the whole call
  bool converged = false;  // a local optimum was reached (no improving move in a full sweep)
};

// Searches row and column permutations of the R x K score matrix (row-major, finite and
// non-negative) that raise the kept score under `p` (V:2:M, or 2:M with N = 2). Multi-threaded
// (vnm::parallel_for). Never returns a permutation worse than the identity: the kept scores of
// the best permutation found and of the identity are recomputed exactly at the end and the
// identity is returned if it is not beaten. Throws std::invalid_argument for bad scores,
// patterns or options, naming the fix.
PermuteResult search_permutation(const float* scores, int64_t R, int64_t K, const Pattern& p,
                                 const PermuteOptions& options,
                                 const PermuteCallback& progress = {});

// Sum, in double, of the scores that select_mask keeps on the R x K matrix under `p`.
double kept_score(const float* scores, int64_t R, int64_t K, const Pattern& p);

}  // namespace vnm
