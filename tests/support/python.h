// A python3 that can `import torch`, for the tests that make TorchScript models with
// examples/models/make_model.py.
#pragma once

#include <cstdlib>
#include <string>
#include <vector>

namespace shardguard::testsupport {

// $SHARDGUARD_PYTHON, Debian's /usr/bin/python3 (python3-torch), or the first python3
// in PATH, whichever can import torch first; "" when none can.
inline std::string python_with_torch() {
  std::vector<std::string> candidates;
  if (const char* p = std::getenv("SHARDGUARD_PYTHON")) candidates.push_back(p);
  candidates.push_back("/usr/bin/python3");
  candidates.push_back("python3");
  for (const auto& c : candidates) {
    const std::string cmd = "'" + c + "' -c 'import torch' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return c;
  }
  return "";
}

}  // namespace shardguard::testsupport
