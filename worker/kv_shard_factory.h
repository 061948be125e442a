// Makes the KV shard of one request on one worker for a scheme name ("fp16", "kvq3", ...). The
// single-process engine and every worker of the distributed runtime create their shards through one of
// these, so a new scheme plugs in by handing the engine a factory that knows it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvstore/kv_shard.h"
#include "worker/model.h"

namespace kvshard {

// `start_position` is the absolute position of the shard's first token.
using KvShardFactory = std::function<absl::StatusOr<std::unique_ptr<KvShard>>(
    const std::string& scheme, const KvGeometry& geometry, int64_t start_position)>;

// The factory of the unquantized schemes only ("fp32", "fp16").
KvShardFactory FullPrecisionKvShardFactory();

// The factory of every scheme this build knows: what the engines and workers use unless told otherwise.
KvShardFactory DefaultKvShardFactory();

// Makes a factory from the job's KV settings: the calibration file of the calibrated schemes (empty:
// none), checked against `weights` when given (the coordinator of a distributed job holds none).
// Workers get their settings from the coordinator at run time and make their factory with the maker
// their main() hands them, so they know every scheme the binary does.
using KvShardFactoryMaker = std::function<absl::StatusOr<KvShardFactory>(const std::string& calibration_path,
                                                                         const ModelWeights* weights)>;

// DefaultKvShardFactory(); refuses a calibration file.
KvShardFactoryMaker DefaultKvShardFactoryMaker();

}  // namespace kvshard
