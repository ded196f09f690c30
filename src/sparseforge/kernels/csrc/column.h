// A checked weight in the column layout (kernels.h) bound to a column kernel: the product for activation sparsity,
// which skips the weights of the inputs it is not given. The tensors belong to the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "dispatch.h"
#include "kernels.h"
#include "linear.h"

namespace sf {

class ColumnLinear {
 public:
  // masks and bases absent: the dense column layout
  ColumnLinear(const at::Tensor& values, const std::optional<at::Tensor>& masks,
               const std::optional<at::Tensor>& bases, int64_t out, int64_t in, const std::optional<at::Tensor>& bias,
               Isa isa);

  // y[rows, out] = x'[rows, in] W^T (+ bias), x' = x with the entries of magnitude below `threshold` zeroed (zero:
  // none). x has row stride `in`. Per row, the inputs left nonzero are listed once and split between the threads,
  // each adding whole weight rows into an accumulator of its own (long contiguous reads; splitting the outputs
  // instead cut the rows short and lost a fifth of the bandwidth on narrow products); the accumulators are summed
  // after. From kGemmRows rows on (prefill), the weight is decoded once and the product goes to torch's GEMM, as
  // for the row layouts.
  void run(const float* x, int64_t rows, float* y, float threshold) const;
  int64_t out() const { return out_; }
  int64_t in() const { return in_; }
  int64_t padded_in() const { return in_; }  // the row layouts' scratch sizing, for drivers that hold both

 private:
  void run_gemm(const float* x, int64_t rows, float* y, float threshold) const;
  // W^T as float32 [in, out], pruned weights zero, in the calling thread's prefill_scratch
  at::Tensor widened() const;
  ColumnWeight weight_{};
  int64_t out_, in_;
  const float* bias_ = nullptr;
  bool bf16_;
  ColumnKernel kernel_;
  ColumnUnpack unpack_;
};

}  // namespace sf
