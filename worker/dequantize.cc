#include "worker/dequantize.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"

namespace kvshard {
namespace {

// Block layouts (ggml-common.h). Fields are read with memcpy: blocks are packed and unaligned.
constexpr int kQK = 32;    // elements per block of the Q4_0..Q8_0 formats
constexpr int kQK_K = 256;  // elements per K-quant super-block

inline float ReadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}

// block_q4_0: half d; uint8 qs[16]. Low nibbles are elements 0..15, high nibbles 16..31.
void DequantizeQ4_0(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const uint8_t* qs = block + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1: half d, half m; uint8 qs[16].
void DequantizeQ4_1(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const float m = ReadHalf(block + 2);
  const uint8_t* qs = block + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    y[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// block_q5_0: half d; uint32 qh (bit j is the fifth bit of element j); uint8 qs[16].
void DequantizeQ5_0(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  uint32_t qh;
  std::memcpy(&qh, block + 2, 4);
  const uint8_t* qs = block + 6;
  for (int j = 0; j < kQK / 2; ++j) {
    const int high0 = static_cast<int>((qh >> j) << 4) & 0x10;
    const int high1 = static_cast<int>(qh >> (j + 12)) & 0x10;
    y[j] = static_cast<float>(((qs[j] & 0x0f) | high0) - 16) * d;
    y[j + kQK / 2] = static_cast<float>(((qs[j] >> 4) | high1) - 16) * d;
  }
}

// block_q5_1: half d, half m; uint32 qh; uint8 qs[16].
void DequantizeQ5_1(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const float m = ReadHalf(block + 2);
  uint32_t qh;
  std::memcpy(&qh, block + 4, 4);
  const uint8_t* qs = block + 8;
  for (int j = 0; j < kQK / 2; ++j) {
    const int high0 = static_cast<int>((qh >> j) << 4) & 0x10;
    const int high1 = static_cast<int>(qh >> (j + 12)) & 0x10;
    y[j] = static_cast<float>((qs[j] & 0x0f) | high0) * d + m;
    y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) | high1) * d + m;
  }
}

// block_q8_0: half d; int8 qs[32].
void DequantizeQ8_0(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const int8_t* qs = reinterpret_cast<const int8_t*>(block + 2);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block, packed in 12 bytes.
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = static_cast<uint8_t>((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// block_q4_K: half d, half dmin; uint8 scales[12]; uint8 qs[128]. Eight sub-blocks of 32; each 64
// elements share 32 bytes (low nibbles first).
void DequantizeQ4_K(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const float dmin = ReadHalf(block + 2);
  const uint8_t* scales = block + 4;
  const uint8_t* q = block + 16;
  for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    ScaleMinK4(is, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

// block_q5_K: half d, half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128].
void DequantizeQ5_K(const uint8_t* block, float* y) {
  const float d = ReadHalf(block);
  const float dmin = ReadHalf(block + 2);
  const uint8_t* scales = block + 4;
  const uint8_t* qh = block + 16;
  const uint8_t* ql = block + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    uint8_t sc, m;
    ScaleMinK4(is, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
  }
}

// block_q6_K: uint8 ql[128] (low 4 bits); uint8 qh[64] (high 2 bits); int8 scales[16]; half d.
void DequantizeQ6_K(const uint8_t* block, float* y) {
  const uint8_t* ql = block;
  const uint8_t* qh = block + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
  const float d = ReadHalf(block + 208);
  for (int n = 0; n < kQK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int8_t>((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int8_t>((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * static_cast<float>(q1);
      y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
      y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
      y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
    }
  }
}

void DequantizeF32(const uint8_t* block, float* y) { std::memcpy(y, block, 4); }
void DequantizeF16(const uint8_t* block, float* y) { *y = ReadHalf(block); }
void DequantizeBf16(const uint8_t* block, float* y) {
  uint16_t b;
  std::memcpy(&b, block, 2);
  *y = Bf16ToFloat(b);
}

using BlockFn = void (*)(const uint8_t* block, float* y);

BlockFn BlockFunction(GgmlType type) {
  switch (type) {
    case GgmlType::kF32: return DequantizeF32;
    case GgmlType::kF16: return DequantizeF16;
    case GgmlType::kBF16: return DequantizeBf16;
    case GgmlType::kQ4_0: return DequantizeQ4_0;
    case GgmlType::kQ4_1: return DequantizeQ4_1;
    case GgmlType::kQ5_0: return DequantizeQ5_0;
    case GgmlType::kQ5_1: return DequantizeQ5_1;
    case GgmlType::kQ8_0: return DequantizeQ8_0;
    case GgmlType::kQ4_K: return DequantizeQ4_K;
    case GgmlType::kQ5_K: return DequantizeQ5_K;
    case GgmlType::kQ6_K: return DequantizeQ6_K;
    default: return nullptr;
  }
}

}  // namespace

bool CanDequantize(GgmlType type) { return BlockFunction(type) != nullptr; }

absl::Status DequantizeRows(GgmlType type, const uint8_t* src, int64_t n_rows, int64_t row_length, float* dst) {
  const BlockFn fn = BlockFunction(type);
  if (fn == nullptr) {
    return absl::UnimplementedError(absl::StrCat("dequantizing ggml type ", ToAbsl(GgmlTypeName(type)),
                                                 " is not supported"));
  }
  const int64_t block_size = GgmlBlockSize(type);
  const int64_t type_size = GgmlTypeSize(type);
  if (row_length < 0 || n_rows < 0 || row_length % block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("row length ", row_length, " is not a multiple of the ",
                                                   ToAbsl(GgmlTypeName(type)), " block size ", block_size));
  }
  const int64_t blocks_per_row = row_length / block_size;
  const int64_t row_bytes = blocks_per_row * type_size;
  if (type == GgmlType::kF32) {  // a plain copy; the bytes are little-endian fp32 already
    std::memcpy(dst, src, static_cast<size_t>(n_rows * row_bytes));
    return absl::OkStatus();
  }
  // Small tensors (norm weights) are not worth waking the thread team for.
  const bool parallel = n_rows > 1 && n_rows * row_length >= (int64_t{1} << 15);
// Dynamic chunks: on a busy machine a descheduled thread must not hold up the others at the barrier.
#pragma omp parallel for schedule(dynamic, 8) if (parallel)
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* row = src + r * row_bytes;
    float* out = dst + r * row_length;
    for (int64_t b = 0; b < blocks_per_row; ++b) fn(row + b * type_size, out + b * block_size);
  }
  return absl::OkStatus();
}

absl::Status CheckDequantizable(const GgufFile& file, const GgufTensorInfo& info) {
  if (CanDequantize(info.type)) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(file.path(), ": tensor '", info.name, "' has type ",
                                               ToAbsl(GgmlTypeName(info.type)),
                                               ", which kvshard cannot dequantize (supported: F32, F16, "
                                               "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"));
}

absl::StatusOr<HostTensor> DequantizeTensor(const GgufFile& file, const GgufTensorInfo& info) {
  KV_RETURN_IF_ERROR(CheckDequantizable(file, info));
  HostTensor tensor;
  tensor.shape.assign(info.ne.rbegin(), info.ne.rend());
  tensor.data.resize(static_cast<size_t>(info.numel()));
  const int64_t row_length = info.ne[0];
  const int64_t n_rows = info.numel() / row_length;
  KV_RETURN_IF_ERROR(Annotate(DequantizeRows(info.type, file.TensorData(info), n_rows, row_length,
                                             tensor.data.data()),
                              absl::StrCat(file.path(), ": tensor '", info.name, "'")));
  return tensor;
}

}  // namespace kvshard
