// Which instruction sets this build and this CPU offer, and the kernel of each layout for one of them.
#include "dispatch.h"

#include <c10/util/Exception.h>

namespace sf {
namespace {

constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_vbmi2"};

bool cpu_has(Isa isa) {
#ifdef SF_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::portable: return true;
    case Isa::avx2: return avx2;
    case Isa::avx512: return avx512;
    case Isa::avx512_vbmi2: return avx512 && __builtin_cpu_supports("avx512vbmi2");
  }
  return false;
#else
  return isa == Isa::portable;
#endif
}

bool compiled(Isa isa) {
#ifdef SF_X86
  (void)isa;
  return true;
#else
  return isa == Isa::portable;
#endif
}

std::vector<std::string> isa_names(bool (*keep)(Isa)) {
  std::vector<std::string> names;
  for (int i = 0; i < 4; ++i)
    if (keep(static_cast<Isa>(i))) names.emplace_back(kIsaNames[i]);
  return names;
}

}  // namespace

Isa parse_isa(const std::string& name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kIsaNames[i]) {
      const Isa isa = static_cast<Isa>(i);
      TORCH_CHECK(compiled(isa) && cpu_has(isa), "instruction set '", name, "' is not available here");
      return isa;
    }
  }
  TORCH_CHECK(false, "unknown instruction set '", name, "'");
}

std::vector<std::string> cpu_isa_names() { return isa_names(cpu_has); }
std::vector<std::string> compiled_isa_names() { return isa_names(compiled); }

DenseKernel dense_kernel(Isa isa) {
#ifdef SF_X86
  switch (isa) {
    case Isa::portable: break;
    case Isa::avx2: return avx2::dense;
    case Isa::avx512:
    case Isa::avx512_vbmi2: return avx512::dense;
  }
#endif
  (void)isa;
  return portable::dense;
}

DenseUnpack dense_unpack(Isa isa) {
#ifdef SF_X86
  if (isa == Isa::avx2) return avx2::unpack;
  if (isa == Isa::avx512 || isa == Isa::avx512_vbmi2) return avx512::unpack;
#endif
  (void)isa;
  return nullptr;
}

// every vectorised instruction set has one; the overload is the one the return type names
template <class Unpack>
Unpack expanding_unpack(Isa isa) {
#ifdef SF_X86
  if (isa == Isa::avx2) return avx2::unpack;
  if (isa == Isa::avx512) return avx512::unpack;
  if (isa == Isa::avx512_vbmi2) return avx512_vbmi2::unpack;
#endif
  (void)isa;
  return nullptr;
}

BitmaskUnpack bitmask_unpack(Isa isa) { return expanding_unpack<BitmaskUnpack>(isa); }
NMUnpack nm_unpack(Isa isa) { return expanding_unpack<NMUnpack>(isa); }
ColumnUnpack column_unpack(Isa isa) { return expanding_unpack<ColumnUnpack>(isa); }

ColumnKernel column_kernel(Isa isa) {
#ifdef SF_X86
  if (isa == Isa::avx2) return avx2::column;
  if (isa == Isa::avx512) return avx512::column;
  if (isa == Isa::avx512_vbmi2) return avx512_vbmi2::column;
#endif
  (void)isa;
  return portable::column;
}

BitmaskKernel bitmask_kernel(Isa isa) {
#ifdef SF_X86
  switch (isa) {
    case Isa::portable: break;
    case Isa::avx2: return avx2::bitmask;
    case Isa::avx512: return avx512::bitmask;
    case Isa::avx512_vbmi2: return avx512_vbmi2::bitmask;
  }
#endif
  (void)isa;
  return portable::bitmask;
}

NMKernel nm_kernel(Isa isa) {
#ifdef SF_X86
  switch (isa) {
    case Isa::portable: break;
    case Isa::avx2: return avx2::nm;
    case Isa::avx512:
    case Isa::avx512_vbmi2: return avx512::nm;
  }
#endif
  (void)isa;
  return portable::nm;
}

}  // namespace sf
