// Layout checks for the column layout and the threaded call of its kernel (see column.h).
#include "column.h"

#include <ATen/Parallel.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sf {

ColumnLinear::ColumnLinear(const at::Tensor& values, const std::optional<at::Tensor>& masks,
                           const std::optional<at::Tensor>& bases, int64_t out, int64_t in,
                           const std::optional<at::Tensor>& bias, Isa isa)
    : out_(out), in_(in), bf16_(values.scalar_type() == at::kBFloat16), kernel_(column_kernel(isa)),
      unpack_(column_unpack(isa)) {
  TORCH_CHECK(out >= 1 && in >= 1, "a weight needs at least one input and one output feature");
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16),
              "values must be a contiguous float16 or bfloat16 tensor");
  if (masks) {
    const int64_t words = (out + 63) / 64;
    TORCH_CHECK(bases.has_value(), "a bitmask column layout needs masks and bases");
    TORCH_CHECK(masks->scalar_type() == at::kLong && masks->is_contiguous() && masks->numel() == in * words,
                "masks must be contiguous int64 [", in, " * ", words, "]");
    TORCH_CHECK(bases->scalar_type() == at::kLong && bases->is_contiguous() && bases->numel() == in + 1,
                "bases must be contiguous int64 [in + 1]");
    const int64_t* b = bases->data_ptr<int64_t>();
    TORCH_CHECK(b[0] == 0 && values.numel() >= b[in] + kColumnPad, "values must hold bases[-1] + ", kColumnPad,
                " elements");
    weight_ = ColumnWeight{reinterpret_cast<const uint16_t*>(values.data_ptr()),
                           reinterpret_cast<const uint64_t*>(masks->data_ptr<int64_t>()), b};
  } else {
    TORCH_CHECK(values.numel() >= in * out + kColumnPad, "dense column values must be [in * out + ", kColumnPad, "]");
    weight_ = ColumnWeight{reinterpret_cast<const uint16_t*>(values.data_ptr()), nullptr, nullptr};
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be a contiguous float32 tensor of ", out, " values");
    bias_ = bias->data_ptr<float>();
  }
}

void ColumnLinear::run(const float* x, int64_t rows, float* y, float threshold) const {
  if (rows >= kGemmRows) return run_gemm(x, rows, y, threshold);
  constexpr int64_t kMinInputsPerThread = 16;  // below this a second thread costs more than it reads
  thread_local std::vector<int32_t> listed;
  thread_local std::vector<float> partial;  // the accumulators of every thread but the first
  listed.resize(size_t(in_));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in_;
    // branch-free: which inputs survive is a coin toss per input, so a branch here mispredicts about every other
    // time (some 20 us on a 5632-input product, while the other threads wait)
    int64_t count = 0;
    for (int64_t i = 0; i < in_; ++i) {
      listed[count] = int32_t(i);
      count += (row[i] != 0.0f) & (std::fabs(row[i]) >= threshold);
    }
    const int64_t chunks = std::clamp<int64_t>(count / kMinInputsPerThread, 1, at::get_num_threads());
    float* target = y + r * out_;
    if (bias_) {
      std::copy(bias_, bias_ + out_, target);
    } else {
      std::fill(target, target + out_, 0.0f);
    }
    partial.assign(size_t((chunks - 1) * out_), 0.0f);
    const int32_t* active = listed.data();  // named here: inside the workers `listed` would be their own
    float* others = partial.data();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        kernel_(row, active + count * c / chunks, count * (c + 1) / chunks - count * c / chunks, weight_, out_, bf16_,
                c == 0 ? target : others + (c - 1) * out_);
    });
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t j = 0; j < out_; ++j) target[j] += others[(c - 1) * out_ + j];
  }
}

at::Tensor ColumnLinear::widened() const {
  float* target = prefill_scratch(in_ * out_);
  const at::Tensor columns = at::from_blob(target, {in_, out_}, at::kFloat);
  if (unpack_) {
    at::parallel_for(0, in_, kGrain, [&](int64_t begin, int64_t end) {
      unpack_(weight_, out_, bf16_, target, begin, end);
    });
    return columns;
  }
  const auto half = bf16_ ? at::kBFloat16 : at::kHalf;
  if (weight_.masks == nullptr) {
    columns.copy_(at::from_blob(const_cast<uint16_t*>(weight_.values), {in_, out_}, half));
    return columns;
  }
  const int64_t words = (out_ + 63) / 64;
  at::Tensor bits = at::zeros({in_, words * 64}, half);  // 16-bit values in place, then widened by torch
  uint16_t* placed = reinterpret_cast<uint16_t*>(bits.data_ptr());
  at::parallel_for(0, in_, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* v = weight_.values + weight_.bases[i];
      for (int64_t word = 0; word < words; ++word)
        for (uint64_t m = weight_.masks[i * words + word]; m; m &= m - 1)
          placed[i * words * 64 + word * 64 + __builtin_ctzll(m)] = *v++;
    }
  });
  columns.copy_(bits.narrow(1, 0, out_));
  return columns;
}

void ColumnLinear::run_gemm(const float* x, int64_t rows, float* y, float threshold) const {
  at::Tensor xs = at::from_blob(const_cast<float*>(x), {rows, in_}, at::kFloat);
  if (threshold > 0) xs = at::mul(xs, at::ge(at::abs(xs), threshold));
  at::Tensor ys = at::from_blob(y, {rows, out_}, at::kFloat);
  const at::Tensor columns = widened();  // x @ W^T with W^T as stored: no transpose
  if (bias_) {
    at::addmm_out(ys, at::from_blob(const_cast<float*>(bias_), {out_}, at::kFloat), xs, columns);
  } else {
    at::mm_out(ys, xs, columns);
  }
}

}  // namespace sf
