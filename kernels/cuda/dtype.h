// Element types of device tensors, for launchers that take untyped pointers.
#pragma once

namespace kvshard {

enum class DType { kF32, kF16, kBF16 };

inline const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

inline int DTypeBytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

}  // namespace kvshard
