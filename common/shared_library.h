// Libraries opened at run time with dlopen rather than linked.
//
// kvshard opens OpenBLAS and cuBLAS this way. Linked, they put about 170 KB of static thread-local storage
// into every thread of the process, more than the HTTP library's fixed 100 KB worker stacks can hold;
// opened, their TLS is allocated per thread on first use, only in the threads that call them. It also
// lets one binary run where they are not installed.
#pragma once

#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvshard {

// Opens the first of `candidates` (file names searched as the dynamic loader does, or paths) that loads.
// The library stays loaded for the life of the process. NotFound, with each candidate's error, otherwise.
absl::StatusOr<void*> OpenSharedLibrary(std::span<const std::string> candidates);

// The address of `name` in `library`, or nullptr when it is missing.
void* FindSymbol(void* library, const char* name);

// Sets `function` to `name` in `library`; NotFound naming the symbol when it is missing.
template <typename FunctionPointer>
absl::Status ResolveFunction(void* library, const char* name, FunctionPointer& function) {
  void* symbol = FindSymbol(library, name);
  if (symbol == nullptr) return absl::NotFoundError(std::string("missing symbol ") + name);
  function = reinterpret_cast<FunctionPointer>(symbol);
  return absl::OkStatus();
}

// The directory (with a trailing '/') of the loaded object that holds `address`; empty when unknown.
std::string DirectoryOfLoadedObject(const void* address);

}  // namespace kvshard
