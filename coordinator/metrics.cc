#include "coordinator/metrics.h"

#include <exception>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "civetweb.h"
#include "common/status.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace kvshard {
namespace {

using prometheus::Histogram;

// Bucket bounds in seconds. Time to first token spans a short chat prompt to the prefill of millions of
// tokens; decode steps and merges are milliseconds to microseconds.
const Histogram::BucketBoundaries kTimeToFirstTokenBuckets = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
const Histogram::BucketBoundaries kInterTokenBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5};
const Histogram::BucketBoundaries kRequestDurationBuckets = {
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200};
const Histogram::BucketBoundaries kDecodeStepBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56};
const Histogram::BucketBoundaries kMergeBuckets = {
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1};

}  // namespace

ServingMetrics::ServingMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  kv_bytes_used_ = &prometheus::BuildGauge()
                        .Name("kvshard_kv_bytes_used")
                        .Help("Bytes the KV store holds, all metadata included")
                        .Register(r);
  kv_bytes_capacity_ = &prometheus::BuildGauge()
                            .Name("kvshard_kv_bytes_capacity")
                            .Help("Bytes the KV store may grow to")
                            .Register(r);
  kv_bits_per_element_ = &prometheus::BuildGauge()
                              .Name("kvshard_kv_bits_per_element")
                              .Help("Stored bits per K/V element, all metadata included")
                              .Register(r);
  requests_total_ = &prometheus::BuildCounter()
                         .Name("kvshard_requests_total")
                         .Help("Answered HTTP requests by endpoint and status code")
                         .Register(r);
  decode_step_seconds_ = &prometheus::BuildHistogram()
                              .Name("kvshard_decode_step_seconds")
                              .Help("Time of one decode step on a worker")
                              .Register(r);
  tokens_prefilled_ = &prometheus::BuildCounter()
                           .Name("kvshard_tokens_prefilled_total")
                           .Help("Prompt tokens prefilled")
                           .Register(r)
                           .Add({});
  tokens_generated_ = &prometheus::BuildCounter()
                           .Name("kvshard_tokens_generated_total")
                           .Help("Tokens generated")
                           .Register(r)
                           .Add({});
  requests_running_ = &prometheus::BuildGauge()
                           .Name("kvshard_requests_running")
                           .Help("Requests being generated")
                           .Register(r)
                           .Add({});
  requests_waiting_ = &prometheus::BuildGauge()
                           .Name("kvshard_requests_waiting")
                           .Help("Requests queued, not yet started")
                           .Register(r)
                           .Add({});
  prefill_tokens_per_second_ = &prometheus::BuildGauge()
                                    .Name("kvshard_prefill_tokens_per_second")
                                    .Help("Prefill rate of the latest request")
                                    .Register(r)
                                    .Add({});
  time_to_first_token_ = &prometheus::BuildHistogram()
                              .Name("kvshard_time_to_first_token_seconds")
                              .Help("From a request's arrival to its first generated token")
                              .Register(r)
                              .Add({}, kTimeToFirstTokenBuckets);
  inter_token_latency_ = &prometheus::BuildHistogram()
                              .Name("kvshard_inter_token_latency_seconds")
                              .Help("Time between consecutive generated tokens of a request")
                              .Register(r)
                              .Add({}, kInterTokenBuckets);
  request_duration_ = &prometheus::BuildHistogram()
                           .Name("kvshard_request_duration_seconds")
                           .Help("From a request's arrival to its last token (end to end)")
                           .Register(r)
                           .Add({}, kRequestDurationBuckets);
  merge_seconds_ = &prometheus::BuildHistogram()
                        .Name("kvshard_merge_seconds")
                        .Help("Time of one cross-worker merge of attention partials")
                        .Register(r)
                        .Add({}, kMergeBuckets);
}

ServingMetrics::~ServingMetrics() {
  if (listener_) listener_->Stop();  // before the registry goes
}

absl::StatusOr<std::unique_ptr<ServingMetrics>> ServingMetrics::Start(const std::string& host, int port) {
  std::unique_ptr<ServingMetrics> metrics(new ServingMetrics());
  const ServingMetrics* self = metrics.get();
  auto handler = [self](mg_connection* conn) {
    const mg_request_info* info = mg_get_request_info(conn);
    const std::string path = info->local_uri != nullptr ? info->local_uri : "";
    const std::string method = info->request_method != nullptr ? info->request_method : "";
    if (path != "/metrics") {
      SendHttpResponse(conn, 404, "text/plain; charset=utf-8", "not found; metrics are at /metrics\n");
      return 404;
    }
    if (method != "GET") {
      SendHttpResponse(conn, 405, "text/plain; charset=utf-8", "use GET\n", {{"Allow", "GET"}});
      return 405;
    }
    SendHttpResponse(conn, 200, "text/plain; version=0.0.4; charset=utf-8", self->Serialize());
    return 200;
  };
  absl::StatusOr<std::unique_ptr<CivetListener>> listener =
      CivetListener::Start(host, port, /*threads=*/4, std::move(handler));
  if (!listener.ok()) return Annotate(listener.status(), "metrics");
  metrics->listener_ = std::move(*listener);
  return metrics;
}

std::unique_ptr<ServingMetrics> ServingMetrics::CreateUnexposed() {
  return std::unique_ptr<ServingMetrics>(new ServingMetrics());
}

std::string ServingMetrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

void ServingMetrics::SetRequestsWaiting(int64_t n) { requests_waiting_->Set(static_cast<double>(n)); }
void ServingMetrics::SetRequestsRunning(int64_t n) { requests_running_->Set(static_cast<double>(n)); }

void ServingMetrics::CountResponse(const std::string& endpoint, int http_status) {
  requests_total_->Add({{"endpoint", endpoint}, {"status", absl::StrCat(http_status)}}).Increment();
}

void ServingMetrics::AddTokensPrefilled(int64_t n) { tokens_prefilled_->Increment(static_cast<double>(n)); }
void ServingMetrics::AddTokenGenerated() { tokens_generated_->Increment(); }
void ServingMetrics::ObserveTimeToFirstToken(double seconds) { time_to_first_token_->Observe(seconds); }
void ServingMetrics::ObserveInterTokenLatency(double seconds) { inter_token_latency_->Observe(seconds); }
void ServingMetrics::ObserveRequestDuration(double seconds) { request_duration_->Observe(seconds); }
void ServingMetrics::SetPrefillTokensPerSecond(double rate) { prefill_tokens_per_second_->Set(rate); }

void ServingMetrics::SetKvMemory(const std::vector<WorkerKvMemory>& workers) {
  for (const WorkerKvMemory& w : workers) {
    const prometheus::Labels labels = {{"worker", absl::StrCat(w.worker)}, {"scheme", w.scheme}};
    kv_bytes_used_->Add(labels).Set(static_cast<double>(w.bytes_used));
    kv_bytes_capacity_->Add(labels).Set(static_cast<double>(w.bytes_capacity));
    kv_bits_per_element_->Add(labels).Set(w.bits_per_element);
  }
}

void ServingMetrics::OnDecodeStep(int worker, double seconds) {
  decode_step_seconds_->Add({{"worker", absl::StrCat(worker)}}, kDecodeStepBuckets).Observe(seconds);
}

void ServingMetrics::OnMerge(double seconds) { merge_seconds_->Observe(seconds); }

}  // namespace kvshard
