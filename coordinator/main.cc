// kvshard: long-context LLM serving with a sharded, quantized KV cache.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "common/host_resources.h"
#include "coordinator/commands.h"
#include "coordinator/distributed_engine.h"
#include "coordinator/engine_factory.h"
#include "coordinator/serving_flags.h"
#include "worker/kv_shard_factory.h"
#include "worker/mpi_runtime.h"
#include "worker/worker_runtime.h"

namespace kvshard {

const std::vector<Command>& AllCommands() {
  static const std::vector<Command> commands = {
      {"generate", "complete a prompt: --prompt TEXT [--chat]", RunGenerate},
      {"summarize", "summarize a document (--input FILE) or a folder of them (--input-dir DIR)",
       RunSummarizeCommand},
      {"serve", "OpenAI-compatible HTTP API: [--host H] [--port P] [--api_key_file F]", RunServeCommand},
      {"run-batch", "run an OpenAI batch file, resumably: -i IN.jsonl -o OUT.jsonl", RunBatchCommand},
      {"calibrate", "calibrate the kvq/wkv KV schemes: --text FILE --out FILE", RunCalibrate},
      {"perplexity", "perplexity with a KV scheme: --text FILE --ctx N --kv SCHEME [--calibration FILE]",
       RunPerplexity},
      {"scale-bench", "decode-step and prefill timings of the workers (SYNTHETIC FILL contexts): "
       "--bench_tokens_per_worker, --bench_batches, --bench_prefill_tokens", RunScaleBench},
  };
  return commands;
}

}  // namespace kvshard

namespace {

std::string Usage() {
  std::string usage = "kvshard COMMAND [--flags]\n\nCommands:\n";
  for (const auto& c : kvshard::AllCommands()) absl::StrAppend(&usage, "  ", c.name, "  ", c.summary, "\n");
  absl::StrAppend(&usage, "\nEvery flag can also be set in a YAML file: --config FILE. Run with --help for flags.");
  return usage;
}

// Rank 0 (or the only process) runs the command; worker ranks serve the coordinator until it shuts them
// down, whatever the command.
int Main(int argc, char** argv, kvshard::MpiRuntime* mpi) {
  const bool is_worker = mpi != nullptr && !mpi->is_coordinator();
  // "-i IN -o OUT" and "--input-dir DIR" are spelled as their flags before Abseil parses them.
  std::vector<std::string> expanded = kvshard::ExpandServingShortFlags(std::vector<std::string>(argv, argv + argc));
  std::vector<char*> expanded_argv;
  for (std::string& arg : expanded) expanded_argv.push_back(arg.data());
  auto parsed = kvshard::ParseFlagsAndConfig(static_cast<int>(expanded_argv.size()), expanded_argv.data(), Usage());
  if (!parsed.ok()) {
    // Every rank parses the same command line; one message is enough.
    if (!is_worker) std::fprintf(stderr, "kvshard: %s\n", std::string(parsed.status().message()).c_str());
    return 2;
  }
  if (is_worker) return kvshard::RunWorker(*mpi, kvshard::KvShardFactoryMakerForThisBuild());
  // OpenMP starts a thread per online CPU; in a container with a CPU quota, or bound to fewer CPUs, the
  // extra threads only wait for each other. (A worker sets its own count, its share of the node.)
  omp_set_num_threads(std::min(omp_get_max_threads(), kvshard::ThreadsPerRank(mpi != nullptr ? mpi->ranks_on_node() : 1)));
  const std::vector<std::string>& args = *parsed;
  if (args.size() < 2) {
    std::fprintf(stderr, "%s\n", Usage().c_str());
    return 2;
  }
  for (const auto& command : kvshard::AllCommands()) {
    if (args[1] != command.name) continue;
    const absl::Status status = command.run(std::vector<std::string>(args.begin() + 2, args.end()));
    if (!status.ok()) {
      std::fprintf(stderr, "kvshard %s: %s\n", command.name, std::string(status.message()).c_str());
      return 1;
    }
    return 0;
  }
  std::fprintf(stderr, "kvshard: unknown command '%s'\n\n%s\n", args[1].c_str(), Usage().c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  kvshard::MpiRuntime* mpi = nullptr;
  if (kvshard::LaunchedByMpirunWithPeers()) {
    auto runtime = kvshard::MpiRuntime::Initialize(&argc, &argv);
    if (!runtime.ok()) {
      std::fprintf(stderr, "kvshard: %s\n", std::string(runtime.status().message()).c_str());
      return 2;
    }
    mpi = *runtime;
  }
  const int code = Main(argc, argv, mpi);
  if (mpi != nullptr) {
    if (mpi->is_coordinator()) kvshard::ShutdownWorkers(*mpi);
    mpi->Finalize();
  }
  return code;
}
