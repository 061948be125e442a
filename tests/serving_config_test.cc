// deploy/kvshard.example.yaml names every setting of the binary with its default, and the serving flags
// turn into options.
#include <unistd.h>

#include <filesystem>
#include <set>
#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "common/config.h"
#include "coordinator/serving_flags.h"
#include "gtest/gtest.h"
#include "yaml-cpp/yaml.h"

ABSL_DECLARE_FLAG(std::string, api_key);
ABSL_DECLARE_FLAG(std::string, api_key_file);

namespace kvshard {
namespace {

const std::string kExample = std::string(KVSHARD_SOURCE_DIR) + "/deploy/kvshard.example.yaml";

TEST(ExampleConfigTest, EverySettingIsDocumentedWithItsDefault) {
  const YAML::Node root = YAML::LoadFile(kExample);
  std::set<std::string> documented;
  for (const auto& item : root) documented.insert(item.first.as<std::string>());

  int checked = 0;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    const std::string file = flag->Filename();
    // The binary's own flags: those defined in the product's folders (not Abseil's, not tests').
    const bool ours = file.find("coordinator/") != std::string::npos || file.find("common/") != std::string::npos ||
                      file.find("worker/") != std::string::npos || file.find("kvstore/") != std::string::npos;
    if (!ours || name == "config") continue;
    ++checked;
    EXPECT_TRUE(documented.count(std::string(name))) << "flag --" << name << " (" << file
                                                     << ") is missing from deploy/kvshard.example.yaml";
  }
  EXPECT_GT(checked, 20);

  // Applying the file changes nothing: each value is the flag's default.
  const std::set<std::string> none;
  ASSERT_TRUE(ApplyYamlConfig(kExample, none).ok());
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (documented.count(std::string(name)) == 0) continue;
    EXPECT_EQ(flag->CurrentValue(), flag->DefaultValue()) << "--" << name << " in deploy/kvshard.example.yaml";
  }
}

TEST(ServingFlagsTest, DefaultsBindLoopback) {
  absl::StatusOr<ServeOptions> serve = ServeOptionsFromFlags();
  ASSERT_TRUE(serve.ok()) << serve.status();
  EXPECT_EQ(serve->host, "127.0.0.1");
  EXPECT_EQ(serve->metrics_host, "127.0.0.1");
  EXPECT_TRUE(serve->api_key.empty());
  EXPECT_GT(serve->max_body_bytes, 0);
  EXPECT_GT(serve->max_queue, 0);
}

TEST(ServingFlagsTest, ApiKeyFileIsRead) {
  const auto path = std::filesystem::temp_directory_path() / ("kvshard_serving_config_test_key_" + std::to_string(getpid()));
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    std::fputs("  s3cret \nsecond line ignored\n", f);
    std::fclose(f);
  }
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_api_key_file, path.string());
  absl::StatusOr<ServeOptions> serve = ServeOptionsFromFlags();
  ASSERT_TRUE(serve.ok()) << serve.status();
  EXPECT_EQ(serve->api_key, "s3cret");
  absl::SetFlag(&FLAGS_api_key, "other");
  EXPECT_FALSE(ServeOptionsFromFlags().ok());  // both given
  absl::SetFlag(&FLAGS_api_key, "");
  absl::SetFlag(&FLAGS_api_key_file, (path.string() + ".missing"));
  EXPECT_FALSE(ServeOptionsFromFlags().ok());
  std::filesystem::remove(path);
}

TEST(ServingFlagsTest, ShortBatchFlagsAreExpanded) {
  const std::vector<std::string> args = {"kvshard", "run-batch", "-i", "in.jsonl", "-o=out.jsonl", "--input-dir",
                                         "docs", "--input-dir=more", "--model", "m.gguf", "-ix"};
  const std::vector<std::string> expected = {"kvshard", "run-batch", "--batch_input", "in.jsonl",
                                             "--batch_output=out.jsonl", "--input_dir", "docs", "--input_dir=more",
                                             "--model", "m.gguf", "-ix"};
  EXPECT_EQ(ExpandServingShortFlags(args), expected);
}

}  // namespace
}  // namespace kvshard
