// `kvshard serve`, `kvshard run-batch` and `kvshard summarize --input-dir`: the front ends over the
// engine the flags ask for (coordinator/engine_factory.h).
#include <cstdio>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "coordinator/batch_runner.h"
#include "coordinator/commands.h"
#include "coordinator/http_server.h"
#include "coordinator/serving_flags.h"
#include "coordinator/engine_factory.h"

ABSL_DECLARE_FLAG(std::string, input_dir);

namespace kvshard {
namespace {

absl::Status NoPositionalArguments(const char* command, const std::vector<std::string>& args) {
  if (args.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(command, " takes no positional arguments; got '", absl::StrJoin(args, " "), "'"));
}

}  // namespace

absl::Status RunServeCommand(const std::vector<std::string>& args) {
  KV_RETURN_IF_ERROR(NoPositionalArguments("serve", args));
  KV_ASSIGN_OR_RETURN(ServeOptions options, ServeOptionsFromFlags());
  std::string kv_note;
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags(&kv_note));
  if (!kv_note.empty()) std::fprintf(stderr, "kvshard serve: KV cache of requests that name none: %s\n", kv_note.c_str());
  return RunServe(*engine, options);
}

absl::Status RunBatchCommand(const std::vector<std::string>& args) {
  KV_RETURN_IF_ERROR(NoPositionalArguments("run-batch", args));
  KV_ASSIGN_OR_RETURN(BatchOptions options, BatchOptionsFromFlags());
  if (options.input_path.empty() || options.output_path.empty()) {
    return absl::InvalidArgumentError("run-batch needs -i IN.jsonl -o OUT.jsonl");
  }
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags());
  return RunBatch(*engine, options).status();
}

absl::Status RunSummarizeCommand(const std::vector<std::string>& args) {
  if (absl::GetFlag(FLAGS_input_dir).empty()) return RunSummarize(args);
  return RunSummarizeDirCommand(args);
}

absl::Status RunSummarizeDirCommand(const std::vector<std::string>& args) {
  KV_RETURN_IF_ERROR(NoPositionalArguments("summarize", args));
  KV_ASSIGN_OR_RETURN(SummarizeDirOptions options, SummarizeDirOptionsFromFlags());
  KV_ASSIGN_OR_RETURN(auto engine, MakeEngineFromFlags());
  return RunSummarizeDir(*engine, options).status();
}

}  // namespace kvshard
