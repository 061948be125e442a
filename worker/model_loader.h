// Loads a Llama-family model into fp32 host weights (worker/model.h conventions).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/gguf.h"
#include "worker/model.h"

namespace kvshard {

// `path` is a .gguf file or a Hugging Face directory (config.json + *.safetensors, optionally with
// model.safetensors.index.json). Errors name the path and the problem, in one line.
absl::StatusOr<ModelWeights> LoadModel(const std::string& path);

// The pieces, for tests and tools.
absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& file);
absl::StatusOr<ModelWeights> LoadGgufModel(const GgufFile& file);
absl::StatusOr<ModelConfig> ModelConfigFromHfJson(const std::string& config_json_text);
absl::StatusOr<ModelWeights> LoadHfModel(const std::string& directory);

}  // namespace kvshard
