// The CPU core: mask checks, compression to the canonical storage of format.h, exact mask
// selection and the reference SpMM. Plain pointers and shapes in, no Python and no torch.
// Every dense matrix is row-major and contiguous; masks are one byte per element (0 or 1).
// Errors in user input throw std::invalid_argument with a message that names the fix.
#pragma once

#include <cstdint>
#include <string>

#include "vnm/format.h"

namespace vnm {

// ---- masks -------------------------------------------------------------------------------

// Empty if `mask` (R x K) is valid for `p` (V:N:M or N:M); otherwise a description of the first
// offending block (row blocks outer, column groups inner) and why.
std::string check_mask(const uint8_t* mask, int64_t R, int64_t K, const Pattern& p);

// Writes the mask (R x K) that keeps the most total score under `p`. V:N:M: for every V x M block
// the 4 columns and, per row, the 2 of them that maximise the kept sum (exact; a block's kept sum
// is the float lane sum of its rows' top-two sums, see select.cpp). N:M: the top N of every M per
// row. Ties: among column sets of equal kept sum, the one whose ascending offsets come first
// lexicographically; within the selected columns or an N:M group, equal scores go to the lower
// offset. The torch backend (python/vnm/mask.py) follows the same sums and rules, so both give
// the same mask. Shapes that are not multiples of V or M are padded with zero scores, selected
// and cropped. Scores must be finite and non-negative (importance values such as |W|); otherwise
// std::invalid_argument names a bad position.
void select_mask(const float* scores, int64_t R, int64_t K, const Pattern& p, uint8_t* mask);

// ---- compressed storage -------------------------------------------------------------------

struct NonFinite {
  int64_t count = 0;  // NaN or Inf values at kept positions
  int64_t row = -1;   // first one, row-major order
  int64_t col = -1;
};

// Non-finite weights that `mask` keeps.
NonFinite find_nonfinite_kept(DType t, const void* weight, const uint8_t* mask, int64_t R,
                              int64_t K);

// Builds values / meta / columns (sizes from `L`) from a dense weight and a mask that is valid
// for L.pattern (check it first with check_mask: this function assumes it).
void compress(const Layout& L, DType t, const void* weight, const uint8_t* mask, void* values,
              uint8_t* meta, uint8_t* columns);

// Empty if meta and columns are well formed (offsets ascending and < M, nibble positions
// first < second); otherwise what is wrong and where. Used on storage read from disk.
std::string check_storage(const Layout& L, const uint8_t* meta, const uint8_t* columns);

// Writes the logical R x K dense matrix held by the storage (padding cropped). `dense` may be
// null; `mask` (R x K, may be null) receives the positions the storage keeps.
void decompress(const Layout& L, DType t, const void* values, const uint8_t* meta,
                const uint8_t* columns, void* dense, uint8_t* mask);

// ---- reference SpMM -----------------------------------------------------------------------

// y[n, o(r)] = sum_k W[r, k] * x[n, perm ? perm[k] : k] (+ bias[o(r)]) for n < n_tokens,
// r < R, with o(r) = row_perm ? row_perm[r] : r, straight from the storage (W is the stored
// matrix). x is n_tokens x K and y n_tokens x R, both of dtype t; bias (R,) of dtype t or null,
// in output order; perm (K,) and row_perm (R,) permutations or null. Accumulates in fp32,
// rounds once into y.
void spmm_reference(const Layout& L, DType t, const void* values, const uint8_t* meta,
                    const uint8_t* columns, const int32_t* perm, const int32_t* row_perm,
                    const void* x, int64_t n_tokens, const void* bias, void* y);

}  // namespace vnm
