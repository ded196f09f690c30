// Torch-facing driver for one product per call, registered as torch operators: binds the weight to the kernel of
// the requested instruction set (linear.cpp checks the tensors) and runs it on x. The caller pads x to a multiple
// of 32 inputs and allocates y, which keeps this file on the light torch headers (a fast first build).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "column.h"
#include "dispatch.h"
#include "linear.h"

namespace sf {
namespace {

void run_checked(const Linear& linear, const at::Tensor& x, const at::Tensor& y) {
  const int64_t ldx = linear.padded_in();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == ldx,
              "x must be contiguous float32 [rows, ", ldx, "], zero-padded past ", linear.in(), " inputs");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.size(0) == x.size(0) &&
                  y.size(1) == linear.out(),
              "y must be contiguous float32 [rows, ", linear.out(), "]");
  linear.run(x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
}

void dense_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values,
                  const std::optional<at::Tensor>& bias, const std::string& isa) {
  run_checked(Linear::dense(values, bias, parse_isa(isa)), x, y);
}

void bitmask_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values, const at::Tensor& masks,
                    const at::Tensor& offsets, int64_t in, const std::optional<at::Tensor>& bias,
                    const std::string& isa) {
  run_checked(Linear::bitmask(values, masks, offsets, in, bias, parse_isa(isa)), x, y);
}

void nm_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values, const at::Tensor& positions,
               int64_t pos_stride, int64_t n, int64_t m, int64_t in, const std::optional<at::Tensor>& bias,
               const std::string& isa) {
  run_checked(Linear::nm(values, positions, pos_stride, n, m, in, bias, parse_isa(isa)), x, y);
}

void column_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& values,
                   const std::optional<at::Tensor>& masks, const std::optional<at::Tensor>& bases, int64_t out, int64_t in, double threshold,
                   const std::optional<at::Tensor>& bias, const std::string& isa) {
  const ColumnLinear linear(values, masks, bases, out, in, bias, parse_isa(isa));
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == in,
              "x must be contiguous float32 [rows, ", in, "]");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.size(0) == x.size(0) &&
                  y.size(1) == out,
              "y must be contiguous float32 [rows, ", out, "]");
  TORCH_CHECK(threshold >= 0, "the threshold must be at least 0");
  linear.run(x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), float(threshold));
}

}  // namespace
}  // namespace sf

TORCH_LIBRARY(TORCH_EXTENSION_NAME, lib) {
  lib.def("cpu_isas() -> str[]", &sf::cpu_isa_names);
  lib.def("compiled_isas() -> str[]", &sf::compiled_isa_names);
  lib.def("dense_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor? bias, str isa) -> ()", &sf::dense_matmul);
  lib.def("bitmask_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor masks, Tensor offsets, int in_features, "
          "Tensor? bias, str isa) -> ()",
          &sf::bitmask_matmul);
  lib.def("nm_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor positions, int pos_stride, int n, int m, "
          "int in_features, Tensor? bias, str isa) -> ()",
          &sf::nm_matmul);
  lib.def("column_matmul(Tensor x, Tensor(a!) y, Tensor values, Tensor? masks, Tensor? bases, "
          "int out_features, int in_features, float threshold, Tensor? bias, str isa) -> ()",
          &sf::column_matmul);
}
