// A python3 that can `import torch`, for the tests that make TorchScript models with
// examples/models/make_model.py.
#pragma once

#include <cstdlib>
#include <string>
#include <vector>

#include "shardguard/common/files.h"

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

// Writes examples/models/make_model.py's small gpt — context 16, hidden 32, 2 layers,
// 2 heads, vocab 256: shaped like the tests' small_gpt_job_json — to `out` (its log
// next to it, `out`.log). "" when made, else the log.
inline std::string make_small_lm(const std::string& python, const std::string& out) {
  const std::string script = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/models/make_model.py";
  const std::string log = out + ".log";
  const std::string cmd = "'" + python + "' '" + script + "' --out '" + out +
                          "' --context 16 --hidden 32 --depth 2 --heads 2 > '" + log + "' 2>&1";
  if (std::system(cmd.c_str()) == 0) return "";
  return "make_model.py failed:\n" + read_file(log);
}

}  // namespace shardguard::testsupport
