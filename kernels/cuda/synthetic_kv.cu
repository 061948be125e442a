// The synthetic KV generator on the GPU (synthetic_kv.h); CPU twin worker/synthetic.cc.
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/synthetic_kv.h"

namespace kvshard {
namespace {

// SplitMix64 and the derived draws of worker/synthetic.cc.
__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ uint64_t Key(uint64_t a, uint64_t b) { return Mix(a ^ Mix(b)); }
__device__ __forceinline__ float Uniform(uint64_t bits) {
  return __fsub_rn(__fmul_rn(static_cast<float>(bits >> 40), 2.0f / 16777216.0f), 1.0f);
}
__device__ __forceinline__ float Normal(uint64_t key) {
  const uint64_t a = Mix(key), b = Mix(key + 1);
  const float s = __fadd_rn(__fadd_rn(__fadd_rn(Uniform(a), Uniform(a << 24)), Uniform(b)), Uniform(b << 24));
  return __fmul_rn(s, 0.8660254f);
}

// One thread per (token, KV head, channel).
__global__ void SyntheticKvKernel(int n_kv_heads, int head_dim, int layer, int64_t begin, int64_t n_tokens,
                                  uint64_t seed, float* __restrict__ k, float* __restrict__ v) {
  const int64_t row = static_cast<int64_t>(n_kv_heads) * head_dim;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_tokens * row) return;
  const int64_t t = idx / row;
  const int h = static_cast<int>(idx % row) / head_dim;
  const int c = static_cast<int>(idx % head_dim);
  const uint64_t channel = Key(Key(seed, 0x6b657973ull + layer), static_cast<uint64_t>(h) * head_dim + c);
  const float mean = __fmul_rn(0.5f, Normal(channel));
  const bool outlier = (Mix(channel + 7) % 100) < 3;
  const float scale =
      outlier ? __fadd_rn(4.0f, __fmul_rn(4.0f, __fadd_rn(0.5f, __fmul_rn(0.5f, Uniform(Mix(channel + 11))))))
              : 1.0f;
  const uint64_t layer_key = Key(seed, 0x76616c73ull + layer);
  const uint64_t token_key = Key(layer_key, static_cast<uint64_t>(begin + t));
  const uint64_t head_key = Key(token_key, static_cast<uint64_t>(h));
  // One fused multiply-add: the CPU build (-mfma, GCC's default contraction) fuses this line; the other
  // products are exact (powers of two) or not followed by an add.
  k[idx] = __fmaf_rn(scale, Normal(Key(head_key, 2 * c)), mean);
  const uint64_t vk = Key(head_key, 2 * c + 1);
  const bool spike = (Mix(vk + 3) % 1000) < 5;
  v[idx] = __fmul_rn(__fmul_rn(0.5f, Normal(vk)), spike ? 6.0f : 1.0f);
}

}  // namespace

absl::Status SyntheticKvTokensCuda(int n_kv_heads, int head_dim, int layer, int64_t begin, int64_t n_tokens,
                                   uint64_t seed, float* k, float* v, cudaStream_t stream) {
  if (n_kv_heads <= 0 || head_dim <= 0 || n_tokens < 0 || begin < 0) {
    return absl::InvalidArgumentError(absl::StrCat("SyntheticKvTokensCuda: bad shape (", n_kv_heads, " KV heads, head_dim ",
                                                   head_dim, ", tokens [", begin, ", +", n_tokens, "))"));
  }
  if (n_tokens == 0) return absl::OkStatus();
  constexpr int kThreads = 256;
  const int64_t total = n_tokens * n_kv_heads * head_dim;
  SyntheticKvKernel<<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(n_kv_heads, head_dim, layer, begin,
                                                                                 n_tokens, seed, k, v);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvshard
