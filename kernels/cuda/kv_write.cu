// Appending new tokens to the fp16/bf16 paged KV cache, with RoPE fused into the key write.
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dispatch.cuh"

namespace kvshard {
namespace {

// One block per (token, KV head); one thread per channel pair (i, i + head_dim/2).
template <typename T>
__global__ void WriteKvKernel(const KvWriteArgs a, T* __restrict__ k_cache, T* __restrict__ v_cache) {
  const int t = blockIdx.x;
  const int h = blockIdx.y;
  const int half = a.head_dim / 2;
  const int i = threadIdx.x;
  if (i >= half) return;
  const bool scattered = a.token_requests != nullptr;
  const int64_t index = scattered ? a.token_indices[t] : a.first_index + t;
  const int64_t request = scattered ? a.token_requests[t] : a.request;
  const int64_t logical_page = index / a.cache.page_size;
  const int64_t slot = request * a.cache.pages_per_request + logical_page;
  const int64_t page = a.cache.page_table != nullptr ? a.cache.page_table[slot] : slot;
  const int64_t dst = ((page * a.n_kv_heads + h) * a.cache.page_size + (index - logical_page * a.cache.page_size)) *
                      a.head_dim;
  const float* k = a.k + static_cast<int64_t>(t) * a.row_stride + static_cast<int64_t>(h) * a.head_dim;
  const float* v = a.v + static_cast<int64_t>(t) * a.row_stride + static_cast<int64_t>(h) * a.head_dim;
  float k0 = k[i];
  float k1 = k[i + half];
  if (a.inv_freq != nullptr) {
    const double angle = static_cast<double>(a.positions[t]) * static_cast<double>(a.inv_freq[i]);
    double s_d, c_d;
    sincos(angle, &s_d, &c_d);
    const float c = static_cast<float>(c_d);
    const float s = static_cast<float>(s_d);
    const float r0 = k0 * c - k1 * s;
    const float r1 = k1 * c + k0 * s;
    k0 = r0;
    k1 = r1;
  }
  k_cache[dst + i] = FromFloat<T>(k0);
  k_cache[dst + i + half] = FromFloat<T>(k1);
  v_cache[dst + i] = FromFloat<T>(v[i]);
  v_cache[dst + i + half] = FromFloat<T>(v[i + half]);
}

}  // namespace

absl::Status WriteKvCacheCuda(const KvWriteArgs& a, cudaStream_t stream) {
  if (a.n_tokens < 0 || a.n_kv_heads <= 0 || a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > 2048 ||
      a.n_kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("WriteKvCacheCuda: bad shape n_tokens=", a.n_tokens,
                                                   " n_kv_heads=", a.n_kv_heads, " head_dim=", a.head_dim));
  }
  if ((a.token_requests == nullptr) != (a.token_indices == nullptr)) {
    return absl::InvalidArgumentError("WriteKvCacheCuda: token_requests and token_indices go together");
  }
  if (a.cache.page_size <= 0 || (a.token_requests == nullptr && (a.first_index < 0 ||
      a.first_index + a.n_tokens > a.cache.pages_per_request * a.cache.page_size))) {
    return absl::OutOfRangeError(absl::StrCat("WriteKvCacheCuda: tokens ", a.first_index, "..",
                                              a.first_index + a.n_tokens, " do not fit a cache of ",
                                              a.cache.pages_per_request * a.cache.page_size, " tokens"));
  }
  if (a.n_tokens == 0) return absl::OkStatus();
  if (a.inv_freq != nullptr && a.positions == nullptr) {
    return absl::InvalidArgumentError("WriteKvCacheCuda: RoPE needs positions");
  }
  const dim3 grid(a.n_tokens, a.n_kv_heads);
  const int threads = (a.head_dim / 2 + 31) / 32 * 32;
  if (a.cache.dtype == DType::kF16) {
    WriteKvKernel<__half><<<grid, threads, 0, stream>>>(a, static_cast<__half*>(const_cast<void*>(a.cache.k)),
                                                        static_cast<__half*>(const_cast<void*>(a.cache.v)));
  } else if (a.cache.dtype == DType::kBF16) {
    WriteKvKernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(
        a, static_cast<__nv_bfloat16*>(const_cast<void*>(a.cache.k)),
        static_cast<__nv_bfloat16*>(const_cast<void*>(a.cache.v)));
  } else {
    return absl::InvalidArgumentError("WriteKvCacheCuda: the cache type must be f16 or bf16");
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvshard
