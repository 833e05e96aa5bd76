#pragma once
// A small, strict JSON reader and string escaper for the safetensors header
// (io/safetensors.hpp). Only what that header needs, but the whole grammar
// (RFC 8259) is accepted, so a header written by other tools parses too.
//
// Two ways to read:
//   - json::Reader, a pull parser: the caller walks the text value by value
//     (begin_object / next_member, begin_array / next_item, read_string,
//     read_number, skip_value, ...) and builds only what it keeps. Memory is
//     what the caller keeps plus one decoded string; time is linear in the
//     text. parse_safetensors uses it, so an attacker-controlled header
//     cannot make the loader build a tree many times its own size.
//   - json::parse, a document tree (Value) built on the Reader, for small
//     trusted texts and tests. A Value costs ~100 bytes per JSON value, so
//     it is not for untrusted input of arbitrary size.
//
// Strictness, because the input may be a corrupt file: the text must be valid
// UTF-8; control characters inside strings, trailing commas, leading zeros,
// non-JSON literals and trailing non-whitespace are errors; nesting deeper
// than kMaxDepth is an error (no unbounded recursion). json::parse also
// rejects duplicate object keys, in O(n log n) comparisons per object (sorted
// keys, no hashing: no worst case an attacker can provoke with colliding
// hashes); Reader users check duplicates in what they keep. Syntax errors are
// json::ParseError (a std::runtime_error) naming the byte offset.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mesaopt::detail {

// Throws std::runtime_error unless [p, p+n) is valid UTF-8 (no overlongs,
// surrogates or > U+10FFFF).
inline void check_utf8(const unsigned char* p, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else throw std::runtime_error("invalid UTF-8 byte at offset " + std::to_string(i));
    if (n - i < len) throw std::runtime_error("truncated UTF-8 sequence at offset " + std::to_string(i));
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) throw std::runtime_error("invalid UTF-8 continuation at offset " + std::to_string(i + k));
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    const std::uint32_t min_cp = len == 2 ? 0x80 : (len == 3 ? 0x800 : 0x10000);
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      throw std::runtime_error("invalid UTF-8 code point at offset " + std::to_string(i));
    i += len;
  }
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The first string (in sort order) that occurs twice among *keys[i], or
// nullptr. Sorts the pointers: O(n log n) comparisons whatever the input.
inline const std::string* find_duplicate_string(std::vector<const std::string*> keys) {
  std::sort(keys.begin(), keys.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
  for (std::size_t i = 1; i < keys.size(); ++i)
    if (*keys[i - 1] == *keys[i]) return keys[i];
  return nullptr;
}

}  // namespace mesaopt::detail

namespace mesaopt::io::json {

// A syntax error (or invalid UTF-8) in a JSON text.
struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Value {
  enum class Kind { null, boolean, number, string, array, object };
  Kind kind = Kind::null;
  bool boolean = false;
  std::string text;  // string contents (decoded), or the number's lexeme
  std::vector<Value> items;                          // array
  std::vector<std::pair<std::string, Value>> members;  // object, in file order

  // The member named `key`, or nullptr. A linear scan: O(members).
  const Value* find(const std::string& key) const {
    for (const auto& m : members)
      if (m.first == key) return &m.second;
    return nullptr;
  }
};

inline const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::null: return "null";
    case Value::Kind::boolean: return "boolean";
    case Value::Kind::number: return "number";
    case Value::Kind::string: return "string";
    case Value::Kind::array: return "array";
    case Value::Kind::object: return "object";
  }
  return "?";
}

// A number lexeme as a non-negative integer <= max, or throws std::runtime_error.
inline std::uint64_t to_index(std::string_view lexeme, const std::string& what,
                              std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
  if (lexeme.empty()) throw std::runtime_error(what + " must be a non-negative integer, got nothing");
  std::uint64_t out = 0;
  for (char c : lexeme) {
    if (c < '0' || c > '9')
      throw std::runtime_error(what + " must be a non-negative integer, got " + std::string(lexeme));
    const std::uint64_t digit = static_cast<std::uint64_t>(c - '0');
    if (out > (max - digit) / 10) throw std::runtime_error(what + " is too large: " + std::string(lexeme));
    out = out * 10 + digit;
  }
  return out;
}

// A number Value as a non-negative integer <= max, or throws std::runtime_error.
inline std::uint64_t to_index(const Value& v, const std::string& what,
                              std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
  if (v.kind != Value::Kind::number) throw std::runtime_error(what + " must be a number, got " + kind_name(v.kind));
  return to_index(std::string_view(v.text), what, max);
}

// s as a JSON string literal (quotes included); control characters as \u00XX.
inline std::string quote(std::string_view s) {
  std::string out = "\"";
  out.reserve(s.size() + 2);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// A pull parser over one JSON text [data, data + size). Typical use:
//
//   json::Reader r(text, n);
//   r.begin_object();                        // or check r.peek() first
//   std::string key;
//   while (r.next_member(key)) {             // reads the key and the ':'
//     if (r.peek() == Value::Kind::string) use(key, r.read_string());
//     else r.skip_value();
//   }
//   r.finish();                              // nothing but whitespace may follow
//
// Every value must be consumed (read_*, begin_* or skip_value) before the
// next next_member / next_item. Errors throw ParseError naming the byte offset.
class Reader {
 public:
  static constexpr int kMaxDepth = 32;

  // Checks that the whole text is valid UTF-8 unless `utf8_checked` says a
  // previous Reader over the same bytes already did.
  Reader(const char* data, std::size_t size, bool utf8_checked = false) : p_(data), n_(size) {
    if (!utf8_checked) {
      try {
        detail::check_utf8(reinterpret_cast<const unsigned char*>(p_), n_);
      } catch (const std::runtime_error& e) {
        throw ParseError(e.what());
      }
    }
  }

  // The kind of the next value (skipping whitespace); errors at the end of
  // the input, on a character that starts no value, or beyond kMaxDepth.
  Value::Kind peek() {
    skip_ws();
    if (static_cast<int>(stack_.size()) > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth));
    if (i_ >= n_) error("unexpected end of input");
    const char c = p_[i_];
    switch (c) {
      case '{': return Value::Kind::object;
      case '[': return Value::Kind::array;
      case '"': return Value::Kind::string;
      case 't':
      case 'f': return Value::Kind::boolean;
      case 'n': return Value::Kind::null;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return Value::Kind::number;
        error(std::string("unexpected character '") + c + "'");
    }
  }

  void begin_object() { open(Value::Kind::object, '{', kObjectFirst); }
  void begin_array() { open(Value::Kind::array, '[', kArrayFirst); }

  // Inside an object: reads the next key and its ':' into `key` and returns
  // true, or consumes the closing '}' and returns false.
  bool next_member(std::string& key) {
    if (stack_.empty() || (stack_.back() != kObjectFirst && stack_.back() != kObjectNext))
      throw std::logic_error("json::Reader::next_member outside an object");
    skip_ws();
    if (eat('}')) {
      stack_.pop_back();
      return false;
    }
    if (stack_.back() == kObjectNext) {
      expect(',');
      skip_ws();
    }
    stack_.back() = kObjectNext;
    if (i_ >= n_ || p_[i_] != '"') error("expected a string key");
    key.clear();
    parse_string(&key);
    skip_ws();
    expect(':');
    return true;
  }

  // Inside an array: true if another item follows (then read it), or
  // consumes the closing ']' and returns false.
  bool next_item() {
    if (stack_.empty() || (stack_.back() != kArrayFirst && stack_.back() != kArrayNext))
      throw std::logic_error("json::Reader::next_item outside an array");
    skip_ws();
    if (eat(']')) {
      stack_.pop_back();
      return false;
    }
    if (stack_.back() == kArrayNext) expect(',');
    stack_.back() = kArrayNext;
    return true;
  }

  std::string read_string() {
    expect_kind(Value::Kind::string);
    std::string out;
    parse_string(&out);
    return out;
  }
  // The number's lexeme (a view into the text).
  std::string_view read_number() {
    expect_kind(Value::Kind::number);
    return parse_number();
  }
  bool read_boolean() {
    expect_kind(Value::Kind::boolean);
    if (p_[i_] == 't') {
      literal("true");
      return true;
    }
    literal("false");
    return false;
  }
  void read_null() {
    expect_kind(Value::Kind::null);
    literal("null");
  }

  // Consumes the next value, whatever it is (validating it).
  void skip_value() {
    switch (peek()) {
      case Value::Kind::object: {
        begin_object();
        std::string key;
        while (next_member(key)) skip_value();
        return;
      }
      case Value::Kind::array:
        begin_array();
        while (next_item()) skip_value();
        return;
      case Value::Kind::string: parse_string(nullptr); return;
      case Value::Kind::number: parse_number(); return;
      case Value::Kind::boolean: read_boolean(); return;
      case Value::Kind::null: read_null(); return;
    }
  }

  // After the top-level value: only whitespace may remain.
  void finish() {
    if (!stack_.empty()) throw std::logic_error("json::Reader::finish inside an object or array");
    skip_ws();
    if (i_ != n_) error("unexpected text after the JSON value");
  }

  std::size_t offset() const { return i_; }

  [[noreturn]] void error(const std::string& what) const {
    throw ParseError("JSON error at byte " + std::to_string(i_) + ": " + what);
  }

 private:
  static constexpr char kObjectFirst = 'o', kObjectNext = 'O', kArrayFirst = 'a', kArrayNext = 'A';

  void skip_ws() {
    while (i_ < n_ && (p_[i_] == ' ' || p_[i_] == '\t' || p_[i_] == '\n' || p_[i_] == '\r')) ++i_;
  }
  bool eat(char c) {
    if (i_ < n_ && p_[i_] == c) { ++i_; return true; }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) error(std::string("expected '") + c + "'");
  }
  void expect_kind(Value::Kind k) {
    const Value::Kind got = peek();
    if (got != k) error(std::string("expected a ") + kind_name(k) + ", got a " + kind_name(got));
  }
  void open(Value::Kind k, char c, char state) {
    expect_kind(k);
    expect(c);
    stack_.push_back(state);
  }
  void literal(const char* word) {
    for (const char* w = word; *w; ++w)
      if (!eat(*w)) error(std::string("invalid literal (expected ") + word + ")");
  }

  std::string_view parse_number() {
    const std::size_t start = i_;
    auto digit = [&] { return i_ < n_ && p_[i_] >= '0' && p_[i_] <= '9'; };
    eat('-');
    if (eat('0')) {
      if (digit()) error("leading zero in number");
    } else {
      if (!digit()) error("expected a digit");
      while (digit()) ++i_;
    }
    if (eat('.')) {
      if (!digit()) error("expected a digit after '.'");
      while (digit()) ++i_;
    }
    if (i_ < n_ && (p_[i_] == 'e' || p_[i_] == 'E')) {
      ++i_;
      if (!eat('+')) eat('-');
      if (!digit()) error("expected a digit in the exponent");
      while (digit()) ++i_;
    }
    return std::string_view(p_ + start, i_ - start);
  }

  unsigned hex4() {
    if (n_ - i_ < 4) error("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = p_[i_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<unsigned>(h - 'A' + 10);
      else error("invalid hex digit in \\u escape");
    }
    return v;
  }

  // Parses a string literal, appending the decoded text to *out (if not null).
  void parse_string(std::string* out) {
    expect('"');
    for (;;) {
      // Copy the run of plain characters in one go.
      const std::size_t run = i_;
      while (i_ < n_ && p_[i_] != '"' && p_[i_] != '\\' && static_cast<unsigned char>(p_[i_]) >= 0x20) ++i_;
      if (out) out->append(p_ + run, i_ - run);
      if (i_ >= n_) error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(p_[i_++]);
      if (c == '"') return;
      if (c < 0x20) {
        --i_;
        error("control character in string");
      }
      // c == '\\'
      if (i_ >= n_) error("unterminated escape");
      const char e = p_[i_++];
      char plain = 0;
      switch (e) {
        case '"': plain = '"'; break;
        case '\\': plain = '\\'; break;
        case '/': plain = '/'; break;
        case 'b': plain = '\b'; break;
        case 'f': plain = '\f'; break;
        case 'n': plain = '\n'; break;
        case 'r': plain = '\r'; break;
        case 't': plain = '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) error("unpaired low surrogate");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!(eat('\\') && eat('u'))) error("unpaired high surrogate");
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          if (out) detail::append_utf8(*out, cp);
          continue;
        }
        default: error(std::string("invalid escape '\\") + e + "'");
      }
      if (out) *out += plain;
    }
  }

  const char* p_;
  std::size_t n_;
  std::size_t i_ = 0;
  std::vector<char> stack_;  // one state per open object / array (at most kMaxDepth + 1)
};

// Reads the next value from `r` as a tree; rejects duplicate object keys.
inline Value read_value(Reader& r) {
  Value v;
  v.kind = r.peek();
  switch (v.kind) {
    case Value::Kind::object: {
      r.begin_object();
      std::string key;
      while (r.next_member(key)) {
        Value member = read_value(r);
        v.members.emplace_back(std::move(key), std::move(member));
      }
      std::vector<const std::string*> keys;
      keys.reserve(v.members.size());
      for (const auto& m : v.members) keys.push_back(&m.first);
      if (const std::string* dup = detail::find_duplicate_string(std::move(keys)))
        r.error("duplicate key " + quote(*dup) + " in the object ending here");
      break;
    }
    case Value::Kind::array:
      r.begin_array();
      while (r.next_item()) v.items.push_back(read_value(r));
      break;
    case Value::Kind::string: v.text = r.read_string(); break;
    case Value::Kind::number: v.text = std::string(r.read_number()); break;
    case Value::Kind::boolean: v.boolean = r.read_boolean(); break;
    case Value::Kind::null: r.read_null(); break;
  }
  return v;
}

// Parses the whole of [data, data + size) as one JSON value, or throws ParseError.
inline Value parse(const char* data, std::size_t size) {
  Reader r(data, size);
  Value v = read_value(r);
  r.finish();
  return v;
}
inline Value parse(const std::string& s) { return parse(s.data(), s.size()); }

}  // namespace mesaopt::io::json
