// The ISA choice of csrc/cpu_dispatch.h: what this CPU supports, and CURVKERN_CPU_CAPABILITY.
#include "cpu_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace curvkern {

namespace {

constexpr const char* kVariable = "CURVKERN_CPU_CAPABILITY";

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kDefault: break;
  }
  return "default";
}

// The ISAs this CPU (and its OS: libgcc checks that the vector registers' state is saved) can run,
// ascending. The same tests target_clones' resolver makes.
std::vector<CpuIsa> supported_isas() {
  std::vector<CpuIsa> isas{CpuIsa::kDefault};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) isas.push_back(CpuIsa::kAvx2);
  if (__builtin_cpu_supports("x86-64-v4")) isas.push_back(CpuIsa::kAvx512);
#endif
  return isas;
}

std::string joined_capabilities() {
  std::string names;
  for (const std::string& name : cpu_capabilities()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

CpuIsa choose_isa() {
  const std::vector<CpuIsa> supported = supported_isas();
  const char* requested = std::getenv(kVariable);
  if (requested == nullptr || *requested == '\0') return supported.back();
  for (CpuIsa isa : {CpuIsa::kDefault, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::string_view(requested) != isa_name(isa)) continue;
    for (CpuIsa available : supported) {
      if (available == isa) return isa;
    }
    TORCH_CHECK(false, kVariable, "=", requested, ": this CPU cannot run ", requested, "; it supports ",
                joined_capabilities());
  }
  TORCH_CHECK(false, kVariable, "=", requested, " is not a CPU capability; expected one of default, avx2, avx512 ",
              "(this CPU supports ", joined_capabilities(), ")");
}

}  // namespace

CpuIsa active_isa() {
  // A failed choice raises and leaves the static unset: every later call raises the same error.
  static const CpuIsa isa = choose_isa();
  return isa;
}

std::string cpu_capability() { return isa_name(active_isa()); }

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (CpuIsa isa : supported_isas()) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace curvkern
