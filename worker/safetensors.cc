#include "worker/safetensors.h"

#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/half.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace kvshard {
namespace {

// The format caps the header at 100 MB; a larger claimed length means a corrupt or foreign file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

int64_t DtypeBytes(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2},
      {"U16", 2},  {"F16", 2}, {"BF16", 2}, {"I32", 4},     {"U32", 4},     {"F32", 4},
      {"F64", 8},  {"I64", 8}, {"U64", 8},
  };
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  KV_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapping, MappedFile::Open(path));
  auto error = [&](std::string_view problem) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", ToAbsl(problem)));
  };
  const uint64_t file_size = mapping->size();
  if (file_size < 8) return error(absl::StrCat("truncated file: ", file_size, " bytes, a header needs 8"));
  uint64_t header_bytes;
  std::memcpy(&header_bytes, mapping->data(), 8);
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_size - 8) {
    return error(absl::StrCat("corrupt or truncated file: header length ", header_bytes, " with a file of ",
                              file_size, " bytes"));
  }
  const char* header_text = reinterpret_cast<const char*>(mapping->data() + 8);
  const nlohmann::json header =
      nlohmann::json::parse(header_text, header_text + header_bytes, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return error("header is not a JSON object");

  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  const uint64_t data_bytes = file_size - 8 - header_bytes;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = absl::StrCat("tensor '", name, "'");
    if (!entry.is_object() || !entry.contains("dtype") || !entry["dtype"].is_string() ||
        !entry.contains("shape") || !entry["shape"].is_array() || !entry.contains("data_offsets") ||
        !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2) {
      return error(absl::StrCat(where, ": header entry needs dtype, shape and data_offsets [begin, end]"));
    }
    SafetensorsTensor tensor;
    tensor.name = name;
    tensor.dtype = entry["dtype"].get<std::string>();
    const int64_t dtype_bytes = DtypeBytes(tensor.dtype);
    if (dtype_bytes == 0) return error(absl::StrCat(where, ": unknown dtype '", tensor.dtype, "'"));
    int64_t numel = 1;
    for (const auto& dim : entry["shape"]) {
      if (!dim.is_number_unsigned() ||
          dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(numel, dim.get<int64_t>(), &numel)) {
        return error(absl::StrCat(where, ": bad shape ", entry["shape"].dump()));
      }
      tensor.shape.push_back(dim.get<int64_t>());
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) {
      return error(absl::StrCat(where, ": bad data_offsets ", offsets.dump()));
    }
    tensor.begin = offsets[0].get<uint64_t>();
    tensor.end = offsets[1].get<uint64_t>();
    if (tensor.begin > tensor.end || tensor.end > data_bytes) {
      return error(absl::StrCat("truncated or corrupt file: ", where, " has bytes [", tensor.begin, ", ",
                                tensor.end, ") of a data section of ", data_bytes, " bytes"));
    }
    int64_t expected_bytes = 0;
    if (__builtin_mul_overflow(numel, dtype_bytes, &expected_bytes) ||
        tensor.end - tensor.begin != static_cast<uint64_t>(expected_bytes)) {
      return error(absl::StrCat(where, ": ", tensor.end - tensor.begin, " bytes for shape ",
                                entry["shape"].dump(), " of ", tensor.dtype));
    }
    file->tensors_.emplace(name, std::move(tensor));
  }
  file->data_section_ = mapping->data() + 8 + header_bytes;
  file->mapping_ = std::move(mapping);
  return file;
}

const SafetensorsTensor* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Status SafetensorsFile::CheckFloat(const SafetensorsTensor& tensor) const {
  if (tensor.dtype == "F32" || tensor.dtype == "F16" || tensor.dtype == "BF16") return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(path(), ": tensor '", tensor.name, "' has dtype ", tensor.dtype,
                                               "; supported dtypes are BF16, F16 and F32"));
}

absl::StatusOr<HostTensor> SafetensorsFile::ToFloat(const SafetensorsTensor& tensor) const {
  KV_RETURN_IF_ERROR(CheckFloat(tensor));
  HostTensor out;
  out.shape = tensor.shape;
  const int64_t n = out.shape.empty() ? 1 : out.numel();
  out.data.resize(static_cast<size_t>(n));
  const uint8_t* src = Data(tensor);
  float* dst = out.data.data();
  if (tensor.dtype == "F32") {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else {  // F16 or BF16
    const bool is_bf16 = tensor.dtype == "BF16";
#pragma omp parallel for schedule(static) if (n >= (int64_t{1} << 16))
    for (int64_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);
      dst[i] = is_bf16 ? Bf16ToFloat(bits) : HalfToFloat(bits);
    }
  }
  return out;
}

}  // namespace kvshard
