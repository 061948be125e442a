#include "common/gguf.h"

#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <type_traits>
#include <variant>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvshard {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint32_t kGgufVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS

struct TypeTraits {
  const char* name = nullptr;  // nullptr: no ggml type has this id
  int64_t block_size = 0;
  int64_t type_size = 0;
};

// Every type ggml defines, so that a file with types we cannot dequantize still opens (its metadata,
// e.g. the tokenizer, is usable) and its tensor extents can be checked.
const TypeTraits& Traits(uint32_t id) {
  static const TypeTraits kUnknown{};
  static const TypeTraits kTable[] = {
      {"F32", 1, 4},        {"F16", 1, 2},        {"Q4_0", 32, 18},     {"Q4_1", 32, 20},
      {},                   {},                   {"Q5_0", 32, 22},     {"Q5_1", 32, 24},
      {"Q8_0", 32, 34},     {"Q8_1", 32, 36},     {"Q2_K", 256, 84},    {"Q3_K", 256, 110},
      {"Q4_K", 256, 144},   {"Q5_K", 256, 176},   {"Q6_K", 256, 210},   {"Q8_K", 256, 292},
      {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74},  {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50},
      {"IQ4_NL", 32, 18},   {"IQ3_S", 256, 110},  {"IQ2_S", 256, 82},   {"IQ4_XS", 256, 136},
      {"I8", 1, 1},         {"I16", 1, 2},        {"I32", 1, 4},        {"I64", 1, 8},
      {"F64", 1, 8},        {"IQ1_M", 256, 56},   {"BF16", 1, 2},       {},
      {},                   {},                   {"TQ1_0", 256, 54},   {"TQ2_0", 256, 66},
      {},                   {},                   {},                   {"MXFP4", 32, 17},
  };
  constexpr uint32_t kCount = sizeof(kTable) / sizeof(kTable[0]);
  return id < kCount ? kTable[id] : kUnknown;
}

enum class ValueType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6, kBool = 7,
  kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};

// Bytes an element of this type takes at the least (a string: its 8-byte length), or 0 if unknown.
uint64_t MinValueBytes(uint32_t type) {
  switch (static_cast<ValueType>(type)) {
    case ValueType::kUint8: case ValueType::kInt8: case ValueType::kBool: return 1;
    case ValueType::kUint16: case ValueType::kInt16: return 2;
    case ValueType::kUint32: case ValueType::kInt32: case ValueType::kFloat32: return 4;
    case ValueType::kUint64: case ValueType::kInt64: case ValueType::kFloat64: return 8;
    case ValueType::kString: return 8;
    case ValueType::kArray: return 12;  // element type + count
  }
  return 0;
}

// Bounds-checked little-endian reads from the mapping. `context_` names the item being read, so that a
// truncation error says where in the file structure it happened.
class Reader {
 public:
  Reader(const std::string& path, const uint8_t* data, size_t size) : path_(path), data_(data), size_(size) {}

  size_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  void set_context(std::string context) { context_ = std::move(context); }

  absl::Status Error(absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", context_, context_.empty() ? "" : ": ", problem));
  }

  absl::Status Need(uint64_t n, absl::string_view what) const {
    if (n <= remaining()) return absl::OkStatus();
    return Error(absl::StrCat("truncated file: ", what, " at offset ", pos_, " needs ", n,
                              " bytes but the file has ", size_, " bytes"));
  }

  template <typename T>
  absl::StatusOr<T> Read(absl::string_view what) {
    KV_RETURN_IF_ERROR(Need(sizeof(T), what));
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  absl::StatusOr<std::string> ReadString(absl::string_view what) {
    KV_ASSIGN_OR_RETURN(const uint64_t length, Read<uint64_t>(what));
    if (length > remaining()) {
      return Error(absl::StrCat("truncated or corrupt file: ", what, " at offset ", pos_ - 8, " claims ",
                                length, " bytes but only ", remaining(), " remain"));
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return s;
  }

  absl::StatusOr<GgufValue> ReadValue(uint32_t type) {
    switch (static_cast<ValueType>(type)) {
      case ValueType::kUint8: return ReadScalarAs<uint8_t, int64_t>();
      case ValueType::kInt8: return ReadScalarAs<int8_t, int64_t>();
      case ValueType::kUint16: return ReadScalarAs<uint16_t, int64_t>();
      case ValueType::kInt16: return ReadScalarAs<int16_t, int64_t>();
      case ValueType::kUint32: return ReadScalarAs<uint32_t, int64_t>();
      case ValueType::kInt32: return ReadScalarAs<int32_t, int64_t>();
      case ValueType::kInt64: return ReadScalarAs<int64_t, int64_t>();
      case ValueType::kUint64: return ReadScalarAs<uint64_t, uint64_t>();
      case ValueType::kFloat32: return ReadScalarAs<float, double>();
      case ValueType::kFloat64: return ReadScalarAs<double, double>();
      case ValueType::kBool: {
        KV_ASSIGN_OR_RETURN(const uint8_t b, Read<uint8_t>("bool value"));
        return GgufValue(b != 0);
      }
      case ValueType::kString: {
        KV_ASSIGN_OR_RETURN(std::string s, ReadString("string value"));
        return GgufValue(std::move(s));
      }
      case ValueType::kArray: return ReadArray();
    }
    return Error(absl::StrCat("unknown value type ", type));
  }

 private:
  template <typename Stored, typename As>
  absl::StatusOr<GgufValue> ReadScalarAs() {
    KV_ASSIGN_OR_RETURN(const Stored v, Read<Stored>("value"));
    return GgufValue(static_cast<As>(v));
  }

  template <typename Stored, typename As>
  absl::Status ReadElements(uint64_t count, std::vector<As>& out) {
    out.resize(count);
    for (uint64_t i = 0; i < count; ++i) {
      Stored v;
      std::memcpy(&v, data_ + pos_ + i * sizeof(Stored), sizeof(Stored));
      if constexpr (std::is_same_v<Stored, uint64_t>) {
        if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          return Error(absl::StrCat("array element ", i, " = ", v, " does not fit in int64"));
        }
      }
      out[i] = static_cast<As>(v);
    }
    pos_ += count * sizeof(Stored);
    return absl::OkStatus();
  }

  absl::StatusOr<GgufValue> ReadArray() {
    KV_ASSIGN_OR_RETURN(const uint32_t elem_type, Read<uint32_t>("array element type"));
    KV_ASSIGN_OR_RETURN(const uint64_t count, Read<uint64_t>("array length"));
    if (static_cast<ValueType>(elem_type) == ValueType::kArray) {
      return Error("nested arrays are not supported");
    }
    const uint64_t min_bytes = MinValueBytes(elem_type);
    if (min_bytes == 0) return Error(absl::StrCat("unknown array element type ", elem_type));
    if (count > remaining() / min_bytes) {
      return Error(absl::StrCat("truncated or corrupt file: array of ", count, " elements at offset ", pos_,
                                " cannot fit in the remaining ", remaining(), " bytes"));
    }
    switch (static_cast<ValueType>(elem_type)) {
      case ValueType::kUint8: return IntArray<uint8_t>(count);
      case ValueType::kInt8: return IntArray<int8_t>(count);
      case ValueType::kUint16: return IntArray<uint16_t>(count);
      case ValueType::kInt16: return IntArray<int16_t>(count);
      case ValueType::kUint32: return IntArray<uint32_t>(count);
      case ValueType::kInt32: return IntArray<int32_t>(count);
      case ValueType::kUint64: return IntArray<uint64_t>(count);
      case ValueType::kInt64: return IntArray<int64_t>(count);
      case ValueType::kFloat32: return FloatArray<float>(count);
      case ValueType::kFloat64: return FloatArray<double>(count);
      case ValueType::kBool: {
        std::vector<bool> values(count);
        for (uint64_t i = 0; i < count; ++i) values[i] = data_[pos_ + i] != 0;
        pos_ += count;
        return GgufValue(GgufArray(std::move(values)));
      }
      case ValueType::kString: {
        std::vector<std::string> values;
        values.reserve(count);
        for (uint64_t i = 0; i < count; ++i) {
          KV_ASSIGN_OR_RETURN(std::string s, ReadString("array string"));
          values.push_back(std::move(s));
        }
        return GgufValue(GgufArray(std::move(values)));
      }
      case ValueType::kArray: break;
    }
    return Error(absl::StrCat("unknown array element type ", elem_type));
  }

  template <typename Stored>
  absl::StatusOr<GgufValue> IntArray(uint64_t count) {
    std::vector<int64_t> values;
    KV_RETURN_IF_ERROR((ReadElements<Stored, int64_t>(count, values)));
    return GgufValue(GgufArray(std::move(values)));
  }
  template <typename Stored>
  absl::StatusOr<GgufValue> FloatArray(uint64_t count) {
    std::vector<double> values;
    KV_RETURN_IF_ERROR((ReadElements<Stored, double>(count, values)));
    return GgufValue(GgufArray(std::move(values)));
  }

  const std::string& path_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string context_;
};

std::string DescribeValue(const GgufValue& value) {
  struct Visitor {
    std::string operator()(int64_t) const { return "an integer"; }
    std::string operator()(uint64_t) const { return "an integer"; }
    std::string operator()(double) const { return "a float"; }
    std::string operator()(bool) const { return "a bool"; }
    std::string operator()(const std::string&) const { return "a string"; }
    std::string operator()(const GgufArray& array) const {
      struct ElementVisitor {
        std::string operator()(const std::vector<int64_t>&) const { return "an array of integers"; }
        std::string operator()(const std::vector<double>&) const { return "an array of floats"; }
        std::string operator()(const std::vector<bool>&) const { return "an array of bools"; }
        std::string operator()(const std::vector<std::string>&) const { return "an array of strings"; }
      };
      return std::visit(ElementVisitor{}, array);
    }
  };
  return std::visit(Visitor{}, value);
}

}  // namespace

std::string_view GgmlTypeName(GgmlType type) {
  const uint32_t id = static_cast<uint32_t>(type);
  if (const char* name = Traits(id).name) return name;
  // Names of unknown ids are made once and kept: the returned view must outlive the call.
  static std::mutex mutex;
  static std::set<std::string> unknown_names;
  std::lock_guard<std::mutex> lock(mutex);
  return *unknown_names.insert(absl::StrCat("type<", id, ">")).first;
}

int64_t GgmlBlockSize(GgmlType type) { return Traits(static_cast<uint32_t>(type)).block_size; }
int64_t GgmlTypeSize(GgmlType type) { return Traits(static_cast<uint32_t>(type)).type_size; }

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  KV_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapping, MappedFile::Open(path));
  auto file = std::unique_ptr<GgufFile>(new GgufFile());
  file->path_ = path;
  Reader reader(path, mapping->data(), mapping->size());

  // Header: magic, version, tensor count, metadata count (GGUF v3, little-endian).
  reader.set_context("header");
  constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;
  if (mapping->size() < kHeaderBytes) {
    return reader.Error(absl::StrCat("truncated file: ", mapping->size(), " bytes, a GGUF header needs ",
                                     kHeaderBytes));
  }
  KV_ASSIGN_OR_RETURN(const uint32_t magic, reader.Read<uint32_t>("magic"));
  if (magic != kGgufMagic) {
    char shown[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < 4; ++i) {
      const char c = static_cast<char>(mapping->data()[i]);
      shown[i] = (c >= 0x20 && c < 0x7f) ? c : '?';
    }
    return reader.Error(absl::StrCat("bad magic '", shown, "', not a GGUF file (expected 'GGUF')"));
  }
  KV_ASSIGN_OR_RETURN(file->version_, reader.Read<uint32_t>("version"));
  if (file->version_ != kGgufVersion) {
    if (file->version_ == (kGgufVersion << 24)) {
      return reader.Error("big-endian GGUF files are not supported");
    }
    return reader.Error(absl::StrCat("unsupported GGUF version ", file->version_, " (only version ",
                                     kGgufVersion, " is supported)"));
  }
  KV_ASSIGN_OR_RETURN(const uint64_t tensor_count, reader.Read<uint64_t>("tensor count"));
  KV_ASSIGN_OR_RETURN(const uint64_t kv_count, reader.Read<uint64_t>("metadata count"));
  // Smallest possible entries: a metadata entry is a key length, a type and a 1-byte value; a tensor info
  // a name length, n_dims, one dimension, a type and an offset.
  constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
  constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;
  if (kv_count > reader.remaining() / kMinKvBytes || tensor_count > reader.remaining() / kMinTensorInfoBytes ||
      kv_count * kMinKvBytes + tensor_count * kMinTensorInfoBytes > reader.remaining()) {
    return reader.Error(absl::StrCat("corrupt or truncated file: ", tensor_count, " tensors and ", kv_count,
                                     " metadata entries cannot fit in ", mapping->size(), " bytes"));
  }

  // Metadata.
  file->metadata_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    reader.set_context(absl::StrCat("metadata entry ", i));
    KV_ASSIGN_OR_RETURN(std::string key, reader.ReadString("key"));
    reader.set_context(absl::StrCat("metadata entry ", i, " '", key, "'"));
    KV_ASSIGN_OR_RETURN(const uint32_t type, reader.Read<uint32_t>("value type"));
    KV_ASSIGN_OR_RETURN(GgufValue value, reader.ReadValue(type));
    if (!file->metadata_index_.emplace(key, file->metadata_.size()).second) {
      return reader.Error("duplicate metadata key");
    }
    file->metadata_.emplace_back(std::move(key), std::move(value));
  }
  reader.set_context("general.alignment");
  if (file->Has("general.alignment")) {
    KV_ASSIGN_OR_RETURN(const int64_t alignment, file->GetInt("general.alignment"));
    if (alignment <= 0 || (alignment & (alignment - 1)) != 0) {
      return reader.Error(absl::StrCat("alignment ", alignment, " is not a positive power of two"));
    }
    file->alignment_ = static_cast<uint64_t>(alignment);
  } else {
    file->alignment_ = kDefaultAlignment;
  }

  // Tensor infos.
  file->tensors_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    reader.set_context(absl::StrCat("tensor info ", i));
    GgufTensorInfo info;
    KV_ASSIGN_OR_RETURN(info.name, reader.ReadString("name"));
    reader.set_context(absl::StrCat("tensor '", info.name, "'"));
    KV_ASSIGN_OR_RETURN(const uint32_t n_dims, reader.Read<uint32_t>("dimension count"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return reader.Error(absl::StrCat("has ", n_dims, " dimensions (1 to ", kMaxDims, " allowed)"));
    }
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      KV_ASSIGN_OR_RETURN(const uint64_t dim, reader.Read<uint64_t>("dimension"));
      if (dim == 0 || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(numel, static_cast<int64_t>(dim), &numel)) {
        return reader.Error(absl::StrCat("absurd dimension ", dim));
      }
      info.ne.push_back(static_cast<int64_t>(dim));
    }
    KV_ASSIGN_OR_RETURN(const uint32_t type_id, reader.Read<uint32_t>("type"));
    const TypeTraits& traits = Traits(type_id);
    if (traits.name == nullptr) return reader.Error(absl::StrCat("unknown ggml type id ", type_id));
    info.type = static_cast<GgmlType>(type_id);
    if (info.ne[0] % traits.block_size != 0) {
      return reader.Error(absl::StrCat("row length ", info.ne[0], " is not a multiple of the ", traits.name,
                                       " block size ", traits.block_size));
    }
    int64_t size_bytes = 0;
    if (__builtin_mul_overflow(numel / traits.block_size, traits.type_size, &size_bytes)) {
      return reader.Error("absurd size");
    }
    info.size_bytes = static_cast<uint64_t>(size_bytes);
    KV_ASSIGN_OR_RETURN(info.offset, reader.Read<uint64_t>("data offset"));
    if (!file->tensor_index_.emplace(info.name, file->tensors_.size()).second) {
      return reader.Error("duplicate tensor name");
    }
    file->tensors_.push_back(std::move(info));
  }

  // Data section: starts at the next multiple of the alignment; every tensor must lie inside it.
  reader.set_context("data section");
  const uint64_t data_start = (reader.pos() + file->alignment_ - 1) / file->alignment_ * file->alignment_;
  if (!file->tensors_.empty()) {
    if (data_start > mapping->size()) {
      return reader.Error(absl::StrCat("truncated file: the data section starts at ", data_start,
                                       " but the file has ", mapping->size(), " bytes"));
    }
    const uint64_t data_bytes = mapping->size() - data_start;
    for (const GgufTensorInfo& info : file->tensors_) {
      reader.set_context(absl::StrCat("tensor '", info.name, "'"));
      if (info.offset % file->alignment_ != 0) {
        return reader.Error(absl::StrCat("data offset ", info.offset, " is not a multiple of the alignment ",
                                         file->alignment_));
      }
      if (info.offset > data_bytes || info.size_bytes > data_bytes - info.offset) {
        return reader.Error(absl::StrCat("truncated or corrupt file: data at [", info.offset, ", ",
                                         info.offset + info.size_bytes, ") of the data section, which has only ",
                                         data_bytes, " bytes"));
      }
    }
    file->data_section_ = mapping->data() + data_start;
  }
  file->mapping_ = std::move(mapping);
  return file;
}

GgufFile::~GgufFile() = default;

bool GgufFile::Has(std::string_view key) const { return Find(key) != nullptr; }

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = metadata_index_.find(std::string(key));
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second].second;
}

namespace {

absl::Status MissingKey(const std::string& path, absl::string_view key) {
  return absl::NotFoundError(absl::StrCat(path, ": metadata key '", key, "' is missing"));
}
absl::Status WrongType(const std::string& path, absl::string_view key, const GgufValue& value,
                       absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": metadata key '", key, "' is ", DescribeValue(value), ", expected ", expected));
}

template <typename T>
absl::StatusOr<std::vector<T>> GetArray(const GgufFile& file, std::string_view key, absl::string_view expected) {
  const GgufValue* value = file.Find(key);
  if (value == nullptr) return MissingKey(file.path(), ToAbsl(key));
  if (const auto* array = std::get_if<GgufArray>(value)) {
    if (const auto* elements = std::get_if<std::vector<T>>(array)) return *elements;
  }
  return WrongType(file.path(), ToAbsl(key), *value, expected);
}

}  // namespace

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* value = Find(key);
  if (value == nullptr) return MissingKey(path_, ToAbsl(key));
  if (const auto* s = std::get_if<std::string>(value)) return *s;
  return WrongType(path_, ToAbsl(key), *value, "a string");
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* value = Find(key);
  if (value == nullptr) return MissingKey(path_, ToAbsl(key));
  if (const auto* i = std::get_if<int64_t>(value)) return *i;
  if (const auto* u = std::get_if<uint64_t>(value)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": metadata key '", ToAbsl(key), "' = ", *u, " does not fit in int64"));
    }
    return static_cast<int64_t>(*u);
  }
  return WrongType(path_, ToAbsl(key), *value, "an integer");
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* value = Find(key);
  if (value == nullptr) return MissingKey(path_, ToAbsl(key));
  if (const auto* d = std::get_if<double>(value)) return *d;
  if (const auto* i = std::get_if<int64_t>(value)) return static_cast<double>(*i);
  if (const auto* u = std::get_if<uint64_t>(value)) return static_cast<double>(*u);
  return WrongType(path_, ToAbsl(key), *value, "a float");
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* value = Find(key);
  if (value == nullptr) return MissingKey(path_, ToAbsl(key));
  if (const auto* b = std::get_if<bool>(value)) return *b;
  return WrongType(path_, ToAbsl(key), *value, "a bool");
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  return GetArray<std::string>(*this, key, "an array of strings");
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  return GetArray<int64_t>(*this, key, "an array of integers");
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* value = Find(key);
  if (value == nullptr) return MissingKey(path_, ToAbsl(key));
  if (const auto* array = std::get_if<GgufArray>(value)) {
    if (const auto* floats = std::get_if<std::vector<double>>(array)) return *floats;
    if (const auto* ints = std::get_if<std::vector<int64_t>>(array)) {
      return std::vector<double>(ints->begin(), ints->end());
    }
  }
  return WrongType(path_, ToAbsl(key), *value, "an array of floats");
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::TensorData(const GgufTensorInfo& info) const { return data_section_ + info.offset; }

}  // namespace kvshard
