#include "worker/control.h"

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvshard {
namespace {

using nlohmann::json;

json ToJson(const TokenRange& r) { return json::array({r.start, r.end}); }
TokenRange RangeFromJson(const json& j) { return TokenRange{j.at(0).get<int64_t>(), j.at(1).get<int64_t>()}; }

json ToJson(const SamplingParams& s) {
  return {{"temperature", s.temperature},
          {"top_k", s.top_k},
          {"top_p", s.top_p},
          {"seed", s.seed},
          {"repetition_penalty", s.repetition_penalty},
          {"repetition_window", s.repetition_window}};
}
SamplingParams SamplingFromJson(const json& j) {
  SamplingParams s;
  s.temperature = j.at("temperature").get<float>();
  s.top_k = j.at("top_k").get<int>();
  s.top_p = j.at("top_p").get<float>();
  s.seed = j.at("seed").get<uint64_t>();
  s.repetition_penalty = j.at("repetition_penalty").get<float>();
  s.repetition_window = j.at("repetition_window").get<int>();
  return s;
}

json ToJson(const SyntheticModelSpec& s) {
  return {{"layers", s.n_layers},  {"hidden", s.hidden},         {"heads", s.n_heads},
          {"kv_heads", s.n_kv_heads}, {"head_dim", s.head_dim}, {"ffn", s.ffn_hidden},
          {"vocab", s.vocab_size},  {"max_context", s.max_context}, {"rope_theta", s.rope_theta},
          {"seed", s.seed}};
}
SyntheticModelSpec SyntheticFromJson(const json& j) {
  SyntheticModelSpec s;
  s.n_layers = j.at("layers");
  s.hidden = j.at("hidden");
  s.n_heads = j.at("heads");
  s.n_kv_heads = j.at("kv_heads");
  s.head_dim = j.at("head_dim");
  s.ffn_hidden = j.at("ffn");
  s.vocab_size = j.at("vocab");
  s.max_context = j.at("max_context");
  s.rope_theta = j.at("rope_theta");
  s.seed = j.at("seed");
  return s;
}

json ToJson(const WorkerConfig& c) {
  json j = {{"model_path", c.model_path},
            {"calibration_path", c.calibration_path},
            {"kv_budget_bytes", c.kv_budget_bytes},
            {"threads", c.threads},
            {"device", c.device},
            {"merge_mode", MergeModeName(c.merge.mode)},
            {"wire", WireTypeName(c.merge.wire)},
            {"collective_timeout_s", c.collective_timeout_s},
            {"key_outlier_headroom", c.key_outlier_headroom},
            {"cuda_graph_rows", c.cuda_graph_rows},
            {"gpu_prefill_chunk", c.gpu_prefill_chunk},
            {"faults",
             {{"fail_step", c.faults.fail_step},
              {"kill_step", c.faults.kill_step},
              {"hang_step", c.faults.hang_step},
              {"worker", c.faults.worker}}}};
  if (c.synthetic) j["synthetic"] = ToJson(*c.synthetic);
  return j;
}
absl::StatusOr<WorkerConfig> ConfigFromJson(const json& j) {
  WorkerConfig c;
  c.model_path = j.at("model_path");
  if (j.contains("synthetic")) c.synthetic = SyntheticFromJson(j.at("synthetic"));
  c.calibration_path = j.at("calibration_path");
  c.kv_budget_bytes = j.at("kv_budget_bytes");
  c.threads = j.at("threads");
  c.device = j.at("device");
  auto mode = ParseMergeMode(j.at("merge_mode"));
  if (!mode.ok()) return mode.status();
  auto wire = ParseWireType(j.at("wire"));
  if (!wire.ok()) return wire.status();
  c.merge = {*mode, *wire};
  c.collective_timeout_s = j.at("collective_timeout_s");
  c.key_outlier_headroom = j.at("key_outlier_headroom");
  c.cuda_graph_rows = j.at("cuda_graph_rows");
  c.gpu_prefill_chunk = j.at("gpu_prefill_chunk");
  const json& f = j.at("faults");
  c.faults.fail_step = f.at("fail_step");
  c.faults.kill_step = f.at("kill_step");
  c.faults.hang_step = f.at("hang_step");
  c.faults.worker = f.at("worker");
  return c;
}

json ToJson(const StepPlan& p) {
  json allocs = json::array();
  for (const RequestAlloc& a : p.allocs) {
    json ranges = json::array();
    for (const TokenRange& r : a.ranges) ranges.push_back(ToJson(r));
    allocs.push_back({{"id", a.id},
                      {"scheme", a.scheme},
                      {"ranges", ranges},
                      {"sampler", a.sampler},
                      {"sampling", ToJson(a.sampling)},
                      {"fill_seed", a.fill_seed}});
  }
  json fills = json::array();
  for (const FillWork& f : p.fills) fills.push_back({{"id", f.id}, {"end", f.end}, {"per_worker", f.tokens_per_worker}});
  json decode = json::array();
  for (const DecodeWork& d : p.decode) decode.push_back(json::array({d.id, d.token, d.position}));
  json j = {{"step", p.step}, {"allocs", allocs}, {"frees", p.frees}, {"fills", fills}, {"decode", decode}};
  if (p.prefill) {
    j["prefill"] = {{"id", p.prefill->id},
                    {"first", p.prefill->first_position},
                    {"tokens", p.prefill->tokens},
                    {"owner", p.prefill->owner},
                    {"sample", p.prefill->sample}};
  }
  return j;
}
StepPlan PlanFromJson(const json& j) {
  StepPlan p;
  p.step = j.at("step");
  for (const json& a : j.at("allocs")) {
    RequestAlloc alloc;
    alloc.id = a.at("id");
    alloc.scheme = a.at("scheme");
    for (const json& r : a.at("ranges")) alloc.ranges.push_back(RangeFromJson(r));
    alloc.sampler = a.at("sampler");
    alloc.sampling = SamplingFromJson(a.at("sampling"));
    alloc.fill_seed = a.at("fill_seed");
    p.allocs.push_back(std::move(alloc));
  }
  p.frees = j.at("frees").get<std::vector<int64_t>>();
  for (const json& f : j.at("fills")) p.fills.push_back({f.at("id"), f.at("end"), f.at("per_worker")});
  for (const json& d : j.at("decode")) p.decode.push_back({d.at(0), d.at(1), d.at(2)});
  if (j.contains("prefill")) {
    const json& f = j.at("prefill");
    PrefillWork w;
    w.id = f.at("id");
    w.first_position = f.at("first");
    w.tokens = f.at("tokens").get<std::vector<int32_t>>();
    w.owner = f.at("owner");
    w.sample = f.at("sample");
    p.prefill = std::move(w);
  }
  return p;
}

std::string Pack(const json& j) {
  const std::vector<uint8_t> bytes = json::to_msgpack(j);
  return std::string(bytes.begin(), bytes.end());
}

absl::StatusOr<json> Unpack(const std::string& bytes, const char* what) {
  json j = json::from_msgpack(bytes.begin(), bytes.end(), /*strict=*/true, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::DataLossError(absl::StrCat("malformed ", what, " message"));
  return j;
}

// Runs `decode` on the parsed message, turning a missing or mistyped field into an error.
template <typename T, typename F>
absl::StatusOr<T> Parse(const std::string& bytes, const char* what, F decode) {
  auto j = Unpack(bytes, what);
  if (!j.ok()) return j.status();
  try {
    return decode(*j);
  } catch (const json::exception& e) {
    return absl::DataLossError(absl::StrCat("malformed ", what, " message: ", e.what()));
  }
}

const char* KindName(CommandKind kind) {
  switch (kind) {
    case CommandKind::kConfigure: return "configure";
    case CommandKind::kStep: return "step";
    case CommandKind::kReset: return "reset";
    case CommandKind::kShutdown: return "shutdown";
  }
  return "?";
}

}  // namespace

std::string EncodeCommand(const WorkerCommand& command) {
  json j = {{"kind", KindName(command.kind)}};
  if (command.kind == CommandKind::kConfigure) j["config"] = ToJson(command.config);
  if (command.kind == CommandKind::kStep) j["plan"] = ToJson(command.plan);
  return Pack(j);
}

absl::StatusOr<WorkerCommand> DecodeCommand(const std::string& bytes) {
  return Parse<WorkerCommand>(bytes, "command", [](const json& j) -> absl::StatusOr<WorkerCommand> {
    WorkerCommand c;
    const std::string kind = j.at("kind");
    if (kind == "configure") {
      c.kind = CommandKind::kConfigure;
      auto config = ConfigFromJson(j.at("config"));
      if (!config.ok()) return config.status();
      c.config = std::move(*config);
    } else if (kind == "step") {
      c.kind = CommandKind::kStep;
      c.plan = PlanFromJson(j.at("plan"));
    } else if (kind == "reset") {
      c.kind = CommandKind::kReset;
    } else if (kind == "shutdown") {
      c.kind = CommandKind::kShutdown;
    } else {
      return absl::DataLossError(absl::StrCat("unknown command '", kind, "'"));
    }
    return c;
  });
}

std::string EncodeHello(const WorkerHello& h) {
  return Pack({{"type", "hello"},
               {"worker", h.worker},
               {"error", h.error},
               {"model_name", h.model_name},
               {"n_layers", h.n_layers},
               {"vocab_size", h.vocab_size},
               {"threads", h.threads},
               {"device", h.device},
               {"kv_budget_bytes", h.kv_budget_bytes},
               {"max_prefill_chunk", h.max_prefill_chunk}});
}

absl::StatusOr<WorkerHello> DecodeHello(const std::string& bytes) {
  return Parse<WorkerHello>(bytes, "hello", [](const json& j) -> absl::StatusOr<WorkerHello> {
    if (j.at("type") != "hello") return absl::DataLossError("expected a hello message");
    WorkerHello h;
    h.worker = j.at("worker");
    h.error = j.at("error");
    h.model_name = j.at("model_name");
    h.n_layers = j.at("n_layers");
    h.vocab_size = j.at("vocab_size");
    h.threads = j.at("threads");
    h.device = j.at("device");
    h.kv_budget_bytes = j.at("kv_budget_bytes");
    h.max_prefill_chunk = j.at("max_prefill_chunk");
    return h;
  });
}

std::string EncodeReport(const StepReport& r) {
  json sampled = json::array();
  for (const ReportedToken& s : r.sampled) sampled.push_back(json::array({s.id, s.token}));
  json failed = json::array();
  for (const FailedRequest& f : r.failed) failed.push_back({{"id", f.id}, {"message", f.message}});
  return Pack({{"type", "report"},
               {"step", r.step},
               {"worker", r.worker},
               {"sampled", sampled},
               {"failed", failed},
               {"kv_bytes", r.kv_bytes},
               {"kv_elements", r.kv_elements},
               {"step_seconds", r.step_seconds},
               {"decode_seconds", r.decode_seconds},
               {"merge_seconds", r.merge_seconds},
               {"merges", r.merges},
               {"fatal", r.fatal}});
}

absl::StatusOr<StepReport> DecodeReport(const std::string& bytes) {
  return Parse<StepReport>(bytes, "report", [](const json& j) -> absl::StatusOr<StepReport> {
    if (j.at("type") != "report") return absl::DataLossError("expected a step report");
    StepReport r;
    r.step = j.at("step");
    r.worker = j.at("worker");
    for (const json& s : j.at("sampled")) r.sampled.push_back({s.at(0), s.at(1)});
    for (const json& f : j.at("failed")) r.failed.push_back({f.at("id"), f.at("message")});
    r.kv_bytes = j.at("kv_bytes");
    r.kv_elements = j.at("kv_elements");
    r.step_seconds = j.at("step_seconds");
    r.decode_seconds = j.at("decode_seconds");
    r.merge_seconds = j.at("merge_seconds");
    r.merges = j.at("merges");
    r.fatal = j.at("fatal");
    return r;
  });
}

}  // namespace kvshard
