// Prometheus metrics of the serving front ends and the engine, exported on their own port.
//
// Names use the kvshard_ prefix and base units (seconds, bytes):
//   kvshard_kv_bytes_used{worker,scheme}, kvshard_kv_bytes_capacity{worker,scheme},
//   kvshard_kv_bits_per_element{worker,scheme}                     gauges
//   kvshard_tokens_prefilled_total, kvshard_tokens_generated_total   counters
//   kvshard_requests_total{endpoint,status}                          counter of answered requests
//   kvshard_requests_running, kvshard_requests_waiting               gauges
//   kvshard_time_to_first_token_seconds, kvshard_inter_token_latency_seconds,
//   kvshard_request_duration_seconds (arrival to last token), kvshard_decode_step_seconds{worker},
//   kvshard_merge_seconds                                            histograms
//   kvshard_prefill_tokens_per_second                                gauge, the latest request's prefill
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/civet_listener.h"
#include "coordinator/engine.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvshard {

class ServingMetrics : public EngineObserver {
 public:
  // Serves GET /metrics on host:port (port 0: any free port; see port()). The registry and the text
  // format are prometheus-cpp's; the listener is ours, for its full-size handler stacks.
  static absl::StatusOr<std::unique_ptr<ServingMetrics>> Start(const std::string& host, int port);
  // Collects without listening (batch jobs without a metrics port, tests).
  static std::unique_ptr<ServingMetrics> CreateUnexposed();
  ~ServingMetrics() override;

  int port() const { return listener_ ? listener_->port() : 0; }  // 0 when not listening
  // The text exposition format of every metric, as a scrape would see it.
  std::string Serialize() const;

  void SetRequestsWaiting(int64_t n);
  void SetRequestsRunning(int64_t n);
  void CountResponse(const std::string& endpoint, int http_status);
  void AddTokensPrefilled(int64_t n);
  void AddTokenGenerated();
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  void ObserveRequestDuration(double seconds);
  void SetPrefillTokensPerSecond(double rate);
  void SetKvMemory(const std::vector<WorkerKvMemory>& workers);

  // EngineObserver.
  void OnDecodeStep(int worker, double seconds) override;
  void OnMerge(double seconds) override;

 private:
  ServingMetrics();

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<CivetListener> listener_;

  prometheus::Family<prometheus::Gauge>* kv_bytes_used_;
  prometheus::Family<prometheus::Gauge>* kv_bytes_capacity_;
  prometheus::Family<prometheus::Gauge>* kv_bits_per_element_;
  prometheus::Family<prometheus::Counter>* requests_total_;
  prometheus::Family<prometheus::Histogram>* decode_step_seconds_;
  prometheus::Counter* tokens_prefilled_;
  prometheus::Counter* tokens_generated_;
  prometheus::Gauge* requests_running_;
  prometheus::Gauge* requests_waiting_;
  prometheus::Gauge* prefill_tokens_per_second_;
  prometheus::Histogram* time_to_first_token_;
  prometheus::Histogram* inter_token_latency_;
  prometheus::Histogram* request_duration_;
  prometheus::Histogram* merge_seconds_;
};

}  // namespace kvshard
