// Settings: every command-line flag (Abseil flags) can also be set in a YAML file given by --config.
// A flag given on the command line wins over the file. Keys are flag names; a nested map is flattened
// with '_' ("kv: {scheme: kvq3}" sets --kv_scheme); a list becomes a comma-separated value.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvshard {

// Names of the flags written on this command line ("--x=1", "--x 1", "--nox").
std::set<std::string> FlagsOnCommandLine(int argc, char** argv);

// Applies the YAML file at `path` to the registered flags, skipping those in `skip`.
// Unknown keys and values a flag cannot parse are errors that name the file and key.
absl::Status ApplyYamlConfig(const std::string& path, const std::set<std::string>& skip);

// Parses flags (Abseil prints usage and exits on malformed flags), then applies --config if given.
// Returns the positional arguments, argv[0] first.
absl::StatusOr<std::vector<std::string>> ParseFlagsAndConfig(int argc, char** argv, const std::string& usage);

// Whether flag `name` was written on the command line that ParseFlagsAndConfig parsed (not set by the
// config file, which holds settings of every command).
bool GivenOnCommandLine(const std::string& name);

}  // namespace kvshard
