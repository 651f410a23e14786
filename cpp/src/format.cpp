#include "vnm/format.h"

#include <charconv>
#include <stdexcept>
#include <string>
#include <vector>

namespace vnm {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

}  // namespace

Pattern Pattern::make(int V, int N, int M) {
  const std::string text = V > 0 ? std::to_string(V) + ":" + std::to_string(N) + ":" +
                                       std::to_string(M)
                                 : std::to_string(N) + ":" + std::to_string(M);
  if (V < 0) fail("pattern " + quoted(text) + ": V must be positive");
  if (V == 0) {
    if (N < 1 || N >= M)
      fail("pattern " + quoted(text) + ": an N:M pattern needs 1 <= N < M");
    return Pattern{0, N, M};
  }
  if (N != kKeptPerRow)
    fail("pattern " + quoted(text) + ": V:N:M patterns need N == 2 (inside the 4 selected "
         "columns each row keeps 2, the 2:4 pattern sparse tensor cores run); got N=" +
         std::to_string(N));
  if (M < kSelectedColumns || M > kMaxM)
    fail("pattern " + quoted(text) + ": V:N:M patterns need 4 <= M <= 256; got M=" +
         std::to_string(M));
  if (V % kVMultiple != 0 || V > kMaxV)
    fail("pattern " + quoted(text) + ": V must be a positive multiple of 16 up to 256 (the " +
         "row tile of mma.sp is 16); got V=" + std::to_string(V));
  return Pattern{V, N, M};
}

Pattern Pattern::parse(std::string_view text) {
  std::vector<int> parts;
  size_t pos = 0;
  while (true) {
    const size_t colon = text.find(':', pos);
    const std::string_view field =
        text.substr(pos, colon == std::string_view::npos ? std::string_view::npos : colon - pos);
    int value = 0;
    const char* end = field.data() + field.size();
    auto [ptr, ec] = std::from_chars(field.data(), end, value);
    if (field.empty() || ec != std::errc() || ptr != end || value <= 0)
      fail("cannot parse pattern " + quoted(text) +
           ": expected 'V:N:M' (e.g. '64:2:8') or 'N:M' (e.g. '2:4') with positive integers");
    parts.push_back(value);
    if (colon == std::string_view::npos) break;
    pos = colon + 1;
  }
  if (parts.size() == 2) return make(0, parts[0], parts[1]);
  if (parts.size() == 3) return make(parts[0], parts[1], parts[2]);
  fail("cannot parse pattern " + quoted(text) +
       ": expected 'V:N:M' (e.g. '64:2:8') or 'N:M' (e.g. '2:4') with positive integers");
}

std::string Pattern::str() const {
  std::string s = V > 0 ? std::to_string(V) + ":" : std::string();
  return s + std::to_string(N) + ":" + std::to_string(M);
}

Layout::Layout(const Pattern& p, int64_t R, int64_t K) : pattern(p), rows(R), cols(K) {
  if (!p.compressible())
    throw std::invalid_argument("pattern '" + p.str() +
                                "' cannot be stored compressed: use a V:N:M pattern or 2:4");
  if (R <= 0 || K <= 0)
    throw std::invalid_argument("weight shape must be positive, got (" + std::to_string(R) +
                                ", " + std::to_string(K) + ")");
  row_block = p.row_block();
  padded_rows = ceil_div(R, row_block) * row_block;
  row_blocks = padded_rows / row_block;
  groups = ceil_div(K, p.M);
  padded_cols = groups * p.M;
  meta_cols = ceil_div(groups, 2);
}

}  // namespace vnm
