// The kvshard binary on bad input: one-line errors naming the problem, non-zero exit, never a crash or
// a hang (each run is bounded by `timeout`).
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace kvshard {
namespace {

struct RunResult {
  int exit_code = -1;
  std::string stderr_text;
  std::string stdout_text;
};

RunResult RunKvshard(const std::string& args) {
  // Per-process, per-test file names: ctest runs test cases as parallel processes.
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string stem = "kvshard_cli_" + std::string(info->name()) + "_" + std::to_string(getpid());
  static const std::filesystem::path dir = testing::FreshTempDir("cli");
  const std::string err = (dir / (stem + "_stderr.txt")).string();
  const std::string out = (dir / (stem + "_stdout.txt")).string();
  const std::string command = "timeout 120 " + std::string(KVSHARD_BINARY_DIR) + "/kvshard " + args + " >" + out +
                              " 2>" + err + " </dev/null";
  const int status = std::system(command.c_str());
  RunResult result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream e(err), o(out);
  result.stderr_text.assign(std::istreambuf_iterator<char>(e), {});
  result.stdout_text.assign(std::istreambuf_iterator<char>(o), {});
  return result;
}

std::string TempFile(const std::string& name, const std::string& bytes) {
  static const std::filesystem::path dir = testing::FreshTempDir("cli_inputs");
  const auto path = dir / name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path.string();
}

void ExpectCleanError(const RunResult& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(r.exit_code, 124) << "crashed or timed out: " << r.stderr_text;  // 124: timeout, >128: signal
  EXPECT_NE(r.stderr_text.find(needle), std::string::npos) << r.stderr_text;
  // One line: the message, then the newline.
  EXPECT_EQ(std::count(r.stderr_text.begin(), r.stderr_text.end(), '\n'), 1) << r.stderr_text;
}

TEST(CliTest, MissingModelPath) {
  ExpectCleanError(RunKvshard("generate --model /nonexistent/model.gguf --prompt hi"), "does not exist");
}

TEST(CliTest, WrongMagic) {
  const std::string path = TempFile("kvshard_bad_magic.gguf", std::string("GGXX\x03\0\0\0", 8) + std::string(64, '\0'));
  ExpectCleanError(RunKvshard("generate --model " + path + " --prompt hi"), "magic");
}

TEST(CliTest, TruncatedGguf) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  std::ifstream in(model, std::ios::binary);
  std::string head(1 << 20, '\0');
  in.read(head.data(), head.size());
  const std::string path = TempFile("kvshard_truncated.gguf", head);
  ExpectCleanError(RunKvshard("generate --model " + path + " --prompt hi"), "truncated");
}

TEST(CliTest, UnreadableInputFile) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  ExpectCleanError(RunKvshard("summarize --model " + model + " --input /nonexistent/doc.txt"), "cannot read input file");
}

TEST(CliTest, InputIsADirectory) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  ExpectCleanError(RunKvshard("summarize --model " + model + " --input /tmp"), "directory");
}

TEST(CliTest, PromptLongerThanContext) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  std::string text;
  for (int i = 0; i < 9000; ++i) text += " 7";  // each " 7" is one or two tokens; > 8192 in all
  const std::string path = TempFile("kvshard_long_prompt.txt", text);
  ExpectCleanError(RunKvshard("summarize --model " + model + " --input " + path), "context");
}

TEST(CliTest, UnknownCommandAndMissingArguments) {
  RunResult r = RunKvshard("frobnicate");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.stderr_text.find("unknown command"), std::string::npos);
  r = RunKvshard("generate --model /nonexistent");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.stderr_text.find("--prompt"), std::string::npos) << r.stderr_text;
}

TEST(CliTest, BadConfigFile) {
  const std::string path = TempFile("kvshard_bad.yaml", "no_such_setting: 3\n");
  RunResult r = RunKvshard("generate --config " + path + " --prompt hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.stderr_text.find("no_such_setting"), std::string::npos) << r.stderr_text;
}

TEST(CliTest, GenerateProducesText) {
  KVSHARD_REQUIRE_DEMO_MODEL(model);
  RunResult r = RunKvshard("generate --model " + model + " --chat --prompt 'What is the capital of France?' --max_tokens 12");
  EXPECT_EQ(r.exit_code, 0) << r.stderr_text;
  EXPECT_NE(r.stdout_text.find("Paris"), std::string::npos) << r.stdout_text;
}

}  // namespace
}  // namespace kvshard
