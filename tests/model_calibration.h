// A kvq3 calibration of a test model from its own K/V, shared by the tests that compare a GPU's kvq3
// against the CPU's.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "coordinator/quality.h"
#include "gtest/gtest.h"
#include "kvstore/calibration.h"
#include "worker/forward.h"
#include "worker/model.h"

namespace kvshard::testing {

// Over 512 tokens the tests never feed (ids (211 i + 5) mod the vocabulary), 128-token windows, 1% outliers.
inline std::shared_ptr<const Calibration> ModelKvq3Calibration(const ModelWeights& weights) {
  CpuModel model(weights);
  CalibrateOptions options;
  options.ctx = 128;
  options.max_tokens = 512;
  options.outlier_fractions = {0.01};
  options.codebook_bits = {3};
  options.show_progress = false;
  std::vector<int32_t> tokens(512);
  for (int i = 0; i < 512; ++i) tokens[i] = static_cast<int32_t>((i * 211 + 5) % weights.config.vocab_size);
  auto calibration = CalibrateKv(model, ModelIdentityOf(weights), tokens, options);
  EXPECT_TRUE(calibration.ok()) << calibration.status();
  return calibration.ok() ? std::make_shared<const Calibration>(std::move(*calibration)) : nullptr;
}

}  // namespace kvshard::testing
