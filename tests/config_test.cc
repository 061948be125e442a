// YAML settings apply to flags; the command line wins; bad files and keys are clear errors.
#include <filesystem>
#include <fstream>

#include "absl/flags/flag.h"
#include "common/config.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

ABSL_FLAG(int, test_int_setting, 1, "test");
ABSL_FLAG(std::string, test_kv_scheme, "fp16", "test: a nested YAML key");
ABSL_FLAG(std::vector<std::string>, test_list, {}, "test");

namespace kvshard {
namespace {

std::string WriteFile(const std::string& name, const std::string& text) {
  static const std::filesystem::path dir = testing::FreshTempDir("config");
  auto path = dir / name;
  std::ofstream(path) << text;
  return path.string();
}

TEST(ConfigTest, YamlSetsFlagsIncludingNestedAndLists) {
  const std::string path = WriteFile("kvshard_config_ok.yaml", "test_int_setting: 7\ntest:\n  kv_scheme: kvq3\ntest_list: [a, b]\n");
  ASSERT_TRUE(ApplyYamlConfig(path, {}).ok());
  EXPECT_EQ(absl::GetFlag(FLAGS_test_int_setting), 7);
  EXPECT_EQ(absl::GetFlag(FLAGS_test_kv_scheme), "kvq3");
  EXPECT_EQ(absl::GetFlag(FLAGS_test_list), (std::vector<std::string>{"a", "b"}));
}

TEST(ConfigTest, CommandLineWins) {
  absl::SetFlag(&FLAGS_test_int_setting, 3);
  const std::string path = WriteFile("kvshard_config_skip.yaml", "test_int_setting: 9\n");
  char arg0[] = "kvshard", arg1[] = "--test_int_setting=3";
  char* argv[] = {arg0, arg1};
  ASSERT_TRUE(ApplyYamlConfig(path, FlagsOnCommandLine(2, argv)).ok());
  EXPECT_EQ(absl::GetFlag(FLAGS_test_int_setting), 3);
}

TEST(ConfigTest, UnknownKeyIsAnErrorNamingIt) {
  const std::string path = WriteFile("kvshard_config_unknown.yaml", "no_such_setting: 1\n");
  const absl::Status status = ApplyYamlConfig(path, {});
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("no_such_setting"), std::string::npos) << status;
}

TEST(ConfigTest, BadValueAndBadYamlAndMissingFile) {
  EXPECT_FALSE(ApplyYamlConfig(WriteFile("kvshard_config_bad.yaml", "test_int_setting: seven\n"), {}).ok());
  EXPECT_FALSE(ApplyYamlConfig(WriteFile("kvshard_config_broken.yaml", "a: [1, 2\n"), {}).ok());
  EXPECT_EQ(ApplyYamlConfig("/nonexistent/kvshard.yaml", {}).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvshard
