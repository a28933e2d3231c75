#pragma once

#include <stdexcept>
#include <string>

namespace fastsample {

// A problem with the user's input (artifact directory, schedule, noise files, arguments): the
// message is one line naming the file or argument; fastsample-run prints it and exits 2.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace fastsample
