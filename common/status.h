// Status helpers shared by every layer. Errors travel as absl::Status and are turned into a message once,
// at the edge (the CLI or the HTTP handler).
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define KV_STATUS_CONCAT_INNER(a, b) a##b
#define KV_STATUS_CONCAT(a, b) KV_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define KV_RETURN_IF_ERROR(expr)                   \
  do {                                             \
    ::absl::Status kv_status_tmp_ = (expr);        \
    if (!kv_status_tmp_.ok()) return kv_status_tmp_; \
  } while (0)

// `KV_ASSIGN_OR_RETURN(auto x, MakeX());` assigns the value of an absl::StatusOr or returns its error.
#define KV_ASSIGN_OR_RETURN(lhs, expr) \
  KV_ASSIGN_OR_RETURN_IMPL(KV_STATUS_CONCAT(kv_statusor_, __LINE__), lhs, expr)
#define KV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()

namespace kvshard {

// Debian's Abseil has its own string_view type, which absl::StrCat takes; std::string_view needs this.
inline absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Prefixes a status message with context ("loading model.gguf: ...") keeping its code.
inline absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace kvshard
