// `mpirun -np 3 kvshard generate ...` end to end with a tiny synthetic model, and how the job ends when
// a worker fails, is killed by a signal, or hangs: never a hang, always within 30 s, with a message
// naming the rank.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvshard {
namespace {

const char* kTinyModel =
    " --synthetic_model --synthetic_layers 2 --synthetic_hidden 64 --synthetic_heads 2 --synthetic_kv_heads 1"
    " --synthetic_head_dim 32 --synthetic_ffn 128 --synthetic_vocab 300 --worker_threads 1";

struct RunResult {
  int exit_code = -1;
  double seconds = 0;
  std::string output;  // stdout and stderr of every rank and of mpirun
};

RunResult RunCommand(const std::string& command_line) {
  const auto log = std::filesystem::temp_directory_path() /
                   ("kvshard_distributed_cli_test_" + std::to_string(getpid()) + ".txt");
  const std::string command = command_line + " >" + log.string() + " 2>&1 </dev/null";
  const auto start = std::chrono::steady_clock::now();
  const int status = std::system(command.c_str());
  RunResult result;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream in(log);
  result.output.assign(std::istreambuf_iterator<char>(in), {});
  std::filesystem::remove(log);
  return result;
}

std::string Kvshard() { return std::string(KVSHARD_BINARY_DIR) + "/kvshard"; }

// 90 s is the hang guard: a run that reaches it failed the test.
std::string Mpirun(int ranks, const std::string& args) {
  return "timeout 90 " + std::string(KVSHARD_MPIEXEC) + " " + KVSHARD_MPIRUN_FLAGS + " -np " +
         std::to_string(ranks) + " " + Kvshard() + " " + args;
}

TEST(DistributedCliTest, GeneratesUnderMpirun) {
  const RunResult r = RunCommand(Mpirun(3, std::string("generate --prompt 'hello there' --max_tokens 8") + kTinyModel));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("generated 8 tokens"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("prefill 11/11 tokens"), std::string::npos) << r.output;
}

TEST(DistributedCliTest, ServesHttpUnderMpirunWithKvMetricsPerWorker) {
  const RunResult r = RunCommand("timeout 120 python3 " + std::string(KVSHARD_SOURCE_DIR) +
                                 "/tests/mpi/serve_under_mpirun.py " + KVSHARD_MPIEXEC + " " + KVSHARD_MPIRUN_FLAGS +
                                 " -np 3 " + Kvshard() + " serve --single_worker_threshold_tokens 0" + kTinyModel);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"completion_tokens\": 5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("worker=\\\"0\\\""), std::string::npos) << r.output;  // metrics of both workers
  EXPECT_NE(r.output.find("worker=\\\"1\\\""), std::string::npos) << r.output;
  // The context spans both workers: each one's decode step time and the merges were observed.
  EXPECT_NE(r.output.find("\"decode_step_workers\": [\"0\", \"1\"]"), std::string::npos) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("\"merges\": [1-9]"))) << r.output;
}

// run-batch hands the distributed engine several requests at once (its decode batch), under mpirun and in
// one process alike, and every line is answered.
void ExpectBatchDecodedTogether(bool under_mpirun) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("kvshard_run_batch_" + std::to_string(getpid()) + (under_mpirun ? "_mpi" : "_one"));
  std::filesystem::create_directories(dir);
  {
    std::ofstream in(dir / "in.jsonl");
    for (int i = 0; i < 6; ++i) {
      in << "{\"custom_id\": \"r" << i << "\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": "
         << "{\"prompt\": \"request number " << i << "\", \"max_tokens\": 8, \"temperature\": 0}}\n";
    }
  }
  const std::string args =
      "run-batch -i " + (dir / "in.jsonl").string() + " -o " + (dir / "out.jsonl").string() + " --max_batch 4" + kTinyModel;
  const RunResult r = RunCommand(under_mpirun ? Mpirun(3, args) : "timeout 120 " + Kvshard() + " " + args);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::smatch at_once;
  ASSERT_TRUE(std::regex_search(r.output, at_once, std::regex("6 succeeded, 0 failed, 0 skipped \\(answered before\\), "
                                                              "up to ([0-9]+) at once"))) << r.output;
  EXPECT_EQ(at_once[1], "4") << r.output;
  std::ifstream out(dir / "out.jsonl");
  std::string line;
  int records = 0;
  while (std::getline(out, line)) {
    ++records;
    EXPECT_NE(line.find("\"status_code\":200"), std::string::npos) << line;
    EXPECT_NE(line.find("\"completion_tokens\":8"), std::string::npos) << line;
  }
  EXPECT_EQ(records, 6);
  std::filesystem::remove_all(dir);
}

TEST(DistributedCliTest, RunsABatchFileWithRequestsDecodedTogether) { ExpectBatchDecodedTogether(true); }

TEST(DistributedCliTest, RunsABatchFileWithRequestsDecodedTogetherInOneProcess) { ExpectBatchDecodedTogether(false); }

TEST(DistributedCliTest, EveryLineAboutTheFillSaysSyntheticFill) {
  const RunResult r = RunCommand(Mpirun(
      3, std::string("generate --prompt hi --max_tokens 4 --synthetic_fill_tokens 5000") + kTinyModel));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  int fill_lines = 0;
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);) {
    if (!std::regex_search(line, std::regex("\\bfill", std::regex::icase))) continue;  // not "prefill"
    ++fill_lines;
    EXPECT_NE(line.find("SYNTHETIC FILL"), std::string::npos) << "unlabelled: " << line;
  }
  EXPECT_GE(fill_lines, 2) << r.output;  // the fill's progress and the closing summary
}

TEST(DistributedCliTest, ScaleBenchReportsDecodeAndPrefillAsJsonLines) {
  const auto json = std::filesystem::temp_directory_path() / ("kvshard_scale_bench_" + std::to_string(getpid()) + ".jsonl");
  std::filesystem::remove(json);
  const RunResult r = RunCommand(Mpirun(
      3, std::string("scale-bench --bench_tokens_per_worker 3000 --bench_batches 1,3 --bench_decode_steps 6 "
                     "--bench_prompt_tokens 8 --bench_prefill_tokens 100 --bench_gemm_tflops 1 --bench_json ") +
             json.string() + kTinyModel));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("decode  workers 2  tokens/worker +3000  batch +1 .*SYNTHETIC FILL")))
      << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("decode  workers 2  tokens/worker +3000  batch +3 "))) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("prefill workers 2  tokens +100 .*MFU"))) << r.output;
  std::ifstream in(json);
  int lines = 0;
  for (std::string line; std::getline(in, line);) {
    ++lines;
    EXPECT_EQ(line.front(), '{') << line;
  }
  EXPECT_EQ(lines, 3);  // two decode runs and one prefill
  std::filesystem::remove(json);
}

TEST(DistributedCliTest, ScaleBenchSizesThatLeaveNoRoomAreAClearError) {
  const RunResult r = RunCommand(Mpirun(
      3, std::string("scale-bench --bench_tokens_per_worker 10 --bench_batches 4 --bench_prompt_tokens 8") + kTinyModel));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("leave no room"), std::string::npos) << r.output;
}

TEST(DistributedCliTest, ScaleBenchRunsInOneProcessOverItsWorker) {
  const RunResult r = RunCommand("timeout 120 " + Kvshard() +
                                 " scale-bench --bench_tokens_per_worker 2000 --bench_batches 2 --bench_decode_steps 4 "
                                 "--bench_prompt_tokens 8" + kTinyModel);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("decode  workers 1  tokens/worker +2000  batch +2 .*SYNTHETIC FILL")))
      << r.output;
}

TEST(DistributedCliTest, FillInOneProcessSaysSyntheticFill) {
  const RunResult r =
      RunCommand("timeout 60 " + Kvshard() + " generate --prompt hi --max_tokens 4 --synthetic_fill_tokens 10" + kTinyModel);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("SYNTHETIC FILL of 10 tokens"), std::string::npos) << r.output;
}

TEST(DistributedCliTest, FailingWorkerFailsTheRequestNamingTheRank) {
  const RunResult r = RunCommand(Mpirun(3, std::string("generate --prompt 'hello there' --max_tokens 20 "
                                                "--debug_fail_worker_at_step 2 --debug_fault_worker_rank 2") +
                                        kTinyModel));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("kvshard generate: worker rank 2: injected failure at step 2"), std::string::npos)
      << r.output;
  EXPECT_LT(r.seconds, 30);
}

TEST(DistributedCliTest, KilledWorkerEndsTheJobWithin30SecondsNamingTheRank) {
  const RunResult r = RunCommand(Mpirun(3, std::string("generate --prompt 'hello there' --max_tokens 200 "
                                                "--debug_kill_worker_at_step 3 --debug_fault_worker_rank 2") +
                                        kTinyModel));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << "hung until the guard timeout:\n" << r.output;
  EXPECT_LT(r.seconds, 30) << r.output;
  EXPECT_NE(r.output.find("rank 2"), std::string::npos) << r.output;
  std::printf("killed worker: the job ended %.1f s after launch, exit code %d\n", r.seconds, r.exit_code);
}

TEST(DistributedCliTest, HungWorkerEndsTheJobAtTheTimeoutNamingTheRank) {
  const RunResult r = RunCommand(Mpirun(3, std::string("generate --prompt 'hello there' --max_tokens 200 "
                                                "--debug_hang_worker_at_step 3 --debug_fault_worker_rank 2 "
                                                "--worker_timeout_s 5 --collective_timeout_s 20") +
                                        kTinyModel));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.exit_code, 124) << "hung until the guard timeout:\n" << r.output;
  EXPECT_LT(r.seconds, 30) << r.output;
  EXPECT_NE(r.output.find("did not report step 3"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 2"), std::string::npos) << r.output;
  std::printf("hung worker: the job ended %.1f s after launch, exit code %d\n", r.seconds, r.exit_code);
}

}  // namespace
}  // namespace kvshard
