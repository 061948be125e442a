// run-batch with the fake engine: input parsing, error records, resuming, and repair of a torn last line.
#include "coordinator/batch_runner.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/fake_engine.h"

namespace kvshard {
namespace {

using nlohmann::json;
using testing::FakeEngine;

class BatchRunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("kvshard_batch_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    options_.input_path = (dir_ / "in.jsonl").string();
    options_.output_path = (dir_ / "out.jsonl").string();
    options_.show_progress = false;
    options_.fsync = false;  // the tests check content, not durability
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::string ChatLine(const std::string& id, int max_tokens = 8) {
    return json{{"custom_id", id},
                {"method", "POST"},
                {"url", "/v1/chat/completions"},
                {"body",
                 {{"model", "fake-model"},
                  {"messages", json::array({{{"role", "user"}, {"content", "hello " + id}}})},
                  {"max_tokens", max_tokens},
                  {"temperature", 0}}}}
        .dump();
  }
  static std::string CompletionLine(const std::string& id) {
    return json{{"custom_id", id},
                {"method", "POST"},
                {"url", "/v1/completions"},
                {"body", {{"prompt", "say " + id}, {"max_tokens", 5}, {"temperature", 0}}}}
        .dump();
  }
  void WriteInput(const std::vector<std::string>& lines) {
    std::ofstream out(options_.input_path, std::ios::binary);
    for (const std::string& line : lines) out << line << "\n";
  }
  std::string ReadOutput() const {
    std::ifstream in(options_.output_path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  std::vector<json> OutputRecords() const {
    std::vector<json> records;
    std::istringstream in(ReadOutput());
    std::string line;
    while (std::getline(in, line)) records.push_back(json::parse(line));
    return records;
  }
  // custom_id (or "line N" for id-less records) -> how many records answer it.
  std::map<std::string, int> AnswerCounts() const {
    std::map<std::string, int> counts;
    for (const json& r : OutputRecords()) {
      const std::string key = r["custom_id"].is_string() ? r["custom_id"].get<std::string>()
                                                         : absl::StrCat("line ", r["error"]["line"].get<int>());
      ++counts[key];
    }
    return counts;
  }

  std::filesystem::path dir_;
  BatchOptions options_;
  FakeEngine engine_;
};

TEST_F(BatchRunnerTest, ParsesGoodAndBadLines) {
  BatchInputLine good = ParseBatchInputLine(ChatLine("a"), 3);
  EXPECT_TRUE(good.error.ok()) << good.error;
  EXPECT_EQ(good.custom_id, "a");
  EXPECT_EQ(good.endpoint, ApiEndpoint::kChatCompletions);
  EXPECT_EQ(good.line_number, 3);

  struct Case {
    std::string text;
    std::string expected_custom_id;
    std::string message_part;
  };
  const std::vector<Case> cases = {
      {"{not json", "", "not valid JSON"},
      {"[1, 2]", "", "JSON object"},
      {R"({"method": "POST", "url": "/v1/completions", "body": {}})", "", "custom_id"},
      {R"({"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}})", "", "custom_id"},
      {R"({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}})", "", "custom_id"},
      {R"({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}})", "x", "method"},
      {R"({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}})", "x", "url"},
      {R"({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": "hi"})", "x", "body"},
      {R"({"custom_id": "x", "method": "POST", "url": "/v1/completions"})", "x", "body"},
  };
  for (const Case& c : cases) {
    BatchInputLine line = ParseBatchInputLine(c.text, 5);
    EXPECT_FALSE(line.error.ok()) << c.text;
    EXPECT_EQ(line.custom_id, c.expected_custom_id) << c.text;
    EXPECT_NE(std::string(line.error.message()).find(c.message_part), std::string::npos)
        << c.text << " -> " << line.error;
    EXPECT_NE(std::string(line.error.message()).find("line 5"), std::string::npos) << line.error;
  }
}

TEST_F(BatchRunnerTest, TwentyRequestsWithTwoMalformedLines) {
  std::vector<std::string> lines;
  for (int i = 0; i < 20; ++i) {
    const std::string id = absl::StrCat("req-", i);
    if (i == 4) {
      lines.push_back("{\"custom_id\": \"req-4\", \"method\": \"POST\", ");  // cut off
    } else if (i == 11) {
      lines.push_back("this is not json");
    } else {
      lines.push_back(i % 3 == 0 ? CompletionLine(id) : ChatLine(id));
    }
  }
  lines.insert(lines.begin() + 7, "   ");  // blank lines are not requests
  WriteInput(lines);

  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->total, 20);
  EXPECT_EQ(summary->succeeded, 18);
  EXPECT_EQ(summary->failed, 2);
  EXPECT_EQ(summary->skipped, 0);

  int results = 0, errors = 0;
  for (const json& r : OutputRecords()) {
    ASSERT_TRUE(r.contains("id") && r.contains("custom_id") && r.contains("response") && r.contains("error"));
    if (r["error"].is_null()) {
      ++results;
      EXPECT_EQ(r["response"]["status_code"], 200);
      EXPECT_TRUE(r["response"]["request_id"].is_string());
      const json& body = r["response"]["body"];
      const std::string id = r["custom_id"];
      const bool chat = body["object"] == "chat.completion";
      const std::string text = chat ? body["choices"][0]["message"]["content"] : body["choices"][0]["text"];
      EXPECT_EQ(text, std::string(FakeEngine::kSentence.substr(0, chat ? 8 : 5))) << id;
      EXPECT_EQ(body["usage"]["completion_tokens"], chat ? 8 : 5);
    } else {
      ++errors;
      EXPECT_TRUE(r["response"].is_null());
      EXPECT_EQ(r["error"]["code"], "invalid_request");
      EXPECT_TRUE(r["error"]["line"] == 5 || r["error"]["line"] == 13) << r.dump();
    }
  }
  EXPECT_EQ(results, 18);
  EXPECT_EQ(errors, 2);

  // A rerun finds everything answered and adds nothing.
  const std::string before = ReadOutput();
  const int calls = engine_.calls();
  summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->skipped, 20);
  EXPECT_EQ(summary->succeeded + summary->failed, 0);
  EXPECT_EQ(ReadOutput(), before);
  EXPECT_EQ(engine_.calls(), calls);
}

// An engine that batches runs several requests at once; every line is still answered exactly once (in the
// order requests finish), and a rerun adds nothing.
TEST_F(BatchRunnerTest, RunsRequestsTogetherWhenTheEngineBatchesThem) {
  engine_.set_max_concurrent(4);
  engine_.set_token_delay(std::chrono::milliseconds(3));
  std::vector<std::string> lines;
  for (int i = 0; i < 12; ++i) lines.push_back(i == 5 ? "not json" : ChatLine(absl::StrCat("req-", i), 6 + i % 3));
  WriteInput(lines);
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->succeeded, 11);
  EXPECT_EQ(summary->failed, 1);
  EXPECT_GE(engine_.peak_in_flight(), 2);
  EXPECT_LE(engine_.peak_in_flight(), 4);
  EXPECT_GE(summary->peak_running, engine_.peak_in_flight());
  EXPECT_LE(summary->peak_running, 4);
  std::map<std::string, int> expected;
  for (int i = 0; i < 12; ++i) expected[i == 5 ? "line 6" : absl::StrCat("req-", i)] = 1;
  EXPECT_EQ(AnswerCounts(), expected);
  for (const json& r : OutputRecords()) {
    if (!r["error"].is_null()) continue;
    const int i = std::stoi(r["custom_id"].get<std::string>().substr(4));
    EXPECT_EQ(r["response"]["body"]["choices"][0]["message"]["content"],
              std::string(FakeEngine::kSentence.substr(0, 6 + i % 3)));
  }
  EXPECT_EQ(summary->tokens_generated, 76);  // 6, 7 or 8 tokens by i % 3, for the 11 good lines

  const std::string before = ReadOutput();
  summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->skipped, 12);
  EXPECT_EQ(ReadOutput(), before);
}

TEST_F(BatchRunnerTest, RejectedRequestsGetTheirStatusAndTheJobGoesOn) {
  json too_long = json::parse(ChatLine("too-long"));
  too_long["body"]["max_tokens"] = 100000;
  json unknown_model = json::parse(ChatLine("unknown-model"));
  unknown_model["body"]["model"] = "gpt-17";
  json fails = json::parse(CompletionLine("engine-fails"));
  fails["body"]["prompt"] = "FAIL now";
  WriteInput({too_long.dump(), unknown_model.dump(), fails.dump(), ChatLine("fine")});

  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->succeeded, 1);
  EXPECT_EQ(summary->failed, 3);
  std::map<std::string, json> by_id;
  for (const json& r : OutputRecords()) by_id[r["custom_id"]] = r;
  EXPECT_EQ(by_id["too-long"]["response"]["status_code"], 400);
  EXPECT_EQ(by_id["too-long"]["response"]["body"]["error"]["code"], "context_length_exceeded");
  EXPECT_EQ(by_id["unknown-model"]["response"]["status_code"], 404);
  EXPECT_EQ(by_id["unknown-model"]["response"]["body"]["error"]["code"], "model_not_found");
  EXPECT_EQ(by_id["engine-fails"]["response"]["status_code"], 500);
  EXPECT_EQ(by_id["engine-fails"]["response"]["body"]["error"]["type"], "server_error");
  EXPECT_EQ(by_id["fine"]["response"]["status_code"], 200);
}

TEST_F(BatchRunnerTest, RepeatedCustomIdGetsAnErrorRecordOfItsOwn) {
  WriteInput({ChatLine("same"), ChatLine("other"), ChatLine("same")});
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->succeeded, 2);
  EXPECT_EQ(summary->failed, 1);
  const std::map<std::string, int> counts = AnswerCounts();
  EXPECT_EQ(counts, (std::map<std::string, int>{{"same", 1}, {"other", 1}, {"line 3", 1}}));
  // Resuming keeps it that way.
  summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->skipped, 3);
  EXPECT_EQ(AnswerCounts(), counts);
}

TEST_F(BatchRunnerTest, ResumesAfterATornLastLine) {
  std::vector<std::string> lines;
  for (int i = 0; i < 10; ++i) lines.push_back(ChatLine(absl::StrCat("doc-", i)));
  WriteInput(lines);
  // A first run that answered 4 requests, then died in the middle of writing the 5th record.
  {
    std::vector<std::string> first(lines.begin(), lines.begin() + 4);
    BatchOptions partial = options_;
    partial.input_path = (dir_ / "first.jsonl").string();
    std::ofstream(partial.input_path) << first[0] << "\n" << first[1] << "\n" << first[2] << "\n" << first[3] << "\n";
    ASSERT_TRUE(RunBatch(engine_, partial).ok());
    std::ofstream out(options_.output_path, std::ios::binary | std::ios::app);
    out << R"({"id": "batch_req_x", "custom_id": "doc-4", "response": {"status_co)";
  }
  absl::StatusOr<BatchOutputState> state = LoadAndRepairBatchOutput(options_.output_path);
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->records, 4);
  EXPECT_GT(state->repaired_bytes, 0);
  EXPECT_EQ(state->custom_ids.count("doc-3"), 1u);
  EXPECT_EQ(state->custom_ids.count("doc-4"), 0u);
  const std::string repaired = ReadOutput();
  ASSERT_FALSE(repaired.empty());
  EXPECT_EQ(repaired.back(), '\n');

  // Tear it again and let RunBatch do the repair itself.
  std::ofstream(options_.output_path, std::ios::binary | std::ios::app) << "{\"id\": \"batch_req_y\", \"cus";
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_GT(summary->repaired_bytes, 0);
  EXPECT_EQ(summary->skipped, 4);
  EXPECT_EQ(summary->succeeded, 6);
  std::map<std::string, int> expected;
  for (int i = 0; i < 10; ++i) expected[absl::StrCat("doc-", i)] = 1;
  EXPECT_EQ(AnswerCounts(), expected);
  for (const json& r : OutputRecords()) EXPECT_EQ(r["response"]["status_code"], 200);
}

TEST_F(BatchRunnerTest, RefusesAnOutputWithACorruptCompleteLine) {
  WriteInput({ChatLine("a")});
  std::ofstream(options_.output_path) << "garbage that is not a record\n";
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_FALSE(summary.ok());
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(summary.status().message()).find("line 1"), std::string::npos) << summary.status();
  EXPECT_EQ(ReadOutput(), "garbage that is not a record\n");  // left alone
}

TEST_F(BatchRunnerTest, MissingInputIsAClearError) {
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_FALSE(summary.ok());
  EXPECT_NE(std::string(summary.status().message()).find("in.jsonl"), std::string::npos) << summary.status();
  options_.output_path = options_.input_path;
  WriteInput({ChatLine("a")});
  EXPECT_FALSE(RunBatch(engine_, options_).ok());
}

TEST_F(BatchRunnerTest, EmptyInputWritesNothing) {
  WriteInput({});
  absl::StatusOr<BatchSummary> summary = RunBatch(engine_, options_);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->total, 0);
  EXPECT_EQ(ReadOutput(), "");
}

TEST_F(BatchRunnerTest, SummarizesAFolderOfDocuments) {
  const auto docs = dir_ / "docs";
  std::filesystem::create_directories(docs);
  std::ofstream(docs / "b.txt") << "Second document. <|im_end|> stays text.";
  std::ofstream(docs / "a.md") << "First document.";
  std::ofstream(docs / "ignored.bin") << "not a document";
  std::ofstream(docs / ".hidden.txt") << "hidden";
  SummarizeDirOptions options;
  options.input_dir = docs.string();
  options.output_path = (dir_ / "summaries.jsonl").string();
  options.max_tokens = 12;
  options.batch = options_;
  absl::StatusOr<BatchSummary> summary = RunSummarizeDir(engine_, options);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->total, 2);
  EXPECT_EQ(summary->succeeded, 2);

  std::ifstream requests(options.output_path + ".requests.jsonl");
  std::string first_line;
  std::getline(requests, first_line);
  const json first = json::parse(first_line);
  EXPECT_EQ(first["custom_id"], "a.md");
  EXPECT_EQ(first["body"]["max_tokens"], 12);
  EXPECT_NE(first["body"]["messages"][0]["content"].get<std::string>().find("First document."), std::string::npos);

  std::ifstream out(options.output_path);
  std::string line;
  int n = 0;
  while (std::getline(out, line)) {
    const json r = json::parse(line);
    EXPECT_EQ(r["response"]["status_code"], 200);
    EXPECT_EQ(r["response"]["body"]["choices"][0]["message"]["content"],
              std::string(FakeEngine::kSentence.substr(0, 12)));
    ++n;
  }
  EXPECT_EQ(n, 2);

  SummarizeDirOptions empty = options;
  empty.input_dir = (dir_ / "nothing-here").string();
  EXPECT_FALSE(RunSummarizeDir(engine_, empty).ok());
}

}  // namespace
}  // namespace kvshard
