// A "1" / "0" switch read by a C++ launcher (the README's run-time switch table marks them):
// unset or empty is the default, anything else is refused naming the switch. First-character
// and `!= "0"` tests read DCGEN_QK_NORM_ROPE_VEC=false and DCGEN_ATTENTION_PINGPONG=off as on.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace dcgen {

inline bool env_switch(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  if (std::strcmp(value, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(value, "0") == 0, name, ": expected 1 or 0, got '", value, "'");
  return false;
}

}  // namespace dcgen
