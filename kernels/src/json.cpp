#include "fastsample/json.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_set>

#include "fastsample/error.h"

namespace fastsample {
namespace {

constexpr int kMaxDepth = 64;

struct Parser {
  const std::string& s;
  const std::string& where;
  size_t i = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(where + ": invalid JSON at byte " + std::to_string(i) + " (" + why + ")");
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool lit(const char* word) {
    const size_t n = std::char_traits<char>::length(word);
    if (s.compare(i, n, word) != 0) return false;
    i += n;
    return true;
  }
  static bool digit(char c) { return c >= '0' && c <= '9'; }

  void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }
  uint32_t hex4() {
    if (s.size() - i < 4) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k, ++i) {
      const char c = s[i];
      v <<= 4;
      if (digit(c)) v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string str() {
    // at the opening quote
    ++i;
    std::string out;
    while (true) {
      if (i >= s.size()) fail("unterminated string");
      const char c = s[i++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i >= s.size()) fail("unterminated string");
      const char e = s[i++];
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
          uint32_t cp = hex4();
          if (cp >= 0xd800 && cp < 0xdc00) {
            if (!lit("\\u")) fail("unpaired surrogate");
            const uint32_t lo = hex4();
            if (lo < 0xdc00 || lo >= 0xe000) fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          } else if (cp >= 0xdc00 && cp < 0xe000) {
            fail("unpaired surrogate");
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
  double num() {
    const size_t start = i;
    if (i < s.size() && s[i] == '-') ++i;
    if (i < s.size() && s[i] == '0') {
      ++i;
    } else if (i < s.size() && digit(s[i])) {
      while (i < s.size() && digit(s[i])) ++i;
    } else {
      fail("bad number");
    }
    if (i < s.size() && s[i] == '.') {
      ++i;
      if (i >= s.size() || !digit(s[i])) fail("bad number");
      while (i < s.size() && digit(s[i])) ++i;
    }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      if (i >= s.size() || !digit(s[i])) fail("bad number");
      while (i < s.size() && digit(s[i])) ++i;
    }
    const std::string tok = s.substr(start, i - start);
    const double v = std::strtod(tok.c_str(), nullptr);
    if (!std::isfinite(v)) fail("number out of range");
    return v;
  }
  Json value(int depth) {
    if (depth > kMaxDepth) fail("nested deeper than 64");
    ws();
    if (i >= s.size()) fail("unexpected end");
    Json j;
    const char c = s[i];
    if (c == '{') {
      j.type = Json::Type::Object;
      ++i;
      ws();
      if (i < s.size() && s[i] == '}') {
        ++i;
        return j;
      }
      std::unordered_set<std::string> keys;
      while (true) {
        ws();
        if (i >= s.size() || s[i] != '"') fail("expected a key");
        std::string key = str();
        if (!keys.insert(key).second) fail("duplicate key '" + key + "'");
        ws();
        if (i >= s.size() || s[i] != ':') fail("expected ':'");
        ++i;
        j.object.emplace_back(std::move(key), value(depth + 1));
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == '}') { ++i; return j; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      j.type = Json::Type::Array;
      ++i;
      ws();
      if (i < s.size() && s[i] == ']') {
        ++i;
        return j;
      }
      while (true) {
        j.array.push_back(value(depth + 1));
        ws();
        if (i < s.size() && s[i] == ',') { ++i; continue; }
        if (i < s.size() && s[i] == ']') { ++i; return j; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      j.type = Json::Type::String;
      j.string = str();
      return j;
    }
    if (lit("true")) { j.type = Json::Type::Bool; j.boolean = true; return j; }
    if (lit("false")) { j.type = Json::Type::Bool; return j; }
    if (lit("null")) return j;
    j.type = Json::Type::Number;
    j.number = num();
    return j;
  }
};

}  // namespace

const Json* Json::get(const std::string& key) const {
  for (const auto& kv : object)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

bool Json::is_integer() const {
  return type == Type::Number && std::floor(number) == number && std::fabs(number) <= 9007199254740992.0;
}

Json Json::parse(const std::string& text, const std::string& where) {
  Parser p{text, where};
  Json j = p.value(0);
  p.ws();
  if (p.i != text.size()) p.fail("trailing characters");
  return j;
}

}  // namespace fastsample
