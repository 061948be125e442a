#include "worker/distributed_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/attention.h"

namespace kvshard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Writes n floats at `dst` in the wire type.
void PackFloats(const float* src, int64_t n, WireType wire, uint8_t* dst) {
  if (wire == WireType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = FloatToBf16(src[i]);
}

void UnpackFloats(const uint8_t* src, int64_t n, WireType wire, float* dst) {
  if (wire == WireType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(s[i]);
}

// Partials on the wire: [rows lse fp32][rows * head_dim out in the wire type].
int64_t PartialsBytes(int64_t rows, int head_dim, WireType wire) {
  return rows * static_cast<int64_t>(sizeof(float)) + rows * head_dim * WireTypeBytes(wire);
}

void PackPartials(const float* out, const float* lse, int64_t rows, int head_dim, WireType wire, uint8_t* dst) {
  std::memcpy(dst, lse, rows * sizeof(float));
  PackFloats(out, rows * head_dim, wire, dst + rows * sizeof(float));
}

void UnpackPartials(const uint8_t* src, int64_t rows, int head_dim, WireType wire, float* out, float* lse) {
  std::memcpy(lse, src, rows * sizeof(float));
  UnpackFloats(src + rows * sizeof(float), rows * head_dim, wire, out);
}

void NeutralPartials(int64_t rows, int head_dim, float* out, float* lse) {
  std::fill(out, out + rows * head_dim, 0.0f);
  std::fill(lse, lse + rows, kNegInf);
}

// Queries on the wire: [n positions int64][n * n_heads * head_dim q fp32].
int64_t QueriesBytes(int n_queries, const KvGeometry& g) {
  return static_cast<int64_t>(n_queries) * (sizeof(int64_t) + sizeof(float) * g.n_heads * g.head_dim);
}

absl::Status MergeByAllGather(Collectives& collectives, WireType wire, int64_t rows, int head_dim, float* out,
                              float* lse) {
  const int n = collectives.size();
  const int64_t bytes = PartialsBytes(rows, head_dim, wire);
  std::vector<uint8_t> send(bytes), gathered(bytes * n);
  PackPartials(out, lse, rows, head_dim, wire, send.data());
  KV_RETURN_IF_ERROR(collectives.AllGather(send.data(), gathered.data(), bytes));
  // Every worker merges the same (wire-rounded) inputs in the same order, so all end bit-identical.
  std::vector<float> outs(static_cast<size_t>(n) * rows * head_dim), lses(static_cast<size_t>(n) * rows);
  std::vector<const float*> out_ptrs(n), lse_ptrs(n);
  for (int w = 0; w < n; ++w) {
    UnpackPartials(gathered.data() + w * bytes, rows, head_dim, wire, outs.data() + w * rows * head_dim,
                   lses.data() + w * rows);
    out_ptrs[w] = outs.data() + w * rows * head_dim;
    lse_ptrs[w] = lses.data() + w * rows;
  }
  MergePartialsCpu(n, out_ptrs.data(), lse_ptrs.data(), rows, head_dim, out, lse);
  return absl::OkStatus();
}

absl::Status MergeByTree(Collectives& collectives, WireType wire, int64_t rows, int head_dim, float* out,
                         float* lse) {
  // M = max_w lse_w; a_w = exp(lse_w - M); out = sum_w a_w out_w / sum_w a_w; lse = M + ln sum_w a_w.
  std::vector<float> max_lse(lse, lse + rows);
  KV_RETURN_IF_ERROR(collectives.AllReduce(max_lse.data(), rows, WireType::kF32, ReduceOp::kMax));
  std::vector<float> weights(rows);
  for (int64_t r = 0; r < rows; ++r) {
    weights[r] = (lse[r] == kNegInf || max_lse[r] == kNegInf) ? 0.0f : std::exp(lse[r] - max_lse[r]);
  }
  const int64_t n_out = rows * head_dim;
  if (wire == WireType::kF32) {
    std::vector<float> sums(n_out + rows);
    for (int64_t r = 0; r < rows; ++r) {
      for (int d = 0; d < head_dim; ++d) sums[r * head_dim + d] = weights[r] * out[r * head_dim + d];
      sums[n_out + r] = weights[r];
    }
    KV_RETURN_IF_ERROR(collectives.AllReduce(sums.data(), n_out + rows, WireType::kF32, ReduceOp::kSum));
    std::copy(sums.begin(), sums.begin() + n_out, out);
    std::copy(sums.begin() + n_out, sums.end(), weights.begin());
  } else {
    std::vector<uint16_t> numerators(n_out);
    for (int64_t r = 0; r < rows; ++r)
      for (int d = 0; d < head_dim; ++d) numerators[r * head_dim + d] = FloatToBf16(weights[r] * out[r * head_dim + d]);
    KV_RETURN_IF_ERROR(collectives.AllReduce(numerators.data(), n_out, WireType::kBf16, ReduceOp::kSum));
    KV_RETURN_IF_ERROR(collectives.AllReduce(weights.data(), rows, WireType::kF32, ReduceOp::kSum));
    for (int64_t i = 0; i < n_out; ++i) out[i] = Bf16ToFloat(numerators[i]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * head_dim;
    if (weights[r] > 0.0f) {
      const float inv = 1.0f / weights[r];
      for (int d = 0; d < head_dim; ++d) o[d] *= inv;
      lse[r] = max_lse[r] + std::log(weights[r]);
    } else {  // no worker saw a key: guards -inf - (-inf)
      std::fill(o, o + head_dim, 0.0f);
      lse[r] = kNegInf;
    }
  }
  return absl::OkStatus();
}

absl::Status InjectedFaultStatus(const InjectedFault& fault, int layer) {
  if (fault.layer != layer) return absl::OkStatus();
  return fault.status.ok() ? absl::InternalError(absl::StrCat("injected fault at layer ", layer)) : fault.status;
}

}  // namespace

absl::StatusOr<MergeMode> ParseMergeMode(const std::string& name) {
  if (name == "allgather") return MergeMode::kAllGather;
  if (name == "tree") return MergeMode::kTree;
  return absl::InvalidArgumentError(absl::StrCat("unknown merge mode '", name, "' (allgather or tree)"));
}

absl::StatusOr<WireType> ParseWireType(const std::string& name) {
  if (name == "fp32") return WireType::kF32;
  if (name == "bf16") return WireType::kBf16;
  return absl::InvalidArgumentError(absl::StrCat("unknown wire precision '", name, "' (fp32 or bf16)"));
}

std::string MergeModeName(MergeMode mode) { return mode == MergeMode::kTree ? "tree" : "allgather"; }
std::string WireTypeName(WireType type) { return type == WireType::kBf16 ? "bf16" : "fp32"; }

absl::Status MergePartialsAcrossWorkers(Collectives& collectives, const MergeOptions& options, int64_t rows,
                                        int head_dim, float* out, float* lse) {
  // One worker's partials are already the merged result (and keep full precision on a bf16 wire).
  if (rows == 0 || collectives.size() == 1) return absl::OkStatus();
  if (options.mode == MergeMode::kTree) return MergeByTree(collectives, options.wire, rows, head_dim, out, lse);
  return MergeByAllGather(collectives, options.wire, rows, head_dim, out, lse);
}

// ---------------------------------------------------------------------------------------------------------
// Prefill (pass-Q)

PassQPrefillContext::PassQPrefillContext(Collectives& collectives, LocalRequestState& request,
                                         const KvGeometry& geometry, std::vector<int> sources, WireType wire,
                                         InjectedFault fault)
    : collectives_(collectives),
      request_(request),
      geometry_(geometry),
      sources_(std::move(sources)),
      wire_(wire),
      fault_(std::move(fault)) {}

absl::Status PassQPrefillContext::AppendKv(int layer, int n_tokens, const float* k, const float* v) {
  if (!request_.error.ok()) return absl::OkStatus();
  if (request_.shard == nullptr) {
    request_.Fail(absl::InternalError("prefill chunk on a worker without a shard for the request"));
    return absl::OkStatus();
  }
  request_.Fail(request_.shard->Append(layer, n_tokens, k, v));
  return absl::OkStatus();
}

absl::Status PassQPrefillContext::Attend(int layer, int n_queries, const float* q, const int64_t* positions,
                                         float* out) {
  next_layer_ = layer + 1;
  const int64_t rows = static_cast<int64_t>(n_queries) * geometry_.n_heads;
  const int d = geometry_.head_dim;
  const size_t n_sources = sources_.size();

  // Queries out first, so the sources compute while this worker does its local part.
  const int64_t q_bytes = QueriesBytes(n_queries, geometry_);
  if (n_sources > 0) {
    send_buffer_.resize(q_bytes);
    std::memcpy(send_buffer_.data(), positions, n_queries * sizeof(int64_t));
    std::memcpy(send_buffer_.data() + n_queries * sizeof(int64_t), q, rows * d * sizeof(float));
    std::vector<SendBuffer> sends;
    for (int peer : sources_) sends.push_back({peer, send_buffer_.data(), q_bytes});
    KV_RETURN_IF_ERROR(Transfer(collectives_.Exchange(sends, {})));
  }

  local_out_.resize(rows * d);
  local_lse_.resize(rows);
  request_.Fail(InjectedFaultStatus(fault_, layer));
  if (request_.error.ok() && request_.shard != nullptr) {
    request_.Fail(request_.shard->Attend(layer, n_queries, q, positions, local_out_.data(), local_lse_.data()));
  }
  if (!request_.error.ok() || request_.shard == nullptr) NeutralPartials(rows, d, local_out_.data(), local_lse_.data());

  if (n_sources == 0) {
    std::copy(local_out_.begin(), local_out_.end(), out);
    return absl::OkStatus();
  }
  const int64_t p_bytes = PartialsBytes(rows, d, wire_);
  recv_buffers_.resize(n_sources);
  std::vector<RecvBuffer> recvs;
  for (size_t s = 0; s < n_sources; ++s) {
    recv_buffers_[s].resize(p_bytes);
    recvs.push_back({sources_[s], recv_buffers_[s].data(), p_bytes});
  }
  KV_RETURN_IF_ERROR(Transfer(collectives_.Exchange({}, recvs)));
  source_out_.resize(n_sources);
  source_lse_.resize(n_sources);
  std::vector<const float*> outs, lses;
  for (size_t s = 0; s < n_sources; ++s) {
    source_out_[s].resize(rows * d);
    source_lse_[s].resize(rows);
    UnpackPartials(recv_buffers_[s].data(), rows, d, wire_, source_out_[s].data(), source_lse_[s].data());
    outs.push_back(source_out_[s].data());
    lses.push_back(source_lse_[s].data());
  }
  outs.push_back(local_out_.data());
  lses.push_back(local_lse_.data());
  std::vector<float> merged_lse(rows);
  MergePartialsCpu(static_cast<int>(outs.size()), outs.data(), lses.data(), rows, d, out, merged_lse.data());
  return absl::OkStatus();
}

absl::Status PassQPrefillContext::Transfer(absl::Status status) {
  if (!status.ok() && fatal_.ok()) fatal_ = status;
  return status;
}

absl::Status PassQPrefillContext::Drain(int n_queries, int64_t first_position) {
  if (next_layer_ >= geometry_.n_layers) return absl::OkStatus();
  request_.Fail(absl::InternalError("prefill stopped before the last layer"));
  const int64_t rows = static_cast<int64_t>(n_queries) * geometry_.n_heads;
  std::vector<float> q(rows * geometry_.head_dim, 0.0f), out(rows * geometry_.head_dim);
  std::vector<int64_t> positions(n_queries);
  for (int i = 0; i < n_queries; ++i) positions[i] = first_position + i;
  for (int layer = next_layer_; layer < geometry_.n_layers; ++layer) {
    KV_RETURN_IF_ERROR(Attend(layer, n_queries, q.data(), positions.data(), out.data()));
  }
  return absl::OkStatus();
}

absl::Status ServePassQ(Collectives& collectives, LocalRequestState& request, const KvGeometry& geometry, int owner,
                        int n_queries, WireType wire, InjectedFault fault) {
  const int64_t rows = static_cast<int64_t>(n_queries) * geometry.n_heads;
  const int d = geometry.head_dim;
  std::vector<uint8_t> queries(QueriesBytes(n_queries, geometry)), partials(PartialsBytes(rows, d, wire));
  std::vector<float> out(rows * d), lse(rows);
  std::vector<int64_t> positions(n_queries);
  for (int layer = 0; layer < geometry.n_layers; ++layer) {
    const RecvBuffer recv{owner, queries.data(), static_cast<int64_t>(queries.size())};
    KV_RETURN_IF_ERROR(collectives.Exchange({}, {&recv, 1}));
    std::memcpy(positions.data(), queries.data(), n_queries * sizeof(int64_t));
    const float* q = reinterpret_cast<const float*>(queries.data() + n_queries * sizeof(int64_t));
    request.Fail(InjectedFaultStatus(fault, layer));
    if (request.error.ok() && request.shard != nullptr) {
      request.Fail(request.shard->Attend(layer, n_queries, q, positions.data(), out.data(), lse.data()));
    }
    if (!request.error.ok() || request.shard == nullptr) NeutralPartials(rows, d, out.data(), lse.data());
    PackPartials(out.data(), lse.data(), rows, d, wire, partials.data());
    const SendBuffer send{owner, partials.data(), static_cast<int64_t>(partials.size())};
    KV_RETURN_IF_ERROR(collectives.Exchange({&send, 1}, {}));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------------------
// Decode

DistributedDecodeContext::DistributedDecodeContext(Collectives& collectives, const KvGeometry& geometry,
                                                   std::vector<DecodeRow> rows, MergeOptions merge,
                                                   InjectedFault fault)
    : collectives_(collectives),
      geometry_(geometry),
      rows_(std::move(rows)),
      merge_(merge),
      fault_(std::move(fault)) {}

absl::Status DistributedDecodeContext::AppendKv(int layer, int n_tokens, const float* k, const float* v) {
  if (n_tokens != static_cast<int>(rows_.size())) {
    return absl::InternalError(absl::StrCat("decode step of ", rows_.size(), " rows got ", n_tokens, " tokens"));
  }
  const int64_t row_elems = static_cast<int64_t>(geometry_.n_kv_heads) * geometry_.head_dim;
  const int me = collectives_.rank();
  for (int i = 0; i < n_tokens; ++i) {
    LocalRequestState* request = rows_[i].request;
    if (request == nullptr || !request->error.ok()) continue;
    if (me >= static_cast<int>(request->ranges.size()) || !request->ranges[me].contains(rows_[i].position)) continue;
    KvShard* shard = request->shard.get();
    if (shard == nullptr || shard->start_position() + shard->length(layer) != rows_[i].position) {
      request->Fail(absl::InternalError(absl::StrCat(
          "decode append at position ", rows_[i].position, " does not follow this worker's shard (ends at ",
          shard ? shard->start_position() + shard->length(layer) : -1, ")")));
      continue;
    }
    request->Fail(shard->Append(layer, 1, k + i * row_elems, v + i * row_elems));
  }
  return absl::OkStatus();
}

absl::Status DistributedDecodeContext::Attend(int layer, int n_queries, const float* q, const int64_t* positions,
                                              float* out) {
  next_layer_ = layer + 1;
  const int h = geometry_.n_heads;
  const int d = geometry_.head_dim;
  const int64_t rows = static_cast<int64_t>(n_queries) * h;
  lse_.resize(rows);
  const absl::Status fault = InjectedFaultStatus(fault_, layer);
  for (int i = 0; i < n_queries; ++i) {
    float* row_out = out + static_cast<int64_t>(i) * h * d;
    float* row_lse = lse_.data() + static_cast<int64_t>(i) * h;
    LocalRequestState* request = i < static_cast<int>(rows_.size()) ? rows_[i].request : nullptr;
    if (request != nullptr) request->Fail(fault);
    const bool visible = request != nullptr && request->error.ok() && request->shard != nullptr &&
                         request->shard->length(layer) > 0 && request->shard->start_position() <= positions[i];
    if (visible) {
      request->Fail(request->shard->Attend(layer, 1, q + static_cast<int64_t>(i) * h * d, positions + i, row_out,
                                           row_lse));
    }
    if (!visible || !request->error.ok()) NeutralPartials(h, d, row_out, row_lse);
  }
  return Merge(rows, out, lse_.data());
}

absl::Status DistributedDecodeContext::Merge(int64_t rows, float* out, float* lse) {
  const auto start = std::chrono::steady_clock::now();
  absl::Status merged = MergePartialsAcrossWorkers(collectives_, merge_, rows, geometry_.head_dim, out, lse);
  if (collectives_.size() > 1) {  // one worker's partials are the result: no merge to count (as on GPUs)
    merge_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++merges_;
  }
  if (!merged.ok() && fatal_.ok()) fatal_ = merged;
  return merged;
}

absl::Status DistributedDecodeContext::Drain() {
  if (next_layer_ >= geometry_.n_layers) return absl::OkStatus();
  const int n = static_cast<int>(rows_.size());
  const int64_t rows = static_cast<int64_t>(n) * geometry_.n_heads;
  std::vector<float> out(rows * geometry_.head_dim), lse(rows);
  for (DecodeRow& row : rows_) {
    if (row.request != nullptr) row.request->Fail(absl::InternalError("decode stopped before the last layer"));
  }
  for (int layer = next_layer_; layer < geometry_.n_layers; ++layer) {
    NeutralPartials(rows, geometry_.head_dim, out.data(), lse.data());
    KV_RETURN_IF_ERROR(Merge(rows, out.data(), lse.data()));
  }
  next_layer_ = geometry_.n_layers;
  return absl::OkStatus();
}

}  // namespace kvshard
