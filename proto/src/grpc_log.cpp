#include "shardguard/proto/grpc_log.h"

#include <grpc/support/log.h>

#include <string>

#include "shardguard/common/log.h"

namespace shardguard::proto {
namespace {

void to_json_line(gpr_log_func_args* args) {
  log::Level level = log::Level::kInfo;
  switch (args->severity) {
    case GPR_LOG_SEVERITY_DEBUG: level = log::Level::kDebug; break;
    case GPR_LOG_SEVERITY_INFO: level = log::Level::kInfo; break;
    case GPR_LOG_SEVERITY_ERROR: level = log::Level::kWarn; break;
  }
  std::string file = args->file ? args->file : "";
  if (const auto slash = file.rfind('/'); slash != std::string::npos) file.erase(0, slash + 1);
  log::write(level, args->message ? args->message : "",
             {{"source", "grpc"}, {"file", file + ":" + std::to_string(args->line)}});
}

}  // namespace

void route_grpc_logs_to_json() { gpr_set_log_function(&to_json_line); }

}  // namespace shardguard::proto
