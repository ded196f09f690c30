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

#include <cmath>
#include <vector>

namespace sf {

ColumnLinear::ColumnLinear(const at::Tensor& values, const std::optional<at::Tensor>& masks,
                           const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bases,
                           int64_t out, int64_t in, const std::optional<at::Tensor>& bias, Isa isa)
    : out_(out), in_(in), bf16_(values.scalar_type() == at::kBFloat16), kernel_(column_kernel(isa)) {
  TORCH_CHECK(out >= 1 && in >= 1, "a weight needs at least one input and one output feature");
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16),
              "values must be a contiguous float16 or bfloat16 tensor");
  const int64_t tiles = (out + kTile - 1) / kTile;
  if (masks) {
    TORCH_CHECK(offsets && bases, "a bitmask column layout needs masks, offsets and bases");
    TORCH_CHECK(masks->scalar_type() == at::kLong && masks->is_contiguous() && masks->numel() == tiles * in,
                "masks must be contiguous int64 [", tiles, " * ", in, "]");
    TORCH_CHECK(offsets->scalar_type() == at::kInt && offsets->is_contiguous() && offsets->numel() == tiles * in,
                "offsets must be contiguous int32 [", tiles, " * ", in, "]");
    TORCH_CHECK(bases->scalar_type() == at::kLong && bases->is_contiguous() && bases->numel() == tiles + 1,
                "bases must be contiguous int64 [tiles + 1]");
    const int64_t* b = bases->data_ptr<int64_t>();
    TORCH_CHECK(b[0] == 0 && values.numel() >= b[tiles] + kTile, "values must hold bases[-1] + 64 elements");
    weight_ = ColumnWeight{reinterpret_cast<const uint16_t*>(values.data_ptr()),
                           reinterpret_cast<const uint64_t*>(masks->data_ptr<int64_t>()),
                           reinterpret_cast<const uint32_t*>(offsets->data_ptr<int32_t>()), b};
  } else {
    TORCH_CHECK(values.numel() >= tiles * in * kTile + kTile, "dense column values must be [tiles * in * 64 + 64]");
    weight_ = ColumnWeight{reinterpret_cast<const uint16_t*>(values.data_ptr()), nullptr, nullptr, nullptr};
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be a contiguous float32 tensor of ", out, " values");
    bias_ = bias->data_ptr<float>();
  }
}

void ColumnLinear::run(const float* x, int64_t rows, float* y, float threshold) const {
  if (rows >= kGemmRows) return run_gemm(x, rows, y, threshold);
  thread_local std::vector<int32_t> listed;
  listed.resize(size_t(in_));
  const int64_t tiles = (out_ + kTile - 1) / kTile;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * in_;
    int64_t count = 0;
    for (int64_t i = 0; i < in_; ++i)
      if (row[i] != 0.0f && std::fabs(row[i]) >= threshold) listed[count++] = int32_t(i);
    const int32_t* active = listed.data();  // named here: inside the workers `listed` would be their own
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      kernel_(row, active, count, weight_, in_, out_, bias_, bf16_, y + r * out_, begin, end);
    });
  }
}

at::Tensor ColumnLinear::dense_weight() const {
  const int64_t tiles = (out_ + kTile - 1) / kTile;
  const auto half = bf16_ ? at::kBFloat16 : at::kHalf;
  at::Tensor columns;  // [tiles, in, 64] 16-bit values, pruned ones zero
  if (weight_.masks == nullptr) {
    columns = at::from_blob(const_cast<uint16_t*>(weight_.values), {tiles, in_, kTile}, half);
  } else {
    columns = at::zeros({tiles, in_, kTile}, half);
    uint16_t* target = reinterpret_cast<uint16_t*>(columns.data_ptr());
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t i = 0; i < in_; ++i) {
          const uint16_t* v = weight_.values + weight_.bases[t] + weight_.offsets[t * in_ + i];
          uint16_t* slot = target + (t * in_ + i) * kTile;
          for (uint64_t m = weight_.masks[t * in_ + i]; m; m &= m - 1) slot[__builtin_ctzll(m)] = *v++;
        }
    });
  }
  return columns.permute({0, 2, 1}).reshape({tiles * kTile, in_}).narrow(0, 0, out_).to(at::kFloat);
}

void ColumnLinear::run_gemm(const float* x, int64_t rows, float* y, float threshold) const {
  at::Tensor xs = at::from_blob(const_cast<float*>(x), {rows, in_}, at::kFloat);
  if (threshold > 0) xs = at::mul(xs, at::ge(at::abs(xs), threshold));
  at::Tensor ys = at::from_blob(y, {rows, out_}, at::kFloat);
  const at::Tensor weight = dense_weight();
  if (bias_) {
    at::addmm_out(ys, at::from_blob(const_cast<float*>(bias_), {out_}, at::kFloat), xs, weight.t());
  } else {
    at::mm_out(ys, xs, weight.t());
  }
}

}  // namespace sf
