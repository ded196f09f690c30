// Torch-facing driver, registered as torch operators: checks the tensors it is handed (the Python layer validates
// the layouts; these checks keep a hand-made tensor from reading out of bounds), splits output features over
// torch's intra-op threads and calls the kernel of the requested instruction set. The caller pads x to a multiple
// of 32 inputs and allocates y, which keeps this file on the light torch headers (a fast first build).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "kernels.h"

namespace sf {
namespace {

enum class Isa { portable, avx2, avx512, avx512_vbmi2 };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_vbmi2"};
constexpr int64_t kGrain = 16;  // fewer output features than this run on one thread

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
  return true;
#else
  return isa == Isa::portable;
#endif
}

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

std::vector<std::string> isa_names(bool (*keep)(Isa)) {
  std::vector<std::string> names;
  for (int i = 0; i < 4; ++i)
    if (keep(static_cast<Isa>(i))) names.emplace_back(kIsaNames[i]);
  return names;
}

const uint16_t* raw16(const at::Tensor& values) {
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16),
              "values must be a contiguous float16 or bfloat16 tensor");
  return reinterpret_cast<const uint16_t*>(values.data_ptr());
}

template <class Weight, class Kernel>
void launch(const at::Tensor& x, const at::Tensor& y, int64_t in, const std::optional<at::Tensor>& bias,
            const at::Tensor& values, const Weight& w, Kernel kernel) {
  const int64_t ldx = (in + kWindow - 1) / kWindow * kWindow;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == ldx,
              "x must be contiguous float32 [rows, ", ldx, "], zero-padded past ", in, " inputs");
  const int64_t out = y.size(1);
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.size(0) == x.size(0),
              "y must be contiguous float32 [rows, out]");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be a contiguous float32 tensor of ", out, " values");
    b = bias->data_ptr<float>();
  }
  const Problem p{x.data_ptr<float>(), ldx, x.size(0), y.data_ptr<float>(), out, in, b,
                  values.scalar_type() == at::kBFloat16};
  at::parallel_for(0, out, kGrain, [&](int64_t begin, int64_t end) { kernel(p, w, begin, end); });
}

void dense_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias, const std::string& isa) {
  TORCH_CHECK(values.dim() == 2 && values.size(0) == y.size(1), "dense values must be [out, in]");
  const DenseWeight w{raw16(values)};
  DenseKernel kernel = portable::dense;
#ifdef SF_X86
  switch (parse_isa(isa)) {
    case Isa::portable: break;
    case Isa::avx2: kernel = avx2::dense; break;
    case Isa::avx512:
    case Isa::avx512_vbmi2: kernel = avx512::dense; break;
  }
#else
  parse_isa(isa);
#endif
  launch(x, y, values.size(1), bias, values, w, kernel);
}

void bitmask_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values, const at::Tensor& masks,
                    const at::Tensor& offsets, int64_t in, const std::optional<at::Tensor>& bias,
                    const std::string& isa) {
  const int64_t chunks = (in + kWindow - 1) / kWindow, out = y.size(1);
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == out && masks.size(1) == chunks &&
                  masks.scalar_type() == at::kInt && masks.is_contiguous(),
              "masks must be contiguous int32 [out, ", chunks, "]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == out + 1,
              "offsets must be contiguous int64 [out + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && values.numel() >= off[out] + kWindow, "values must hold offsets[-1] + 32 elements");
  const BitmaskWeight w{raw16(values), reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>()), off};
  BitmaskKernel kernel = portable::bitmask;
#ifdef SF_X86
  switch (parse_isa(isa)) {
    case Isa::portable: break;
    case Isa::avx2: kernel = avx2::bitmask; break;
    case Isa::avx512: kernel = avx512::bitmask; break;
    case Isa::avx512_vbmi2: kernel = avx512_vbmi2::bitmask; break;
  }
#else
  parse_isa(isa);
#endif
  launch(x, y, in, bias, values, w, kernel);
}

void nm_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values, const at::Tensor& positions,
               int64_t pos_stride, int64_t n, int64_t m, int64_t in, const std::optional<at::Tensor>& bias,
               const std::string& isa) {
  TORCH_CHECK((m == 4 || m == 8 || m == 16) && n >= 1 && n <= m && in % m == 0, "unsupported N:M geometry");
  const int64_t out = y.size(1), bits = nm_bits(int(m));
  TORCH_CHECK(values.dim() == 2 && values.size(0) == out && values.size(1) == in / m * n,
              "values must be [out, in * n / m]");
  const int64_t stride = in / kWindow * nm_window_bytes(int(kWindow / m * n), int(bits)) +
                         nm_window_bytes(int(in % kWindow / m * n), int(bits));
  TORCH_CHECK(pos_stride == stride && positions.scalar_type() == at::kByte && positions.is_contiguous() &&
                  positions.numel() >= out * stride + 16,
              "positions must be contiguous uint8 [out * ", stride, " + 16]");
  const NMWeight w{raw16(values), positions.data_ptr<uint8_t>(), pos_stride, int(n), int(m)};
  NMKernel kernel = portable::nm;
#ifdef SF_X86
  switch (parse_isa(isa)) {
    case Isa::portable: break;
    case Isa::avx2: kernel = avx2::nm; break;
    case Isa::avx512:
    case Isa::avx512_vbmi2: kernel = avx512::nm; break;
  }
#else
  parse_isa(isa);
#endif
  launch(x, y, in, bias, values, w, kernel);
}

std::vector<std::string> cpu_isas() { return isa_names(cpu_has); }
std::vector<std::string> compiled_isas() { return isa_names(compiled); }

}  // namespace
}  // namespace sf

TORCH_LIBRARY(TORCH_EXTENSION_NAME, lib) {
  lib.def("cpu_isas() -> str[]", &sf::cpu_isas);
  lib.def("compiled_isas() -> str[]", &sf::compiled_isas);
  lib.def("dense_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor? bias, str isa) -> ()", &sf::dense_matmul);
  lib.def("bitmask_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor masks, Tensor offsets, int in_features, "
          "Tensor? bias, str isa) -> ()",
          &sf::bitmask_matmul);
  lib.def("nm_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor positions, int pos_stride, int n, int m, "
          "int in_features, Tensor? bias, str isa) -> ()",
          &sf::nm_matmul);
}
