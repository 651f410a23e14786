// The V:N:M format: patterns, padding and the canonical compressed storage.
//
// This header is the single definition of the format. Everything else (compression, the
// reference SpMM, mask selection, the CUDA packing, the Python package) asks it for shapes,
// padding and sizes; nothing recomputes them by hand.
//
// A weight W has R rows (output features) and K columns (input features), y = x @ W^T.
// Under a V:N:M pattern W is cut into blocks of V rows x M columns (R padded up to a multiple
// of V, K up to a multiple of M, with zeros). Each block keeps the same 4 columns for all of its
// rows ("selected columns"); inside those 4 every row keeps N = 2 values, the 2:4 pattern the
// sparse tensor cores run. Plain N:M (no V) keeps N of every M per row; it exists for masks and
// training, and 2:4 is also compressible (its 4 selected columns are always 0..3).
//
// Canonical storage (what is saved to disk; R' = padded rows, G = ceil(K / M)):
//   values  [R', G, 2]       weight dtype  the 2 kept values of each row and group, ascending column
//   meta    [R', ceil(G/2)]  uint8         per row and group a nibble: bits 0-1 the position (0..3)
//                                          of the first kept value among the 4 selected columns,
//                                          bits 2-3 the second (first < second); group g sits in
//                                          byte g / 2, the low nibble for even g. This is the
//                                          nibble mma.sp reads for one row and one k-group of 4.
//   columns [R'/V, G, 4]     uint8         the 4 selected column offsets in [0, M), ascending
//   perm    [K]              int32, opt.   the stored matrix multiplies x[..., perm]
//   row_perm [R]             int32, opt.   stored row r is output row row_perm[r]: the SpMM writes
//                                          it there (and reads bias[row_perm[r]])
// A row that keeps fewer than 2 values in a group (the mask may keep fewer) stores zeros in the
// free slots, at the lowest free positions; a block that uses fewer than 4 columns fills its set
// with the lowest unused offsets. Selected offsets may point into the column padding (>= K); the
// values there are zero and readers must not load x past K.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "vnm/dtype.h"

namespace vnm {

// Limits of the pattern rules (see Pattern::parse).
inline constexpr int kMaxM = 256;         // column offsets are stored as uint8
inline constexpr int kMaxV = 256;
inline constexpr int kVMultiple = 16;     // the mma.sp tile has 16 rows
inline constexpr int kSelectedColumns = 4;
inline constexpr int kKeptPerRow = 2;
// Row block used to store plain 2:4, which has no V of its own: one mma.sp tile of rows.
inline constexpr int kRowBlockFor24 = 16;

struct Pattern {
  int V = 0;  // rows per block; 0 for plain N:M
  int N = 2;
  int M = 4;

  // Parses "V:N:M" or "N:M". Throws std::invalid_argument naming the rule that is broken.
  static Pattern parse(std::string_view text);
  // Validates fields; same errors as parse.
  static Pattern make(int V, int N, int M);

  bool is_vnm() const { return V > 0; }
  bool is_2to4() const { return N == 2 && M == 4; }
  // Whether weights can be stored (and multiplied) in this pattern: any V:N:M, or plain 2:4.
  bool compressible() const { return is_vnm() || is_2to4(); }
  double density() const { return double(N) / double(M); }
  double sparsity() const { return 1.0 - density(); }
  // Rows that share one set of selected columns.
  int row_block() const { return is_vnm() ? V : kRowBlockFor24; }
  std::string str() const;

  friend bool operator==(const Pattern& a, const Pattern& b) {
    return a.V == b.V && a.N == b.N && a.M == b.M;
  }
  friend bool operator!=(const Pattern& a, const Pattern& b) { return !(a == b); }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of the canonical storage of an R x K matrix under a compressible pattern.
struct Layout {
  Pattern pattern;
  int64_t rows = 0;         // R, logical
  int64_t cols = 0;         // K, logical
  int64_t row_block = 0;    // V (16 for plain 2:4)
  int64_t padded_rows = 0;  // R' = ceil(R / V) * V
  int64_t row_blocks = 0;   // R' / V
  int64_t groups = 0;       // G = ceil(K / M)
  int64_t padded_cols = 0;  // G * M
  int64_t meta_cols = 0;    // ceil(G / 2) bytes per row

  // Throws std::invalid_argument if the pattern cannot be stored or a dimension is not positive.
  Layout(const Pattern& p, int64_t R, int64_t K);

  int64_t values_count() const { return padded_rows * groups * kKeptPerRow; }
  int64_t meta_bytes() const { return padded_rows * meta_cols; }
  int64_t columns_bytes() const { return row_blocks * groups * kSelectedColumns; }

  // Nibble of (row, group) inside the meta array.
  int64_t meta_index(int64_t row, int64_t group) const { return row * meta_cols + group / 2; }
  static int meta_shift(int64_t group) { return (group & 1) ? 4 : 0; }
};

}  // namespace vnm

