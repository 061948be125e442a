#include "coordinator/batch_runner.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/progress.h"
#include "common/status.h"

namespace kvshard {
namespace {

using nlohmann::json;

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

// Closes a file descriptor on scope exit.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

absl::StatusOr<std::string> ReadAll(int fd, const std::string& path) {
  std::string data;
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("reading", path);
    }
    if (n == 0) break;
    data.append(buffer, static_cast<size_t>(n));
  }
  return data;
}

// Reads the records of OUT from an open descriptor and cuts off an unterminated last line.
absl::StatusOr<BatchOutputState> LoadAndRepair(int fd, const std::string& path) {
  if (lseek(fd, 0, SEEK_SET) < 0) return ErrnoError("seeking", path);
  KV_ASSIGN_OR_RETURN(std::string data, ReadAll(fd, path));
  BatchOutputState state;
  // Whatever follows the last newline is a record whose write was cut short: cut it off.
  const size_t complete = data.rfind('\n') == std::string::npos ? 0 : data.rfind('\n') + 1;
  if (complete < data.size()) {
    state.repaired_bytes = static_cast<int64_t>(data.size() - complete);
    if (ftruncate(fd, static_cast<off_t>(complete)) != 0) return ErrnoError("truncating", path);
    if (fsync(fd) != 0) return ErrnoError("syncing", path);
    data.resize(complete);
  }
  int64_t line_number = 0;
  size_t start = 0;
  while (start < data.size()) {
    const size_t end = data.find('\n', start);
    const std::string_view line(data.data() + start, end - start);
    start = end + 1;
    ++line_number;
    if (absl::StripAsciiWhitespace(absl::string_view(line.data(), line.size())).empty()) continue;
    const json record = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
    const auto bad = [&](const char* why) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " line ", line_number, " is not a batch output record (", why,
                       "); remove it or write to another file"));
    };
    if (record.is_discarded() || !record.is_object()) return bad("not a JSON object");
    auto id = record.find("custom_id");
    if (id != record.end() && id->is_string()) {
      state.custom_ids.insert(id->get<std::string>());
    } else {
      auto error = record.find("error");
      if (error == record.end() || !error->is_object() || !error->contains("line") ||
          !(*error)["line"].is_number_integer()) {
        return bad("neither a custom_id nor an error with the input line");
      }
      state.lines.insert((*error)["line"].get<int64_t>());
    }
    ++state.records;
  }
  return state;
}

// One write() per record: a killed process leaves whole lines, or one unterminated last line that the
// next run cuts off; never two records in one line.
absl::Status AppendRecord(int fd, const json& record, bool sync, const std::string& path) {
  const std::string line = DumpJson(record) + "\n";
  size_t written = 0;
  while (written < line.size()) {
    const ssize_t n = write(fd, line.data() + written, line.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("writing", path);
    }
    written += static_cast<size_t>(n);
  }
  if (sync && fdatasync(fd) != 0) return ErrnoError("syncing", path);
  return absl::OkStatus();
}

bool IsBlank(const std::string& line) {
  return absl::StripAsciiWhitespace(absl::string_view(line)).empty();
}

void StripCarriageReturn(std::string& line) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
}

absl::StatusOr<int64_t> CountRequests(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return ErrnoError("opening", path);
  int64_t count = 0;
  std::string line;
  while (std::getline(in, line)) count += IsBlank(line) ? 0 : 1;
  if (in.bad()) return ErrnoError("reading", path);
  return count;
}

// Draws the prefill of one long prompt as its own progress line.
class PrefillProgressLine {
 public:
  PrefillProgressLine(const std::string& custom_id, int64_t min_tokens, bool enabled)
      : custom_id_(custom_id), min_tokens_(min_tokens), enabled_(enabled) {}
  void Update(const PrefillProgress& progress) {
    if (!enabled_ || progress.total < min_tokens_) return;
    if (!line_) line_ = std::make_unique<ProgressLine>(absl::StrCat("prefill ", custom_id_), "tok", progress.total);
    line_->Update(progress.done);
    if (progress.done >= progress.total) line_->Finish();
  }
  void Finish() {
    if (line_) line_->Finish();
  }

 private:
  std::string custom_id_;
  int64_t min_tokens_;
  bool enabled_;
  std::unique_ptr<ProgressLine> line_;
};

}  // namespace

BatchInputLine ParseBatchInputLine(std::string_view text, int64_t line_number) {
  BatchInputLine line;
  line.line_number = line_number;
  const auto fail = [&](const std::string& message) {
    line.error = absl::InvalidArgumentError(absl::StrCat("line ", line_number, ": ", message));
    return line;
  };
  const json request = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (request.is_discarded()) return fail("not valid JSON");
  if (!request.is_object()) return fail("a request line must be a JSON object");
  auto custom_id = request.find("custom_id");
  if (custom_id == request.end() || !custom_id->is_string() || custom_id->get_ref<const std::string&>().empty()) {
    return fail("custom_id must be a non-empty string");
  }
  line.custom_id = custom_id->get<std::string>();
  auto method = request.find("method");
  if (method == request.end() || !method->is_string() || method->get_ref<const std::string&>() != "POST") {
    return fail("method must be \"POST\"");
  }
  auto url = request.find("url");
  if (url == request.end() || !url->is_string()) return fail("url must be a string");
  std::optional<ApiEndpoint> endpoint = EndpointFromPath(url->get_ref<const std::string&>());
  if (!endpoint) {
    return fail(absl::StrCat("url must be /v1/chat/completions or /v1/completions; got \"",
                             url->get_ref<const std::string&>(), "\""));
  }
  line.endpoint = *endpoint;
  auto body = request.find("body");
  if (body == request.end() || !body->is_object()) return fail("body must be a JSON object");
  line.body = *body;
  return line;
}

absl::StatusOr<BatchOutputState> LoadAndRepairBatchOutput(const std::string& path) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return BatchOutputState();
    return ErrnoError("opening", path);
  }
  FileDescriptor closer(fd);
  return LoadAndRepair(fd, path);
}

json BatchResponseRecord(const std::string& custom_id, int status_code, json body) {
  return json{{"id", absl::StrCat("batch_req_", RandomHex(24))},
              {"custom_id", custom_id},
              {"response",
               {{"status_code", status_code}, {"request_id", absl::StrCat("req_", RandomHex(24))},
                {"body", std::move(body)}}},
              {"error", nullptr}};
}

json BatchErrorRecord(const BatchInputLine& line) {
  json record = {{"id", absl::StrCat("batch_req_", RandomHex(24))},
                 {"custom_id", nullptr},
                 {"response", nullptr},
                 {"error",
                  {{"code", "invalid_request"},
                   {"message", std::string(line.error.message())},
                   {"line", line.line_number}}}};
  if (!line.custom_id.empty()) record["custom_id"] = line.custom_id;
  return record;
}

absl::StatusOr<BatchSummary> RunBatch(Engine& engine, const BatchOptions& options, ServingMetrics* metrics) {
  if (options.input_path.empty()) return absl::InvalidArgumentError("run-batch: no input file (-i IN.jsonl)");
  if (options.output_path.empty()) return absl::InvalidArgumentError("run-batch: no output file (-o OUT.jsonl)");
  std::error_code ec;
  if (std::filesystem::exists(options.output_path, ec) && std::filesystem::exists(options.input_path, ec) &&
      std::filesystem::equivalent(options.input_path, options.output_path, ec)) {
    return absl::InvalidArgumentError("run-batch: the output file must not be the input file");
  }

  const int fd = open(options.output_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("opening", options.output_path);
  FileDescriptor out(fd);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("run-batch: another process is writing ", options.output_path));
  }
  KV_ASSIGN_OR_RETURN(BatchOutputState done, LoadAndRepair(fd, options.output_path));
  if (lseek(fd, 0, SEEK_END) < 0) return ErrnoError("seeking", options.output_path);

  BatchSummary summary;
  summary.repaired_bytes = done.repaired_bytes;
  KV_ASSIGN_OR_RETURN(summary.total, CountRequests(options.input_path));
  if (options.show_progress) {
    if (done.repaired_bytes > 0) {
      std::fprintf(stderr, "run-batch: cut off an unfinished last line (%lld bytes) of %s\n",
                   static_cast<long long>(done.repaired_bytes), options.output_path.c_str());
    }
    if (done.records > 0) {
      std::fprintf(stderr, "run-batch: resuming; %s already answers %lld requests\n",
                   options.output_path.c_str(), static_cast<long long>(done.records));
    }
  }

  std::ifstream in(options.input_path, std::ios::binary);
  if (!in) return ErrnoError("opening", options.input_path);
  const int64_t already = std::min<int64_t>(done.records, summary.total);
  std::optional<ProgressLine> progress;
  if (options.show_progress) progress.emplace("run-batch", "req", summary.total, already);
  const auto started = std::chrono::steady_clock::now();
  // As many requests run at once as the engine batches (the distributed engine's decode batch); records
  // are written as requests finish. One at a time, a long prompt shows its own prefill line.
  const int runners = std::max(1, engine.max_concurrent_requests());
  std::mutex mutex;  // guards the input, the output, the summary and the progress line
  absl::Status io_error;
  int64_t processed = 0, running = 0;
  std::atomic<int64_t> tokens_generated{0};
  std::set<std::string> seen_ids;
  int64_t line_number = 0;

  // The next line to run, or nullopt at the end of the input (or after an I/O error). mutex held.
  auto next_line = [&]() -> std::optional<BatchInputLine> {
    std::string text;
    while (io_error.ok() && std::getline(in, text)) {
      ++line_number;
      StripCarriageReturn(text);
      if (IsBlank(text)) continue;
      BatchInputLine line = ParseBatchInputLine(text, line_number);
      // Each custom_id answers for one line only: the first that names it, usable or not.
      if (!line.custom_id.empty() && !seen_ids.insert(line.custom_id).second) {
        line.error = absl::InvalidArgumentError(
            absl::StrCat("line ", line_number, ": custom_id \"", line.custom_id, "\" appears on an earlier line"));
        line.custom_id.clear();  // the record must not answer for the earlier line
      }
      if (!line.custom_id.empty() ? done.custom_ids.count(line.custom_id) > 0 : done.lines.count(line_number) > 0) {
        ++summary.skipped;
        continue;
      }
      return line;
    }
    return std::nullopt;
  };
  auto update_progress = [&] {  // mutex held
    if (!progress) return;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const double rate = seconds > 0 ? tokens_generated.load() / seconds : 0.0;
    progress->set_detail(runners > 1 ? absl::StrFormat("%lld running, %.1f tok/s", static_cast<long long>(running), rate)
                                     : absl::StrFormat("%.1f tok/s", rate));
    progress->Update(std::min(summary.total, already + processed));
  };
  auto run_lines = [&] {
    while (true) {
      std::optional<BatchInputLine> line;
      {
        std::lock_guard<std::mutex> lock(mutex);
        line = next_line();
        if (!line) return;
        summary.peak_running = std::max(summary.peak_running, ++running);
      }
      json record;
      bool succeeded = false;
      if (!line->error.ok()) {
        record = BatchErrorRecord(*line);
      } else {
        absl::StatusOr<ApiRequest> request = ParseApiRequest(line->endpoint, line->body, engine, options.api);
        line->body = json();  // request lines may hold whole documents
        absl::StatusOr<GenerationOutcome> outcome = absl::UnknownError("not run");
        if (!request.ok()) {
          outcome = request.status();
        } else {
          PrefillProgressLine prefill(line->custom_id, options.prefill_progress_min_tokens,
                                      options.show_progress && runners == 1);
          GenerationHooks hooks;
          hooks.on_token = [&] {
            ++tokens_generated;
            if (metrics != nullptr) metrics->AddTokenGenerated();
          };
          hooks.on_prefill = [&](const PrefillProgress& p) { prefill.Update(p); };
          outcome = RunApiGeneration(engine, request->generation, hooks);
          prefill.Finish();
        }
        if (outcome.ok()) {
          if (metrics != nullptr) metrics->AddTokensPrefilled(outcome->prompt_tokens);
          record = BatchResponseRecord(line->custom_id, 200,
                                       MakeResponseBody(*request, *outcome, NewResponseId(line->endpoint), UnixSeconds()));
          succeeded = true;
        } else {
          HttpError error = ToHttpError(outcome.status());
          record = BatchResponseRecord(line->custom_id, error.http_status, std::move(error.body));
        }
      }
      std::lock_guard<std::mutex> lock(mutex);
      --running;
      if (!io_error.ok()) return;  // the output failed: this record cannot be kept; a rerun redoes it
      io_error = AppendRecord(fd, record, options.fsync, options.output_path);
      if (!io_error.ok()) return;
      ++(succeeded ? summary.succeeded : summary.failed);
      ++processed;
      update_progress();
    }
  };
  std::vector<std::thread> threads;
  for (int i = 1; i < runners; ++i) threads.emplace_back(run_lines);
  run_lines();
  for (std::thread& thread : threads) thread.join();
  summary.tokens_generated = tokens_generated.load();
  KV_RETURN_IF_ERROR(io_error);
  if (in.bad()) return ErrnoError("reading", options.input_path);
  if (progress) {
    progress->Update(std::min(summary.total, already + processed));
    progress->Finish();
    std::fprintf(stderr,
                 "run-batch: %lld succeeded, %lld failed, %lld skipped (answered before), up to %lld at once; "
                 "output in %s\n",
                 static_cast<long long>(summary.succeeded), static_cast<long long>(summary.failed),
                 static_cast<long long>(summary.skipped), static_cast<long long>(summary.peak_running),
                 options.output_path.c_str());
  }
  return summary;
}

// ---- Summarization of a folder ------------------------------------------------------------------

json SummaryRequestBody(std::string_view document, const std::string& prompt, int max_tokens,
                        double repetition_penalty) {
  return json{{"messages", json::array({json{{"role", "user"},
                                             {"content", absl::StrCat(prompt, "\n\n",
                                                                      absl::string_view(document.data(),
                                                                                        document.size()))}}})},
              {"max_tokens", max_tokens},
              {"temperature", 0},
              {"repetition_penalty", repetition_penalty}};
}

absl::StatusOr<int64_t> WriteSummarizeRequests(const SummarizeDirOptions& options) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(options.input_dir, ec)) {
    return absl::InvalidArgumentError(absl::StrCat("summarize: ", options.input_dir, " is not a folder"));
  }
  if (options.max_tokens < 1) return absl::InvalidArgumentError("summarize: max_tokens must be at least 1");
  std::vector<fs::path> files;
  for (const fs::directory_entry& entry : fs::directory_iterator(options.input_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || !entry.is_regular_file(ec)) continue;
    const bool wanted = options.extensions.empty() ||
                        std::any_of(options.extensions.begin(), options.extensions.end(),
                                    [&](const std::string& ext) { return absl::EndsWith(name, ext); });
    if (wanted) files.push_back(entry.path());
  }
  if (ec) return absl::UnavailableError(absl::StrCat("summarize: listing ", options.input_dir, ": ", ec.message()));
  std::sort(files.begin(), files.end());

  const std::string path =
      options.requests_path.empty() ? options.output_path + ".requests.jsonl" : options.requests_path;
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out) return ErrnoError("creating", partial);
    for (const fs::path& file : files) {
      std::ifstream in(file, std::ios::binary);
      if (!in) return ErrnoError("opening", file.string());
      std::string document((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const json line = {{"custom_id", file.filename().string()},
                         {"method", "POST"},
                         {"url", "/v1/chat/completions"},
                         {"body", SummaryRequestBody(document, options.prompt, options.max_tokens,
                                                     options.repetition_penalty)}};
      out << DumpJson(line) << '\n';
    }
    out.flush();
    if (!out) return ErrnoError("writing", partial);
  }
  fs::rename(partial, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("summarize: renaming ", partial, ": ", ec.message()));
  return static_cast<int64_t>(files.size());
}

absl::StatusOr<BatchSummary> RunSummarizeDir(Engine& engine, const SummarizeDirOptions& options,
                                             ServingMetrics* metrics) {
  if (options.output_path.empty()) return absl::InvalidArgumentError("summarize: no output file given");
  KV_ASSIGN_OR_RETURN(int64_t count, WriteSummarizeRequests(options));
  if (count == 0) {
    return absl::InvalidArgumentError(absl::StrCat("summarize: no documents in ", options.input_dir));
  }
  BatchOptions batch = options.batch;
  batch.input_path =
      options.requests_path.empty() ? options.output_path + ".requests.jsonl" : options.requests_path;
  batch.output_path = options.output_path;
  return RunBatch(engine, batch, metrics);
}

}  // namespace kvshard
