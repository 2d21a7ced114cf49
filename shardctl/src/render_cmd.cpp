// `shardctl render JOB.yaml`: the Kubernetes objects the operator would create for a
// ShardedTrainingJob (issue 4 item 7), made by the operator's own render() with fresh
// PKI and keys, printed as a YAML stream or a JSON List.
#include <cctype>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/operator/render.h"
#include "shardguard/shardctl/local_package.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/shardctl/job_pki.h"

namespace shardguard::shardctl {
namespace {

using nlohmann::json;

// ---- YAML emitter ---------------------------------------------------------------
// Block style. A string is written plain only when every YAML 1.1 and 1.2 reader
// takes it back as that same string (so never "true", "on", "1", "0.1.0", "null" or
// "-x"); multi-line text becomes a literal block; everything else is double-quoted
// with JSON escapes, which YAML double-quoted scalars share.

bool plain_safe(const std::string& s) {
  if (s.empty()) return false;
  if (!std::isalpha(static_cast<unsigned char>(s[0])) && s[0] != '_' && s[0] != '/') return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (std::isalnum(c) || c == '_' || c == '.' || c == '/' || c == '-') continue;
    // "a:b" is plain; "a:" and "a: b" are not.
    if (c == ':' && i + 1 < s.size() && s[i + 1] != ':') continue;
    return false;
  }
  std::string lower;
  for (const char c : s) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* word : {"null", "true", "false", "yes", "no", "on", "off", "y", "n"}) {
    if (lower == word) return false;
  }
  return true;
}

std::string quoted(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

// A literal block keeps the text byte for byte when: it has a line break, no control
// characters other than the line breaks, and its first non-empty line does not start
// with a space (which would need an indentation indicator).
bool literal_safe(const std::string& s) {
  if (s.find('\n') == std::string::npos) return false;
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if ((c < 0x20 && c != '\n') || c == 0x7f) return false;
  }
  const size_t first = s.find_first_not_of('\n');
  return first != std::string::npos && s[first] != ' ';
}

std::string spaces(int n) { return std::string(static_cast<size_t>(n), ' '); }

// Writes the scalar after "key:" or "-" (including the leading space and the newline).
// Block content goes at `indent`.
void emit_scalar(std::string& out, const json& v, int indent) {
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    if (plain_safe(s)) {
      out += " " + s + "\n";
    } else if (literal_safe(s)) {
      const size_t body_end = s.find_last_not_of('\n') + 1;
      const size_t trailing = s.size() - body_end;
      out += trailing == 0 ? " |-\n" : trailing == 1 ? " |\n" : " |+\n";
      size_t pos = 0;
      while (pos < body_end) {
        size_t nl = s.find('\n', pos);
        if (nl == std::string::npos || nl > body_end) nl = body_end;
        const std::string line = s.substr(pos, nl - pos);
        out += line.empty() ? "\n" : spaces(indent) + line + "\n";
        pos = nl + 1;
      }
      for (size_t i = 1; i < trailing; ++i) out += "\n";
    } else {
      out += " " + quoted(s) + "\n";
    }
  } else if (v.is_object()) {
    out += " {}\n";  // only empty ones reach here
  } else if (v.is_array()) {
    out += " []\n";
  } else {
    out += " " + v.dump() + "\n";  // number, bool, null
  }
}

bool nested(const json& v) { return (v.is_object() || v.is_array()) && !v.empty(); }

// A non-empty mapping or sequence whose first line continues the current line (the
// caller wrote its indentation or "- "); later lines are indented by `indent`.
void emit_node(std::string& out, const json& v, int indent) {
  bool first = true;
  if (v.is_object()) {
    for (const auto& [key, value] : v.items()) {
      if (!first) out += spaces(indent);
      first = false;
      out += (plain_safe(key) ? key : quoted(key)) + ":";
      if (nested(value)) {
        out += "\n" + spaces(indent + 2);
        emit_node(out, value, indent + 2);
      } else {
        emit_scalar(out, value, indent + 2);
      }
    }
  } else {
    for (const json& item : v) {
      if (!first) out += spaces(indent);
      first = false;
      out += "-";
      if (nested(item)) {
        out += " ";
        emit_node(out, item, indent + 2);
      } else {
        emit_scalar(out, item, indent + 2);
      }
    }
  }
}

}  // namespace

std::string ToYamlStream(const std::vector<json>& documents) {
  std::string out;
  for (const json& doc : documents) {
    out += "---\n";
    if (nested(doc)) {
      emit_node(out, doc, 0);
    } else {
      std::string scalar;
      emit_scalar(scalar, doc, 2);
      out += scalar.substr(1);  // drop the space that follows "key:" elsewhere
    }
  }
  return out;
}

int RunRender(const RenderOptions& o) {
  const char* cmd = "shardctl render: ";
  if (o.format != "yaml" && o.format != "json") {
    std::cerr << cmd << "--format: \"" << o.format << "\" is not one of yaml, json\n";
    return 2;
  }
  // The job is decoded and validated exactly as the operator does (job_from_json,
  // behind load_job_file); the object itself goes into each ConfigMap's job.json.
  JobSpec job;
  json object;
  try {
    job = load_job_file(o.job_file);
    object = yaml_to_json(read_file(o.job_file));
  } catch (const JobSpecError& e) {
    std::cerr << cmd << "invalid job " << o.job_file << ":\n";
    for (const FieldError& fe : e.errors()) std::cerr << "  " << fe.str() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << cmd << o.job_file << ": " << e.what() << "\n";
    return 2;
  }

  std::vector<json> objects;
  try {
    // Fresh PKI and keys, made as the operator makes them (job_pki.h): one CA per
    // job, one leaf SVID and 32-byte checkpoint and ledger keys per shard.
    const CaBundle ca = create_job_ca(job);
    // With replicas, one leaf and ledger key per replica (its own identity) and the
    // stage's checkpoint key for all of them, index r·n + i (op::slot_of).
    std::vector<op::ShardMaterial> shards;
    const int n = job.sharding.shards;
    for (int k = 0; k < n * op::replica_count(job); ++k) {
      const Leaf leaf = op::replica_count(job) > 1 ? issue_replica_leaf(job, ca, k % n, k / n)
                                                   : issue_shard_leaf(job, ca, k);
      const std::string checkpoint_key = k < n ? random_bytes(kAesKeyBytes) : shards[k % n].checkpoint_key;
      shards.push_back({leaf.cert_pem, leaf.key_pem, checkpoint_key, random_bytes(kAesKeyBytes)});
    }
    op::RenderInputs in = make_render_inputs(object, ca, std::move(shards));
    in.export_budget_bytes = o.export_budget_bytes;
    // As the operator: its default images where the job names none.
    if (job.template_.value("image", "").empty()) in.shardd_image = o.shardd_image;
    if (job.sidecar.value("image", "").empty()) in.sidecar_image = o.sidecar_image;
    // A package job: the manifest and the keys, as the operator reads them from the keys Secret.
    add_local_package(job, o.package_keys, in);
    objects = op::render(job, in).all();
  } catch (const op::RenderError& e) {
    std::cerr << cmd << "the operator would refuse job " << job.namespace_ << "/" << job.name << ": " << e.what()
              << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 1;
  }

  std::string text;
  if (o.format == "json") {
    text = json{{"apiVersion", "v1"}, {"kind", "List"}, {"metadata", json::object()}, {"items", objects}}.dump(
               2, ' ', false, json::error_handler_t::replace) +
           "\n";
  } else {
    text = "# " + std::to_string(objects.size()) + " objects the operator would create for ShardedTrainingJob " +
           job.namespace_ + "/" + job.name + " (shardctl render; the uid, the CA and every key are fresh)\n" +
           ToYamlStream(objects);
  }
  try {
    if (o.out_file.empty()) {
      std::cout << text << std::flush;
    } else {
      // Private keys inside: readable by the owner only.
      write_file_atomic(o.out_file, text, 0600);
      std::cerr << "wrote " << objects.size() << " objects to " << o.out_file << " (mode 0600: it holds private keys)\n";
    }
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace shardguard::shardctl
