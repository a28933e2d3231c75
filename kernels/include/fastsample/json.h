// A small JSON reader for manifest.json (RFC 8259: objects, arrays, strings, numbers, true,
// false, null). Bounded: nesting depth <= 64; duplicate keys in one object are refused.

#pragma once

#include <string>
#include <utility>
#include <vector>

namespace fastsample {

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;

  // The member KEY of an object, or null when absent (or when this is not an object).
  const Json* get(const std::string& key) const;
  bool is_integer() const;   // a Number with an integral value within +-2^53

  // Throws fastsample::Error "WHERE: invalid JSON at byte N (WHY)".
  static Json parse(const std::string& text, const std::string& where);
};

}  // namespace fastsample
