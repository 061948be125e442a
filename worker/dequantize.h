// Dequantization of GGUF tensor data to fp32, done once at load.
//
// Each block format follows ggml's reference dequantize_row_* arithmetic (the same float operations in
// the same order as the gguf Python package's numpy code), so results are bit-identical to both.
// Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/gguf.h"
#include "common/tensor.h"

namespace kvshard {

bool CanDequantize(GgmlType type);

// Dequantizes n_rows rows of row_length elements each, stored back to back in `src`
// (row_length / GgmlBlockSize(type) * GgmlTypeSize(type) bytes a row), into dst [n_rows][row_length].
// Parallel over rows (OpenMP). InvalidArgument when row_length is not a multiple of the block size,
// Unimplemented for a type CanDequantize rejects.
absl::Status DequantizeRows(GgmlType type, const uint8_t* src, int64_t n_rows, int64_t row_length, float* dst);

// OK when DequantizeTensor can read `info`; else Unimplemented naming the file, the tensor and its type.
absl::Status CheckDequantizable(const GgufFile& file, const GgufTensorInfo& info);

// A whole tensor of `file`. The result's shape is ne reversed (outermost first), so a Linear weight with
// ne = {in, out} becomes [out, in]. Unimplemented names the tensor and its type when unsupported.
absl::StatusOr<HostTensor> DequantizeTensor(const GgufFile& file, const GgufTensorInfo& info);

}  // namespace kvshard
