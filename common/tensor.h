// A dense row-major fp32 host tensor. Weights are dequantized into these at load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvshard {

struct HostTensor {
  std::vector<int64_t> shape;  // outermost first; a Linear weight is [out_features, in_features]
  std::vector<float> data;

  bool empty() const { return data.empty(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return shape.empty() ? 0 : n;
  }
  int64_t dim(int i) const { return shape[i]; }
};

}  // namespace kvshard
