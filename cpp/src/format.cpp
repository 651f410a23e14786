#include "vnm/format.h"

#include <charconv>
#include <stdexcept>
#include <string>
#include <vector>

namespace vnm {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string v_rule(int V) {
  return "V must be a positive multiple of 16 (the row tile of mma.sp), at most 256; got V=" +
         std::to_string(V);
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

}  // namespace

Pattern Pattern::make(int V, int N, int M) {
  if (V == 0) {  // plain N:M
    const std::string text = quoted(std::to_string(N) + ":" + std::to_string(M));
    if (N < 1 || N >= M)
      fail("pattern " + text + ": an N:M pattern needs 1 <= N < M; got N=" + std::to_string(N) +
           ", M=" + std::to_string(M));
    return Pattern{0, N, M};
  }
  const std::string text =
      quoted(std::to_string(V) + ":" + std::to_string(N) + ":" + std::to_string(M));
  if (V < 0 || V % kVMultiple != 0 || V > kMaxV) fail("pattern " + text + ": " + v_rule(V));
  if (N != kKeptPerRow)
    fail("pattern " + text + ": V:N:M patterns need N == 2 (inside the 4 selected columns each "
         "row keeps 2, the 2:4 pattern sparse tensor cores run); got N=" + std::to_string(N));
  if (M < kSelectedColumns || M > kMaxM)
    fail("pattern " + text + ": V:N:M patterns need 4 <= M <= 256 (column offsets are stored "
         "in one byte); got M=" + std::to_string(M));
  return Pattern{V, N, M};
}

Pattern Pattern::parse(std::string_view text) {
  // Surrounding whitespace is ignored, as in "64:2:8\n" read from a file.
  while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
  const auto syntax_error = [&]() {
    fail("cannot parse pattern " + quoted(text) +
         ": expected 'V:N:M' (e.g. '64:2:8') or 'N:M' (e.g. '2:4'), integer fields separated "
         "by ':'");
  };
  std::vector<int> parts;
  size_t pos = 0;
  while (true) {
    const size_t colon = text.find(':', pos);
    const std::string_view field =
        text.substr(pos, colon == std::string_view::npos ? std::string_view::npos : colon - pos);
    int value = 0;
    const char* end = field.data() + field.size();
    auto [ptr, ec] = std::from_chars(field.data(), end, value);
    if (field.empty() || ec != std::errc() || ptr != end) syntax_error();
    parts.push_back(value);
    if (colon == std::string_view::npos) break;
    pos = colon + 1;
  }
  if (parts.size() == 2) return make(0, parts[0], parts[1]);
  if (parts.size() != 3) syntax_error();
  // make() reads V = 0 as plain N:M; written out, V = 0 breaks the V rule.
  if (parts[0] == 0) fail("pattern " + quoted(text) + ": " + v_rule(0));
  return make(parts[0], parts[1], parts[2]);
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
