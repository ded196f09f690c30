// Layout checks for the column layout and the threaded call of its kernel (see column.h).
#include "column.h"

#include <ATen/Parallel.h>

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

}  // namespace sf
