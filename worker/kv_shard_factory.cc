#include "worker/kv_shard_factory.h"

#include "absl/strings/str_cat.h"

namespace kvshard {

KvShardFactory FullPrecisionKvShardFactory() {
  return [](const std::string& scheme, const KvGeometry& geometry,
            int64_t start) -> absl::StatusOr<std::unique_ptr<KvShard>> {
    if (scheme == "fp32") return MakeFullPrecisionKvShard(geometry, start, FullPrecision::kFp32);
    if (scheme == "fp16") return MakeFullPrecisionKvShard(geometry, start, FullPrecision::kFp16);
    return absl::InvalidArgumentError(absl::StrCat("unknown KV scheme '", scheme, "'"));
  };
}

KvShardFactory DefaultKvShardFactory() { return FullPrecisionKvShardFactory(); }

KvShardFactoryMaker DefaultKvShardFactoryMaker() {
  return [](const std::string& calibration_path, const ModelWeights*) -> absl::StatusOr<KvShardFactory> {
    if (!calibration_path.empty()) {
      return absl::InvalidArgumentError("this build has no calibrated KV schemes to use a calibration file with");
    }
    return DefaultKvShardFactory();
  };
}

}  // namespace kvshard
