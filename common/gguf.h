// Reader for GGUF v3 files (the llama.cpp model format): header, metadata, tensor infos, alignment.
// The file is memory-mapped; tensor bytes are returned as pointers into the mapping, unconverted.
// Dequantization lives in worker/ (see worker/dequantize.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "common/mapped_file.h"

namespace kvshard {

// ggml tensor type ids, as written in GGUF tensor infos.
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kBF16 = 30,
};
std::string_view GgmlTypeName(GgmlType type);  // "Q4_1", or "type<N>" for ids we do not know
// Elements per block and bytes per block of a type (1 and 4 for F32, 32 and 20 for Q4_1), or 0 for ids
// ggml does not define. A row of ne[0] elements takes ne[0] / block_size * type_size bytes.
int64_t GgmlBlockSize(GgmlType type);
int64_t GgmlTypeSize(GgmlType type);

// One metadata value. Arrays keep their element type's natural C++ type.
using GgufArray = std::variant<std::vector<int64_t>,      // all integer element types, widened
                               std::vector<double>,       // f32/f64
                               std::vector<bool>,
                               std::vector<std::string>>;
using GgufValue = std::variant<int64_t, uint64_t, double, bool, std::string, GgufArray>;

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the fastest-varying (row length); a Linear weight
                            // [out, in] has ne = {in, out}
  GgmlType type;
  uint64_t offset = 0;      // from the start of the data section
  uint64_t size_bytes = 0;  // bytes the data occupies (rows * row bytes for block types)
  int64_t numel() const;
};

class GgufFile {
 public:
  // Opens and validates: magic, version 3, counts within the file, every tensor inside the file and
  // aligned. Errors name the file and the problem ("truncated", "bad magic", ...).
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  bool Has(std::string_view key) const;
  const GgufValue* Find(std::string_view key) const;
  // Typed getters: NotFound when absent, InvalidArgument when of another type.
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;   // any integer type
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // f32/f64, or an integer
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;
  const uint8_t* TensorData(const GgufTensorInfo& info) const;

 private:
  GgufFile() = default;
  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::unique_ptr<MappedFile> mapping_;
  const uint8_t* data_section_ = nullptr;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, size_t> metadata_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace kvshard
