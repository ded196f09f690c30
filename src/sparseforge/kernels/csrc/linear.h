// A checked weight in one of the kernel layouts, bound to the kernel of one instruction set: what both drivers
// (ops.cpp, one product per call; decode.cpp, a whole decode step per call) run. The tensors behind the pointers
// belong to the caller, who keeps them alive as long as the Linear.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "dispatch.h"
#include "kernels.h"

namespace sf {

// From this many rows of x on, one decode of the weight and torch's GEMM beat the kernels (measured break-even on
// the default model's and a 7B's shapes: about 50-100 rows; docs/kernels.md).
constexpr int64_t kGemmRows = 64;

// The calling thread's float32 buffer of at least `count` values for a weight decoded once (prefill), shared by
// every layout (Linear, ColumnLinear) and reused across calls: a fresh tensor of tens of MB per call would be mapped
// and page-faulted afresh, and a buffer per layout would hold on to the largest decoded weight of each.
float* prefill_scratch(int64_t count);

class Linear {
 public:
  static Linear dense(const at::Tensor& values, const std::optional<at::Tensor>& bias, Isa isa);
  static Linear bitmask(const at::Tensor& values, const at::Tensor& masks, const at::Tensor& offsets, int64_t in,
                        const std::optional<at::Tensor>& bias, Isa isa);
  static Linear nm(const at::Tensor& values, const at::Tensor& positions, int64_t pos_stride, int64_t n, int64_t m,
                   int64_t in, const std::optional<at::Tensor>& bias, Isa isa);

  // y[rows, out] = x[rows, in] W^T (+ bias); x has row stride padded_in() and zeros past in. Output features are
  // split over torch's intra-op threads. From kGemmRows rows of x on, the weight is decoded once to float32 and
  // multiplied by torch's GEMM: the kernels decode each weight once per 4 rows, and prefill-sized x makes the
  // product compute-bound, where a blocked GEMM is the better tool.
  void run(const float* x, int64_t rows, float* y) const;
  int64_t out() const { return out_; }
  int64_t in() const { return in_; }
  int64_t padded_in() const { return (in_ + kWindow - 1) / kWindow * kWindow; }

 private:
  enum class Kind { dense, bitmask, nm };
  Linear(Kind kind, int64_t out, int64_t in, const at::Tensor& values, const std::optional<at::Tensor>& bias);
  void run_gemm(const float* x, int64_t rows, float* y) const;

  Kind kind_;
  int64_t out_, in_;
  const float* bias_ = nullptr;
  bool bf16_;
  DenseWeight dense_{};
  BitmaskWeight bitmask_{};
  NMWeight nm_{};
  DenseKernel dense_kernel_ = nullptr;
  BitmaskKernel bitmask_kernel_ = nullptr;
  NMKernel nm_kernel_ = nullptr;
  DenseUnpack dense_unpack_ = nullptr;
  BitmaskUnpack bitmask_unpack_ = nullptr;
  NMUnpack nm_unpack_ = nullptr;
};

}  // namespace sf
