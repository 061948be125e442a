#include "common/shared_library.h"

#include <dlfcn.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvshard {

absl::StatusOr<void*> OpenSharedLibrary(std::span<const std::string> candidates) {
  std::vector<std::string> errors;
  for (const std::string& candidate : candidates) {
    if (void* library = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL); library != nullptr) return library;
    const char* error = dlerror();
    errors.push_back(error != nullptr ? error : candidate);
  }
  return absl::NotFoundError(absl::StrCat("cannot open ", absl::StrJoin(errors, "; ")));
}

void* FindSymbol(void* library, const char* name) { return dlsym(library, name); }

std::string DirectoryOfLoadedObject(const void* address) {
  Dl_info info;
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  const std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

}  // namespace kvshard
