// Reader for safetensors files (Hugging Face weights): an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}, then
// the data. The file is memory-mapped; offsets are relative to the end of the header.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/mapped_file.h"
#include "common/tensor.h"

namespace kvshard {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;           // "BF16", "F16", "F32", ... as written
  std::vector<int64_t> shape;  // outermost first
  uint64_t begin = 0;          // byte range in the data section
  uint64_t end = 0;
};

class SafetensorsFile {
 public:
  // Validates the header: its length within the file, valid JSON, known dtypes, every tensor's byte range
  // inside the file and of the size its shape and dtype imply. Errors name the file and the problem.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return mapping_->path(); }
  const std::map<std::string, SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* Find(const std::string& name) const;
  const uint8_t* Data(const SafetensorsTensor& tensor) const { return data_section_ + tensor.begin; }

  // OK when ToFloat can convert the tensor's dtype; else Unimplemented naming the file, tensor and dtype.
  absl::Status CheckFloat(const SafetensorsTensor& tensor) const;
  // The tensor as fp32 (from F32, F16 or BF16); Unimplemented for other dtypes.
  absl::StatusOr<HostTensor> ToFloat(const SafetensorsTensor& tensor) const;

 private:
  SafetensorsFile() = default;
  std::unique_ptr<MappedFile> mapping_;
  const uint8_t* data_section_ = nullptr;
  std::map<std::string, SafetensorsTensor> tensors_;
};

}  // namespace kvshard
