#include "kvstore/kv_scheme.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

namespace kvshard {
namespace {

struct FamilyInfo {
  const char* prefix;
  KvSchemeKind kind;
  int min_bits, max_bits, default_bits;
};
constexpr FamilyInfo kFamilies[] = {
    {"int", KvSchemeKind::kInt, 2, 8, 8},   {"kivi", KvSchemeKind::kKivi, 2, 8, 2},
    {"kvq", KvSchemeKind::kKvq, 2, 4, 3},   {"wkv", KvSchemeKind::kWkv, 2, 8, 4},
    {"deco", KvSchemeKind::kDeco, 2, 8, 4},
};
constexpr const char* kKnownSchemes = "fp16, int2..int8, kivi2..kivi8, kvq2..kvq4, wkv2..wkv8, deco, deco2..deco8";

const FamilyInfo& Family(KvSchemeKind kind) {
  for (const FamilyInfo& f : kFamilies)
    if (f.kind == kind) return f;
  return kFamilies[0];
}

KvSchemeConfig Defaults(KvSchemeKind kind, int bits) {
  KvSchemeConfig c;
  c.kind = kind;
  c.bits = bits;
  switch (kind) {
    case KvSchemeKind::kFp16:
      c.bits = 16;
      break;
    case KvSchemeKind::kInt:
      break;
    case KvSchemeKind::kKivi:
      c.residual_tokens = 128;  // KIVI's R and G
      c.group_size = 32;
      break;
    case KvSchemeKind::kKvq:
      c.sink_tokens = 4;
      c.residual_tokens = 32;
      break;
    case KvSchemeKind::kWkv:
      c.residual_tokens = 1;  // past-only: the current token attends to its own K/V unquantized
      break;
    case KvSchemeKind::kDeco:
      break;
  }
  return c;
}

absl::StatusOr<KvSchemeConfig> ParseSchemeName(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "fp16") return Defaults(KvSchemeKind::kFp16, 16);
  for (const FamilyInfo& f : kFamilies) {
    const std::string prefix = f.prefix;
    if (lower.rfind(prefix, 0) != 0) continue;
    const std::string rest = lower.substr(prefix.size());
    int bits = f.default_bits;
    if (!rest.empty()) {
      if (!absl::SimpleAtoi(rest, &bits) || rest.size() > 2) continue;  // e.g. "integer": not a family
    } else if (f.kind != KvSchemeKind::kDeco) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV scheme \"", name, "\" needs a bit width, e.g. ", f.prefix, f.default_bits));
    }
    if (bits < f.min_bits || bits > f.max_bits) {
      return absl::InvalidArgumentError(absl::StrCat("KV scheme \"", name, "\": ", bits, " bits is out of range; ",
                                                     f.prefix, " supports ", f.min_bits, " to ", f.max_bits,
                                                     " bits"));
    }
    return Defaults(f.kind, bits);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown KV scheme \"", name, "\"; known schemes: ", kKnownSchemes));
}

absl::Status SetParameter(KvSchemeConfig& c, absl::string_view key, absl::string_view value) {
  auto bad_value = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("KV scheme parameter ", key, "=", value, ": ", why));
  };
  int64_t integer = 0;
  double real = 0;
  const bool is_integer = absl::SimpleAtoi(value, &integer);
  const bool is_real = absl::SimpleAtod(value, &real);
  if (key == "outliers") {
    if (!value.empty() && value.back() == '%') {
      if (!absl::SimpleAtod(value.substr(0, value.size() - 1), &real)) return bad_value("not a number");
      real /= 100.0;
    } else if (!is_real) {
      return bad_value("not a number");
    }
    if (!(real >= 0.0 && real <= 0.25)) return bad_value("the outlier fraction must be in [0, 0.25]");
    c.outlier_fraction = real;
    return absl::OkStatus();
  }
  if (key == "parts") {
    if (value == "kv") {
      c.quantize_keys = c.quantize_values = true;
    } else if (value == "k") {
      c.quantize_keys = true;
      c.quantize_values = false;
    } else if (value == "v") {
      c.quantize_keys = false;
      c.quantize_values = true;
    } else {
      return bad_value("parts must be kv, k (keys only) or v (values only)");
    }
    return absl::OkStatus();
  }
  if (!is_integer) return bad_value("not an integer");
  if (key == "bits") {
    const FamilyInfo& f = Family(c.kind);
    if (c.kind == KvSchemeKind::kFp16 || integer < f.min_bits || integer > f.max_bits) {
      return bad_value(absl::StrCat("out of range for ", c.name()));
    }
    c.bits = static_cast<int>(integer);
  } else if (key == "group") {
    if (integer < 1 || integer > 4096) return bad_value("the group size must be in [1, 4096]");
    c.group_size = static_cast<int>(integer);
  } else if (key == "sink") {
    if (integer < 0 || integer > 1024) return bad_value("sink tokens must be in [0, 1024]");
    c.sink_tokens = integer;
  } else if (key == "residual") {
    if (integer < 0 || integer > (1 << 20)) return bad_value("residual tokens must be in [0, 1048576]");
    c.residual_tokens = integer;
  } else if (key == "block") {
    if (integer != 16 && integer != 32 && integer != 64 && integer != 128) {
      return bad_value("the deco block must be 16, 32, 64 or 128 tokens (it divides a 128-token page)");
    }
    c.deco_block_tokens = static_cast<int>(integer);
  } else if (key == "local_channels") {
    if (integer < 1 || integer > 16) return bad_value("local channels must be in [1, 16]");
    c.deco_local_channels = static_cast<int>(integer);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown KV scheme parameter \"", key,
        "\"; known: bits, group, sink, residual, outliers, block, local_channels, parts"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string KvSchemeConfig::name() const {
  if (kind == KvSchemeKind::kFp16) return "fp16";
  return absl::StrCat(Family(kind).prefix, bits);
}

std::string KvSchemeConfig::ToString() const {
  std::vector<std::string> params;
  switch (kind) {
    case KvSchemeKind::kFp16:
      return name();
    case KvSchemeKind::kInt:
      params.push_back(absl::StrCat("group=", group_size));
      break;
    case KvSchemeKind::kKivi:
      params.push_back(absl::StrCat("group=", group_size));
      break;
    case KvSchemeKind::kKvq:
      params.push_back(absl::StrFormat("outliers=%g", outlier_fraction));
      break;
    case KvSchemeKind::kWkv:
      break;
    case KvSchemeKind::kDeco:
      params.push_back(absl::StrCat("block=", deco_block_tokens));
      params.push_back(absl::StrCat("local_channels=", deco_local_channels));
      break;
  }
  params.push_back(absl::StrCat("sink=", sink_tokens));
  params.push_back(absl::StrCat("residual=", residual_tokens));
  if (!quantize_keys || !quantize_values) params.push_back(quantize_keys ? "parts=k" : "parts=v");
  return absl::StrCat(name(), ":", absl::StrJoin(params, ","));
}

int KvSchemeConfig::flush_unit() const {
  if (kind == KvSchemeKind::kKivi) return group_size;
  if (kind == KvSchemeKind::kDeco) return deco_block_tokens;
  return 1;
}

absl::StatusOr<KvSchemeConfig> ParseKvScheme(absl::string_view spec) {
  const absl::string_view trimmed = absl::StripAsciiWhitespace(spec);
  const size_t colon = trimmed.find(':');
  KV_ASSIGN_OR_RETURN(KvSchemeConfig config, ParseSchemeName(trimmed.substr(0, colon)));
  if (colon == absl::string_view::npos) return config;
  for (absl::string_view item : absl::StrSplit(trimmed.substr(colon + 1), ',', absl::SkipWhitespace())) {
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV scheme \"", spec, "\": parameter \"", item, "\" is not key=value"));
    }
    KV_RETURN_IF_ERROR(SetParameter(config, absl::StripAsciiWhitespace(item.substr(0, eq)),
                                    absl::StripAsciiWhitespace(item.substr(eq + 1))));
  }
  return config;
}

absl::StatusOr<KvSchemeConfig> KvSchemeFromYaml(const YAML::Node& node) {
  if (node.IsScalar()) return ParseKvScheme(node.as<std::string>());
  if (!node.IsMap() || !node["scheme"]) {
    return absl::InvalidArgumentError("KV scheme config must be a scheme name or a map with a \"scheme\" key");
  }
  KV_ASSIGN_OR_RETURN(KvSchemeConfig config, ParseSchemeName(node["scheme"].as<std::string>()));
  for (const auto& item : node) {
    const std::string key = item.first.as<std::string>();
    if (key == "scheme") continue;
    if (!item.second.IsScalar()) {
      return absl::InvalidArgumentError(absl::StrCat("KV scheme parameter \"", key, "\" must be a scalar"));
    }
    KV_RETURN_IF_ERROR(SetParameter(config, key, item.second.as<std::string>()));
  }
  return config;
}

absl::Status ValidateKvScheme(const KvSchemeConfig& c, int head_dim) {
  if (head_dim <= 0) return absl::InvalidArgumentError("head_dim must be positive");
  if (c.kind == KvSchemeKind::kKvq && head_dim > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("kvq stores outlier channel indices in 8 bits; head_dim ", head_dim, " > 256"));
  }
  if (c.kind == KvSchemeKind::kDeco) {
    const int l = c.deco_local_channels;
    if (head_dim % (l * l) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("deco: head_dim ", head_dim,
                                                     " is not a multiple of local_channels^2 = ", l * l));
    }
  }
  if (c.kind == KvSchemeKind::kKivi && 128 % c.group_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kivi: the key group (", c.group_size, " tokens) must divide the 128-token page"));
  }
  return absl::OkStatus();
}

KvStreamLayout StreamLayout(const KvSchemeConfig& c, int64_t start_position, int64_t n_tokens, bool sealed) {
  KvStreamLayout l;
  l.n = n_tokens;
  if (c.kind == KvSchemeKind::kFp16) {
    l.sink = 0;
    l.quantized_end = 0;
    return l;
  }
  l.sink = std::clamp<int64_t>(c.sink_tokens - start_position, 0, n_tokens);
  const int64_t pending = n_tokens - l.sink;
  int64_t quantized = pending;
  if (!sealed) {
    const int64_t unit = c.flush_unit();
    quantized = std::max<int64_t>(0, pending - c.residual_tokens) / unit * unit;
  }
  l.quantized_end = l.sink + quantized;
  return l;
}

int KvqValueOutliersPerToken(const KvSchemeConfig& c, int head_dim) {
  return static_cast<int>(std::lround(c.outlier_fraction * head_dim));
}

namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bits of q quantized tokens of one part, all-in (kvq keys: key_outliers of them).
int64_t PartBits(const KvSchemeConfig& c, KvPart part, int d, int64_t q, int64_t key_outliers) {
  if (!c.quantizes(part)) return q * d * kHalfBits;
  const bool key = part == KvPart::kKey;
  const int64_t codes = q * d * c.bits;
  switch (c.kind) {
    case KvSchemeKind::kFp16:
      return q * d * kHalfBits;
    case KvSchemeKind::kInt:  // one fp16 scale per group of channels, per token
      return codes + q * CeilDiv(d, c.group_size) * kHalfBits;
    case KvSchemeKind::kKivi:  // fp16 scale + zero: keys per channel per token group, values per token per channel group
      return codes + (key ? CeilDiv(q, c.group_size) * d : q * CeilDiv(d, c.group_size)) * 2 * kHalfBits;
    case KvSchemeKind::kKvq: {
      const int64_t outlier_bits = kHalfBits + kOutlierIndexBits;
      if (key) return codes + q * kOutlierCountBits + key_outliers * outlier_bits;
      return codes + q * (2 * kHalfBits + KvqValueOutliersPerToken(c, d) * outlier_bits);
    }
    case KvSchemeKind::kWkv:  // per token fp16 scale + zero
      return codes + q * 2 * kHalfBits;
    case KvSchemeKind::kDeco: {  // per block: local tensors A, B (l x l) and one scale per (r1, r2) slice
      const int64_t l2 = static_cast<int64_t>(c.deco_local_channels) * c.deco_local_channels;
      return codes + CeilDiv(q, c.deco_block_tokens) * 3 * l2 * kHalfBits;
    }
  }
  return 0;
}

// The same per token for a long stream, kvq key outliers at the configured fraction.
double PartBitsPerToken(const KvSchemeConfig& c, KvPart part, int d) {
  if (!c.quantizes(part)) return static_cast<double>(d) * kHalfBits;
  const bool key = part == KvPart::kKey;
  const double codes = static_cast<double>(d) * c.bits;
  switch (c.kind) {
    case KvSchemeKind::kFp16:
      return static_cast<double>(d) * kHalfBits;
    case KvSchemeKind::kInt:
      return codes + CeilDiv(d, c.group_size) * kHalfBits;
    case KvSchemeKind::kKivi:
      return codes + (key ? static_cast<double>(d) / c.group_size : CeilDiv(d, c.group_size)) * 2 * kHalfBits;
    case KvSchemeKind::kKvq: {
      const double outlier_bits = kHalfBits + kOutlierIndexBits;
      if (key) return codes + kOutlierCountBits + c.outlier_fraction * d * outlier_bits;
      return codes + 2 * kHalfBits + KvqValueOutliersPerToken(c, d) * outlier_bits;
    }
    case KvSchemeKind::kWkv:
      return codes + 2 * kHalfBits;
    case KvSchemeKind::kDeco: {
      const double l2 = static_cast<double>(c.deco_local_channels) * c.deco_local_channels;
      return codes + 3 * l2 * kHalfBits / c.deco_block_tokens;
    }
  }
  return 0;
}

}  // namespace

int64_t KvStreamBits(const KvSchemeConfig& c, int d, int64_t start_position, int64_t n_tokens, bool sealed,
                     int64_t key_outliers) {
  if (c.kind == KvSchemeKind::kFp16) return 2 * n_tokens * d * kHalfBits;
  const KvStreamLayout l = StreamLayout(c, start_position, n_tokens, sealed);
  const int64_t q = l.quantized();
  return l.full_precision() * 2 * d * kHalfBits + PartBits(c, KvPart::kKey, d, q, key_outliers) +
         PartBits(c, KvPart::kValue, d, q, 0);
}

double KvAsymptoticBitsPerElement(const KvSchemeConfig& c, int d) {
  return (PartBitsPerToken(c, KvPart::kKey, d) + PartBitsPerToken(c, KvPart::kValue, d)) / (2.0 * d);
}

}  // namespace kvshard
