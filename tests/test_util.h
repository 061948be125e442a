// Helpers shared by the tests: where the demo model and texts are, and tolerance checks that print the
// first mismatches.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvshard::testing {

// The demo model: $KVSHARD_MODEL, else the cache the fetch script writes. Empty when missing.
inline std::string DemoModelPath() {
  if (const char* env = std::getenv("KVSHARD_MODEL"); env && *env) return env;
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  std::filesystem::path cache = xdg && *xdg ? std::filesystem::path(xdg)
                                : std::filesystem::path(home ? home : ".") / ".cache";
  auto path = cache / "kvshard" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  return std::filesystem::exists(path) ? path.string() : "";
}

// The shared texts: $KVSHARD_TEXTS, else ../shared/data/texts beside the source tree. Empty when missing.
inline std::string TextsDir() {
  if (const char* env = std::getenv("KVSHARD_TEXTS"); env && *env) return env;
  auto path = std::filesystem::path(KVSHARD_SOURCE_DIR) / ".." / "shared" / "data" / "texts";
  return std::filesystem::exists(path) ? std::filesystem::canonical(path).string() : "";
}

#define KVSHARD_REQUIRE_DEMO_MODEL(var)                                                             \
  const std::string var = ::kvshard::testing::DemoModelPath();                                      \
  if (var.empty()) {                                                                                \
    GTEST_SKIP() << "demo model not found: run deploy/fetch-demo-model.sh or set KVSHARD_MODEL";    \
  }

// Counts elements with |a - ref| > atol + rtol * |ref| (NaN always fails), printing the first few.
inline int64_t CountMismatches(const float* actual, const double* ref, int64_t n, double atol, double rtol,
                               const std::string& label, int max_print = 8) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double a = actual[i];
    const double r = ref[i];
    const bool ok = std::isfinite(a) == std::isfinite(r) &&
                    (std::isinf(r) ? a == r : std::abs(a - r) <= atol + rtol * std::abs(r));
    if (!ok) {
      if (bad < max_print) {
        std::fprintf(stderr, "  %s[%lld]: got %.9g want %.9g (|diff| %.3g)\n", label.c_str(),
                     static_cast<long long>(i), a, r, std::abs(a - r));
      }
      ++bad;
    }
  }
  return bad;
}

inline int64_t CountMismatches(const std::vector<float>& actual, const std::vector<double>& ref, double atol,
                               double rtol, const std::string& label) {
  EXPECT_EQ(actual.size(), ref.size());
  return CountMismatches(actual.data(), ref.data(), static_cast<int64_t>(std::min(actual.size(), ref.size())),
                         atol, rtol, label);
}

// ||got - want|| / ||want|| over want's size, in double (logits against a reference).
inline double RelativeL2(const float* got, const std::vector<float>& want) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    ref += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff / std::max(ref, 1e-30));
}

// A fresh, empty directory under the test temp dir, private to this process (ctest runs tests in parallel)
// and removed when the process exits, so repeated runs leave nothing behind.
inline std::string FreshTempDir(const std::string& name) {
  struct Root {
    std::filesystem::path path =
        std::filesystem::path(::testing::TempDir()) / ("kvshard_test_" + std::to_string(::getpid()));
    ~Root() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static Root root;
  const std::filesystem::path dir = root.path / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

}  // namespace kvshard::testing
