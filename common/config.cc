#include "common/config.h"

#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "yaml-cpp/yaml.h"

ABSL_FLAG(std::string, config, "", "YAML file of settings; every flag can be set there by name");

namespace kvshard {

std::set<std::string> FlagsOnCommandLine(int argc, char** argv) {
  std::set<std::string> names;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.rfind("--", 0) != 0 && arg.rfind("-", 0) != 0) continue;
    arg = arg.substr(arg.rfind("--", 0) == 0 ? 2 : 1);
    const size_t eq = arg.find('=');
    std::string name = arg.substr(0, eq);
    names.insert(name);
    if (name.rfind("no", 0) == 0) names.insert(name.substr(2));
  }
  return names;
}

namespace {

absl::Status ApplyNode(const YAML::Node& node, const std::string& prefix, const std::string& path,
                       const std::set<std::string>& skip) {
  for (const auto& item : node) {
    const std::string key = prefix.empty() ? item.first.as<std::string>()
                                           : absl::StrCat(prefix, "_", item.first.as<std::string>());
    const YAML::Node& value = item.second;
    if (value.IsMap()) {
      KV_RETURN_IF_ERROR(ApplyNode(value, key, path, skip));
      continue;
    }
    if (key == "config") return absl::InvalidArgumentError(absl::StrCat(path, ": 'config' cannot be nested"));
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(key);
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": unknown setting '", key, "'"));
    }
    if (skip.count(key)) continue;
    std::string text;
    if (value.IsSequence()) {
      std::vector<std::string> parts;
      for (const auto& element : value) parts.push_back(element.as<std::string>());
      text = absl::StrJoin(parts, ",");
    } else if (value.IsNull()) {
      text = "";
    } else {
      text = value.as<std::string>();
    }
    std::string error;
    if (!flag->ParseFrom(text, &error)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad value '", text, "' for '", key, "': ", error));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ApplyYamlConfig(const std::string& path, const std::set<std::string>& skip) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
  YAML::Node root;
  try {
    root = YAML::Load(in);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  if (root.IsNull()) return absl::OkStatus();
  if (!root.IsMap()) return absl::InvalidArgumentError(absl::StrCat(path, ": expected a map of settings"));
  try {
    return ApplyNode(root, "", path, skip);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
}

namespace {
std::set<std::string>& CommandLineFlagNames() {
  static std::set<std::string> names;
  return names;
}
}  // namespace

bool GivenOnCommandLine(const std::string& name) { return CommandLineFlagNames().count(name) > 0; }

absl::StatusOr<std::vector<std::string>> ParseFlagsAndConfig(int argc, char** argv, const std::string& usage) {
  absl::SetProgramUsageMessage(usage);
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  CommandLineFlagNames() = FlagsOnCommandLine(argc, argv);
  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (!config_path.empty()) {
    KV_RETURN_IF_ERROR(ApplyYamlConfig(config_path, CommandLineFlagNames()));
  }
  return std::vector<std::string>(positional.begin(), positional.end());
}

}  // namespace kvshard
