// Layout checks (they keep a hand-made tensor from reading out of bounds; the Python layer validates the layouts
// themselves) and the threaded call of the bound kernel.
#include "linear.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <vector>

namespace sf {
namespace {

const uint16_t* raw16(const at::Tensor& values) {
  TORCH_CHECK(values.is_contiguous() && (values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16),
              "values must be a contiguous float16 or bfloat16 tensor");
  return reinterpret_cast<const uint16_t*>(values.data_ptr());
}

}  // namespace

float* prefill_scratch(int64_t count) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < size_t(count)) buffer.resize(size_t(count));
  return buffer.data();
}

Linear::Linear(Kind kind, int64_t out, int64_t in, const at::Tensor& values, const std::optional<at::Tensor>& bias)
    : kind_(kind), out_(out), in_(in), bf16_(values.scalar_type() == at::kBFloat16) {
  TORCH_CHECK(out >= 1 && in >= 1, "a weight needs at least one input and one output feature");
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "bias must be a contiguous float32 tensor of ", out, " values");
    bias_ = bias->data_ptr<float>();
  }
}

Linear Linear::dense(const at::Tensor& values, const std::optional<at::Tensor>& bias, Isa isa) {
  TORCH_CHECK(values.dim() == 2, "dense values must be [out, in]");
  Linear linear(Kind::dense, values.size(0), values.size(1), values, bias);
  linear.dense_ = DenseWeight{raw16(values)};
  linear.dense_kernel_ = dense_kernel(isa);
  linear.dense_unpack_ = dense_unpack(isa);
  return linear;
}

Linear Linear::bitmask(const at::Tensor& values, const at::Tensor& masks, const at::Tensor& offsets, int64_t in,
                       const std::optional<at::Tensor>& bias, Isa isa) {
  const int64_t chunks = (in + kWindow - 1) / kWindow, out = masks.dim() == 2 ? masks.size(0) : 0;
  TORCH_CHECK(masks.dim() == 2 && masks.size(1) == chunks && masks.scalar_type() == at::kInt && masks.is_contiguous(),
              "masks must be contiguous int32 [out, ", chunks, "]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == out + 1,
              "offsets must be contiguous int64 [out + 1]");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && values.numel() >= off[out] + kWindow, "values must hold offsets[-1] + 32 elements");
  Linear linear(Kind::bitmask, out, in, values, bias);
  linear.bitmask_ = BitmaskWeight{raw16(values), reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>()), off};
  linear.bitmask_kernel_ = bitmask_kernel(isa);
  linear.bitmask_unpack_ = bitmask_unpack(isa);
  return linear;
}

Linear Linear::nm(const at::Tensor& values, const at::Tensor& positions, int64_t pos_stride, int64_t n, int64_t m,
                  int64_t in, const std::optional<at::Tensor>& bias, Isa isa) {
  TORCH_CHECK((m == 4 || m == 8 || m == 16) && n >= 1 && n <= m && in % m == 0, "unsupported N:M geometry");
  TORCH_CHECK(values.dim() == 2 && values.size(1) == in / m * n, "values must be [out, in * n / m]");
  const int64_t out = values.size(0), bits = nm_bits(int(m));
  const int64_t stride = in / kWindow * nm_window_bytes(int(kWindow / m * n), int(bits)) +
                         nm_window_bytes(int(in % kWindow / m * n), int(bits));
  TORCH_CHECK(pos_stride == stride && positions.scalar_type() == at::kByte && positions.is_contiguous() &&
                  positions.numel() >= out * stride + 16,
              "positions must be contiguous uint8 [out * ", stride, " + 16]");
  Linear linear(Kind::nm, out, in, values, bias);
  linear.nm_ = NMWeight{raw16(values), positions.data_ptr<uint8_t>(), pos_stride, int(n), int(m)};
  linear.nm_kernel_ = nm_kernel(isa);
  linear.nm_unpack_ = nm_unpack(isa);
  return linear;
}

void Linear::run(const float* x, int64_t rows, float* y) const {
  if (rows >= kGemmRows) return run_gemm(x, rows, y);
  const Problem p{x, padded_in(), rows, y, out_, in_, bias_, bf16_};
  at::parallel_for(0, out_, kGrain, [&](int64_t begin, int64_t end) {
    switch (kind_) {
      case Kind::dense: dense_kernel_(p, dense_, begin, end); break;
      case Kind::bitmask: bitmask_kernel_(p, bitmask_, begin, end); break;
      case Kind::nm: nm_kernel_(p, nm_, begin, end); break;
    }
  });
}

void Linear::run_gemm(const float* x, int64_t rows, float* y) const {
  // Buffers of the calling thread (prefill_scratch), named before the workers: inside them a thread_local would be
  // each worker's own.
  const Problem p{x, padded_in(), rows, y, out_, in_, bias_, bf16_};
  at::Tensor weight;
  if ((kind_ == Kind::dense && dense_unpack_) || (kind_ == Kind::bitmask && bitmask_unpack_) ||
      (kind_ == Kind::nm && nm_unpack_)) {
    float* target = prefill_scratch(out_ * padded_in());
    at::parallel_for(0, out_, kGrain, [&](int64_t begin, int64_t end) {
      switch (kind_) {
        case Kind::dense: dense_unpack_(p, dense_, target, begin, end); break;
        case Kind::bitmask: bitmask_unpack_(p, bitmask_, target, begin, end); break;
        case Kind::nm: nm_unpack_(p, nm_, target, begin, end); break;
      }
    });
    weight = at::from_blob(target, {out_, in_}, {padded_in(), 1}, at::kFloat);
  } else {
    thread_local std::vector<uint16_t> bits;
    const uint16_t* source = dense_.values;
    if (kind_ != Kind::dense) {
      bits.resize(size_t(out_ * in_));
      uint16_t* target = bits.data();
      at::parallel_for(0, out_, kGrain, [&](int64_t begin, int64_t end) {
        if (kind_ == Kind::bitmask) portable::unpack(p, bitmask_, target, begin, end);
        else portable::unpack(p, nm_, target, begin, end);
      });
      source = target;
    }
    weight = at::from_blob(prefill_scratch(out_ * in_), {out_, in_}, at::kFloat);
    weight.copy_(at::from_blob(const_cast<uint16_t*>(source), {out_, in_}, bf16_ ? at::kBFloat16 : at::kHalf));
  }
  const at::Tensor xs = at::from_blob(const_cast<float*>(x), {rows, in_}, {padded_in(), 1}, at::kFloat);
  at::Tensor ys = at::from_blob(y, {rows, out_}, at::kFloat);
  if (bias_) {
    at::addmm_out(ys, at::from_blob(const_cast<float*>(bias_), {out_}, at::kFloat), xs, weight.t());
  } else {
    at::mm_out(ys, xs, weight.t());
  }
}

}  // namespace sf
