// The kvshard subcommands. Each takes the positional arguments after the command name (flags are already
// parsed) and returns a Status that main() reports once, as one line, with a non-zero exit.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/engine.h"

namespace kvshard {

class SingleProcessEngine;

struct Command {
  const char* name;
  const char* summary;
  absl::Status (*run)(const std::vector<std::string>& args);
};

// Every command, in the order `kvshard --help` lists them.
const std::vector<Command>& AllCommands();

absl::Status RunGenerate(const std::vector<std::string>& args);
absl::Status RunSummarize(const std::vector<std::string>& args);
absl::Status RunCalibrate(const std::vector<std::string>& args);   // coordinator/quality_commands.cc
absl::Status RunPerplexity(const std::vector<std::string>& args);  // coordinator/quality_commands.cc
// Decode-step and prefill timings of the distributed engine (coordinator/scale_bench_command.cc).
absl::Status RunScaleBench(const std::vector<std::string>& args);
absl::Status RunServeCommand(const std::vector<std::string>& args);
absl::Status RunBatchCommand(const std::vector<std::string>& args);
// `summarize --input-dir DIR`: every document of a folder as a resumable batch.
absl::Status RunSummarizeDirCommand(const std::vector<std::string>& args);
// `summarize`: RunSummarizeDirCommand with --input-dir, else RunSummarize.
absl::Status RunSummarizeCommand(const std::vector<std::string>& args);

// The engine the flags describe: --model (or --synthetic_model), --device, --kv_scheme, --calibration
// (checked against the model); the distributed engine on rank 0 under mpirun (CreateEngineFromFlags).
absl::StatusOr<std::unique_ptr<Engine>> MakeEngineFromFlags(std::string* kv_note = nullptr);

// The model path: --model, or the cached demo model. An error says how to fetch the demo model.
absl::StatusOr<std::string> ResolveModelPath();
// Reads a whole file; the error names the file and the reason.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace kvshard
