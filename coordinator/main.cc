// kvshard: long-context LLM serving with a sharded, quantized KV cache.
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/config.h"
#include "coordinator/commands.h"

namespace kvshard {

const std::vector<Command>& AllCommands() {
  static const std::vector<Command> commands = {
      {"generate", "complete a prompt: --prompt TEXT [--chat]", RunGenerate},
      {"summarize", "summarize a document: --input FILE", RunSummarize},
      {"calibrate", "calibrate the kvq/wkv KV schemes: --text FILE --out FILE", RunCalibrate},
      {"perplexity", "perplexity with a KV scheme: --text FILE --ctx N --kv SCHEME [--calibration FILE]",
       RunPerplexity},
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

}  // namespace

int main(int argc, char** argv) {
  auto parsed = kvshard::ParseFlagsAndConfig(argc, argv, Usage());
  if (!parsed.ok()) {
    std::fprintf(stderr, "kvshard: %s\n", std::string(parsed.status().message()).c_str());
    return 2;
  }
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
