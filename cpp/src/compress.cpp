// Mask checks and the canonical storage: compress, decompress, storage validation.
#include <algorithm>
#include <array>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "vnm/core.h"
#include "vnm/parallel.h"

namespace vnm {
namespace {

std::string range_text(int64_t begin, int64_t end_exclusive) {
  return std::to_string(begin) + ".." + std::to_string(end_exclusive - 1);
}

// Copies one element of `t` (raw bits) from src[i] to dst[j].
inline void copy_elem(int size, const void* src, int64_t i, void* dst, int64_t j) {
  std::memcpy(static_cast<char*>(dst) + j * size, static_cast<const char*>(src) + i * size, size);
}

inline void zero_elem(int size, void* dst, int64_t j) {
  std::memset(static_cast<char*>(dst) + j * size, 0, size);
}

// Fills `chosen` (count entries, ascending, values < limit) up to `want` entries with the lowest
// unused values, keeping it sorted.
template <size_t Cap>
void fill_lowest(std::array<int, Cap>& chosen, int& count, int want, int limit) {
  want = std::min(want, int(Cap));
  for (int v = 0; v < limit && count < want; ++v) {
    if (std::find(chosen.begin(), chosen.begin() + count, v) == chosen.begin() + count)
      chosen[count++] = v;
  }
  std::sort(chosen.begin(), chosen.begin() + count);
}

}  // namespace

std::string check_mask(const uint8_t* mask, int64_t R, int64_t K, const Pattern& p) {
  const int64_t M = p.M;
  const int64_t groups = ceil_div(K, M);
  const int64_t V = p.is_vnm() ? p.V : 1;
  for (int64_t r0 = 0; r0 < R; r0 += V) {
    const int64_t r1 = std::min(R, r0 + V);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * M, c1 = std::min(K, c0 + M);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t kept = 0;
        for (int64_t c = c0; c < c1; ++c) kept += mask[r * K + c] != 0;
        if (kept > p.N) {
          std::ostringstream os;
          os << "mask is not a valid " << p.str() << " mask: row " << r << " keeps " << kept
             << " values in column group " << g << " (columns " << range_text(c0, c1)
             << "); at most " << p.N << " per row and group of " << M;
          return os.str();
        }
      }
      if (!p.is_vnm()) continue;
      std::string used;
      int64_t distinct = 0;
      for (int64_t c = c0; c < c1; ++c) {
        bool any = false;
        for (int64_t r = r0; r < r1 && !any; ++r) any = mask[r * K + c] != 0;
        if (any) {
          used += (distinct ? ", " : "") + std::to_string(c);
          ++distinct;
        }
      }
      if (distinct > kSelectedColumns) {
        std::ostringstream os;
        os << "mask is not a valid " << p.str() << " mask: block (row block " << r0 / V
           << ": rows " << range_text(r0, r1) << ", column group " << g << ": columns "
           << range_text(c0, c1) << ") keeps values in " << distinct << " distinct columns ["
           << used << "]; a V:N:M block keeps at most 4 columns shared by all its rows";
        return os.str();
      }
    }
  }
  return {};
}

NonFinite find_nonfinite_kept(DType t, const void* weight, const uint8_t* mask, int64_t R,
                              int64_t K) {
  NonFinite out;
  for (int64_t i = 0; i < R * K; ++i) {
    if (mask[i] && is_nonfinite(t, weight, i)) {
      if (out.count == 0) {
        out.row = i / K;
        out.col = i % K;
      }
      ++out.count;
    }
  }
  return out;
}

void compress(const Layout& L, DType t, const void* weight, const uint8_t* mask, void* values,
              uint8_t* meta, uint8_t* columns) {
  const int size = dtype_size(t);
  const int64_t R = L.rows, K = L.cols, M = L.pattern.M, V = L.row_block;
  std::memset(meta, 0, size_t(L.meta_bytes()));
  parallel_for(L.row_blocks, 1, [&](int64_t rb_begin, int64_t rb_end) {
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * V;
      for (int64_t g = 0; g < L.groups; ++g) {
        const int64_t c0 = g * M;
        // The block's selected columns: those any row keeps, then the lowest unused offsets.
        std::array<int, kSelectedColumns> sel{};
        int nsel = 0;
        for (int64_t j = 0; j < M && c0 + j < K; ++j) {
          bool any = false;
          for (int64_t r = r0; r < std::min(R, r0 + V) && !any; ++r)
            any = mask[r * K + c0 + j] != 0;
          if (!any) continue;
          // check_mask guarantees at most 4 used columns per block; a caller that skipped it
          // gets an error here instead of a write past `sel`.
          if (nsel == kSelectedColumns)
            throw std::invalid_argument(
                "compress: row block " + std::to_string(rb) + ", column group " +
                std::to_string(g) + " keeps values in more than 4 distinct columns; the mask is "
                "not a valid " + L.pattern.str() + " mask (check it with vnm.check_mask first)");
          sel[nsel++] = int(j);
        }
        fill_lowest(sel, nsel, kSelectedColumns, int(M));
        uint8_t* cols_out = columns + (rb * L.groups + g) * kSelectedColumns;
        for (int i = 0; i < kSelectedColumns; ++i) cols_out[i] = uint8_t(sel[i]);

        for (int64_t r = r0; r < r0 + V; ++r) {
          std::array<int, kKeptPerRow> pos{};  // positions among the 4 selected columns
          int npos = 0;
          if (r < R) {
            for (int i = 0; i < kSelectedColumns; ++i) {
              const int64_t c = c0 + sel[i];
              if (c >= K || !mask[r * K + c]) continue;
              if (npos == kKeptPerRow)  // as above: check_mask rules this out
                throw std::invalid_argument(
                    "compress: row " + std::to_string(r) + " keeps more than 2 values in column "
                    "group " + std::to_string(g) + "; the mask is not a valid " +
                    L.pattern.str() + " mask (check it with vnm.check_mask first)");
              pos[npos++] = i;
            }
          }
          const int kept = npos;
          fill_lowest(pos, npos, kKeptPerRow, kSelectedColumns);
          const int64_t vbase = (r * L.groups + g) * kKeptPerRow;
          for (int s = 0; s < kKeptPerRow; ++s) {
            const int64_t c = c0 + sel[pos[s]];
            const bool keep = kept > 0 && r < R && c < K && mask[r * K + c];
            if (keep)
              copy_elem(size, weight, r * K + c, values, vbase + s);
            else
              zero_elem(size, values, vbase + s);
          }
          const uint8_t nibble = uint8_t(pos[0] | (pos[1] << 2));
          meta[L.meta_index(r, g)] |= uint8_t(nibble << Layout::meta_shift(g));
        }
      }
    }
  });
}

std::string check_storage(const Layout& L, const uint8_t* meta, const uint8_t* columns) {
  const int M = L.pattern.M;
  for (int64_t rb = 0; rb < L.row_blocks; ++rb) {
    for (int64_t g = 0; g < L.groups; ++g) {
      const uint8_t* c = columns + (rb * L.groups + g) * kSelectedColumns;
      for (int i = 0; i < kSelectedColumns; ++i) {
        if (c[i] >= M || (i > 0 && c[i] <= c[i - 1])) {
          std::ostringstream os;
          os << "corrupt storage: columns[" << rb << ", " << g << "] = [" << int(c[0]) << ", "
             << int(c[1]) << ", " << int(c[2]) << ", " << int(c[3])
             << "] must be 4 ascending offsets below M=" << M;
          return os.str();
        }
      }
    }
  }
  for (int64_t r = 0; r < L.padded_rows; ++r) {
    for (int64_t g = 0; g < L.groups; ++g) {
      const int nibble = (meta[L.meta_index(r, g)] >> Layout::meta_shift(g)) & 0xF;
      if ((nibble & 3) >= (nibble >> 2)) {
        std::ostringstream os;
        os << "corrupt storage: meta of row " << r << ", group " << g << " holds positions "
           << (nibble & 3) << " and " << (nibble >> 2) << "; the first must be below the second";
        return os.str();
      }
    }
    // The unused high nibble of the last byte must be zero when G is odd.
    if ((L.groups & 1) && (meta[L.meta_index(r, L.groups - 1)] >> 4) != 0)
      return "corrupt storage: unused high nibble of meta row " + std::to_string(r) +
             " is not zero";
  }
  return {};
}

void decompress(const Layout& L, DType t, const void* values, const uint8_t* meta,
                const uint8_t* columns, void* dense, uint8_t* mask) {
  const int size = dtype_size(t);
  const int64_t R = L.rows, K = L.cols, M = L.pattern.M, V = L.row_block;
  if (dense) std::memset(dense, 0, size_t(R * K * size));
  if (mask) std::memset(mask, 0, size_t(R * K));
  parallel_for(R, 64, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t rb = r / V;
      for (int64_t g = 0; g < L.groups; ++g) {
        const uint8_t* cols = columns + (rb * L.groups + g) * kSelectedColumns;
        const int nibble = (meta[L.meta_index(r, g)] >> Layout::meta_shift(g)) & 0xF;
        const int pos[2] = {nibble & 3, nibble >> 2};
        for (int s = 0; s < kKeptPerRow; ++s) {
          const int64_t c = g * M + cols[pos[s]];
          if (c >= K) continue;  // padding: the value is zero and never leaves the storage
          const int64_t v = (r * L.groups + g) * kKeptPerRow + s;
          if (dense) copy_elem(size, values, v, dense, r * K + c);
          // Zero values held in a slot the mask did not keep are indistinguishable from kept
          // zeros; the mask reports the slot positions the storage holds.
          if (mask) mask[r * K + c] = 1;
        }
      }
    }
  });
}

}  // namespace vnm
