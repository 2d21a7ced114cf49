// Small string helpers several components need (CSV and list flags, kubeconfig
// tokens, label selectors).
#pragma once

#include <string>
#include <vector>

namespace shardguard {

// The parts of `s` between the separators, empty ones included ("a,,b" → 3 parts;
// "" → one empty part).
inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (char c : s) {
    if (c == sep) {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

// `s` without leading and trailing spaces, tabs, CRs and LFs.
inline std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

}  // namespace shardguard
