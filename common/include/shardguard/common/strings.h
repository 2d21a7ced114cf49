// Small string helpers several components need (CSV and list flags, kubeconfig
// tokens, label selectors).
#pragma once

#include <cstdio>
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

// The parts with `sep` between them (split's inverse for one-character separators).
inline std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i > 0 ? sep : "") + parts[i];
  return out;
}

// `s` percent-encoded for a URL query or path segment: RFC 3986's unreserved
// characters (letters, digits, '-', '_', '.', '~') stay, every other byte is %XX.
inline std::string url_encode(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    const bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                            c == '-' || c == '_' || c == '.' || c == '~';
    if (unreserved) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  return out;
}

// A DNS-1123 label: [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most `max` characters (63 in
// DNS; names built from a label may need it shorter).
inline bool is_dns_label(const std::string& s, std::size_t max = 63) {
  if (s.empty() || s.size() > max) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return s.front() != '-' && s.back() != '-';
}

// `s` without leading and trailing spaces, tabs, CRs and LFs.
inline std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// A path the pod may be given: absolute, with no ".." segment that could climb out of
// what it names (a volume's export, the dataset directory).
inline bool is_absolute_path_without_dotdot(const std::string& path) {
  if (path.empty() || path[0] != '/') return false;
  for (std::size_t begin = 0; begin <= path.size();) {
    std::size_t end = path.find('/', begin);
    if (end == std::string::npos) end = path.size();
    if (path.compare(begin, end - begin, "..") == 0) return false;
    begin = end + 1;
  }
  return true;
}

// A ratio or share as people read it in messages and reports: four decimals ("0.2500"),
// the precision the job's status keeps (status rounds to the same four).
inline std::string format_ratio(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

}  // namespace shardguard
