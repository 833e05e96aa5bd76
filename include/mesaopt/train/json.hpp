#pragma once
// A small, strict JSON reader and string escaper for the safetensors header
// (train/safetensors.hpp). Only what that header needs, but the whole grammar
// (RFC 8259) is accepted, so a header written by other tools parses too.
//
// Strictness, because the input may be a corrupt file: the text must be valid
// UTF-8; control characters inside strings, trailing commas, duplicate object
// keys, leading zeros, non-JSON literals and trailing non-whitespace are
// errors; nesting deeper than kMaxDepth is an error (no unbounded recursion).
// Every error is a std::runtime_error naming the byte offset.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::train::json {

struct Value {
  enum class Kind { null, boolean, number, string, array, object };
  Kind kind = Kind::null;
  bool boolean = false;
  std::string text;  // string contents (decoded), or the number's lexeme
  std::vector<Value> items;                          // array
  std::vector<std::pair<std::string, Value>> members;  // object, in file order

  // The member named `key`, or nullptr.
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

// A number lexeme as a non-negative integer <= max, or throws.
inline std::uint64_t to_index(const Value& v, const std::string& what,
                              std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
  if (v.kind != Value::Kind::number) throw std::runtime_error(what + " must be a number, got " + kind_name(v.kind));
  std::uint64_t out = 0;
  for (char c : v.text) {
    if (c < '0' || c > '9') throw std::runtime_error(what + " must be a non-negative integer, got " + v.text);
    const std::uint64_t digit = static_cast<std::uint64_t>(c - '0');
    if (out > (max - digit) / 10) throw std::runtime_error(what + " is too large: " + v.text);
    out = out * 10 + digit;
  }
  return out;
}

// s as a JSON string literal (quotes included); control characters as \u00XX.
inline std::string quote(const std::string& s) {
  std::string out = "\"";
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

namespace detail {

// Throws unless [p, p+n) is valid UTF-8 (no overlongs, surrogates or > U+10FFFF).
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

class Parser {
 public:
  static constexpr int kMaxDepth = 32;
  Parser(const char* data, std::size_t size) : p_(data), n_(size) {}

  Value parse_document() {
    check_utf8(reinterpret_cast<const unsigned char*>(p_), n_);
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (i_ != n_) error("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    throw std::runtime_error("JSON error at byte " + std::to_string(i_) + ": " + what);
  }
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
  void literal(const char* word) {
    for (const char* w = word; *w; ++w)
      if (!eat(*w)) error(std::string("invalid literal (expected ") + word + ")");
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth));
    if (i_ >= n_) error("unexpected end of input");
    Value v;
    const char c = p_[i_];
    if (c == '{') {
      v.kind = Value::Kind::object;
      ++i_;
      skip_ws();
      if (eat('}')) return v;
      for (;;) {
        skip_ws();
        if (i_ >= n_ || p_[i_] != '"') error("expected a string key");
        std::string key = parse_string();
        if (v.find(key) != nullptr) error("duplicate key " + quote(key));
        skip_ws();
        expect(':');
        skip_ws();
        Value member = parse_value(depth + 1);
        v.members.emplace_back(std::move(key), std::move(member));
        skip_ws();
        if (eat('}')) return v;
        expect(',');
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::array;
      ++i_;
      skip_ws();
      if (eat(']')) return v;
      for (;;) {
        skip_ws();
        v.items.push_back(parse_value(depth + 1));
        skip_ws();
        if (eat(']')) return v;
        expect(',');
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::string;
      v.text = parse_string();
      return v;
    }
    if (c == 't') { literal("true"); v.kind = Value::Kind::boolean; v.boolean = true; return v; }
    if (c == 'f') { literal("false"); v.kind = Value::Kind::boolean; return v; }
    if (c == 'n') { literal("null"); return v; }
    if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Value::Kind::number;
      v.text = parse_number();
      return v;
    }
    error(std::string("unexpected character '") + c + "'");
  }

  std::string parse_number() {
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
    return std::string(p_ + start, i_ - start);
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

  static void append_utf8(std::string& out, std::uint32_t cp) {
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

  std::string parse_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (i_ >= n_) error("unterminated string");
      const unsigned char c = static_cast<unsigned char>(p_[i_++]);
      if (c == '"') return out;
      if (c < 0x20) error("control character in string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      if (i_ >= n_) error("unterminated escape");
      const char e = p_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) error("unpaired low surrogate");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!(eat('\\') && eat('u'))) error("unpaired high surrogate");
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: error(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  const char* p_;
  std::size_t n_;
  std::size_t i_ = 0;
};

}  // namespace detail

// Parses the whole of [data, data + size) as one JSON value, or throws std::runtime_error.
inline Value parse(const char* data, std::size_t size) { return detail::Parser(data, size).parse_document(); }
inline Value parse(const std::string& s) { return parse(s.data(), s.size()); }

}  // namespace mesaopt::train::json
