// A whole batch-1 decode step of a Llama-style decoder (all layers, one new token) in one native call.
//
// On a small model most of a token's time in Python is not reading weights: every layer's dozen operators each
// pay Python's call and torch's dispatch, and every product pays padding and allocation. Here the step runs as
// one loop over the layers, with the same operations as transformers' decoder layer (RMSNorm, fused q/k/v product,
// rotary embedding, attention over the cached keys and values with grouped heads, output projection, RMSNorm,
// fused gate/up product, SiLU gate, down projection, residuals), activations in float32, scratch buffers
// allocated once and the products run by the kernels of linear.cpp. The key/value cache is held here, one
// [kv_heads, capacity, head_dim] float32 buffer per layer and kind, returned to Python as tensors sharing the
// memory, so that the model's own cache can view it.
//
// Decoders live in a registry keyed by an integer handle (decoder_new / decoder_free), which keeps the operator
// schema to plain types and the per-token call to five arguments.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "column.h"
#include "dispatch.h"
#include "linear.h"
#include "step_ops.h"

namespace sf {
namespace {

struct Geometry {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter;
  int64_t q_start, k_start, v_start, gate_start, up_start;  // places of each member in the fused outputs
};

// One of a layer's four products: a row-layout Linear, or a column-layout one that zeroes its inputs below
// `threshold` first (activation sparsity) and reads only the weights of the inputs left.
struct Product {
  std::optional<Linear> row;
  std::optional<ColumnLinear> column;
  float threshold = 0.0f;
  int64_t out() const { return row ? row->out() : column->out(); }
  int64_t in() const { return row ? row->in() : column->in(); }
  int64_t padded_in() const { return row ? row->padded_in() : column->padded_in(); }
  void run(const float* x, float* y) const {
    if (row) {
      row->run(x, 1, y);
    } else {
      column->run(x, 1, y, threshold);
    }
  }
};

struct Layer {
  at::Tensor norm1, norm2;        // float32 [hidden]
  std::vector<Product> linears;   // q/k/v fused, o, gate/up fused, down
  at::Tensor keys, values;        // float32 [kv_heads, capacity, head_dim]
};

class Decoder {
 public:
  Decoder(const Geometry& g, double eps, double scaling) : g_(g), eps_(float(eps)), scaling_(float(scaling)) {}

  std::vector<at::Tensor> tensors;  // everything the Linears point into
  std::vector<Layer> layers;

  void allocate_scratch() {
    const Product& qkv = layers[0].linears[0];
    const Product& o = layers[0].linears[1];
    const Product& gate_up = layers[0].linears[2];
    const Product& down = layers[0].linears[3];
    normed_.assign(qkv.padded_in(), 0.0f);
    qkv_.assign(qkv.out(), 0.0f);
    attended_.assign(o.padded_in(), 0.0f);
    gate_up_.assign(gate_up.out(), 0.0f);
    gated_.assign(down.padded_in(), 0.0f);
    update_.assign(std::max(o.out(), down.out()), 0.0f);
  }

  std::vector<at::Tensor> reserve(int64_t capacity) {
    if (capacity > capacity_) {
      for (Layer& layer : layers) {
        for (at::Tensor* cache : {&layer.keys, &layer.values}) {
          at::Tensor grown = at::zeros({g_.kv_heads, capacity, g_.head_dim}, at::kFloat);
          if (capacity_) {
            for (int64_t h = 0; h < g_.kv_heads; ++h)
              std::memcpy(grown.data_ptr<float>() + h * capacity * g_.head_dim,
                          cache->data_ptr<float>() + h * capacity_ * g_.head_dim,
                          sizeof(float) * capacity_ * g_.head_dim);
          }
          *cache = grown;
        }
      }
      capacity_ = capacity;
      scores_.assign(g_.heads * capacity, 0.0f);
    }
    std::vector<at::Tensor> caches;
    for (const Layer& layer : layers) {
      caches.push_back(layer.keys);
      caches.push_back(layer.values);
    }
    return caches;
  }

  // hidden [hidden] float32, in place: the input of layer 0 in, the output of the last layer out. The new key and
  // value go to place `length` of every cache; attention covers places 0..length.
  void step(float* hidden, const float* cos, const float* sin, int64_t length) {
    TORCH_CHECK(length >= 0 && length < capacity_, "cache position ", length, " outside the reserved ", capacity_);
    for (Layer& layer : layers) {
      rms_norm(hidden, layer.norm1.data_ptr<float>());
      layer.linears[0].run(normed_.data(), qkv_.data());
      float* q = qkv_.data() + g_.q_start;
      float* k = qkv_.data() + g_.k_start;
      const float* v = qkv_.data() + g_.v_start;
      for (int64_t h = 0; h < g_.heads; ++h) rotate(q + h * g_.head_dim, cos, sin);
      float* keys = layer.keys.data_ptr<float>();
      float* values = layer.values.data_ptr<float>();
      for (int64_t h = 0; h < g_.kv_heads; ++h) {
        rotate(k + h * g_.head_dim, cos, sin);
        const int64_t place = (h * capacity_ + length) * g_.head_dim;
        std::memcpy(keys + place, k + h * g_.head_dim, sizeof(float) * g_.head_dim);
        std::memcpy(values + place, v + h * g_.head_dim, sizeof(float) * g_.head_dim);
      }
      attend(q, keys, values, length + 1);
      add_product(layer.linears[1], attended_.data(), hidden);
      rms_norm(hidden, layer.norm2.data_ptr<float>());
      layer.linears[2].run(normed_.data(), gate_up_.data());
      const float* gate = gate_up_.data() + g_.gate_start;
      const float* up = gate_up_.data() + g_.up_start;
      step::silu_mul(gate, up, gated_.data(), g_.inter);
      add_product(layer.linears[3], gated_.data(), hidden);
    }
  }

 private:
  void rms_norm(const float* x, const float* weight) {
    const float scale = 1.0f / std::sqrt(step::sum_squares(x, g_.hidden) / float(g_.hidden) + eps_);
    step::scale_mul(x, weight, scale, normed_.data(), g_.hidden);
  }

  // transformers' x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
  void rotate(float* x, const float* cos, const float* sin) const {
    const int64_t half = g_.head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }

  void attend(const float* q, const float* keys, const float* values, int64_t places) {
    const int64_t group = g_.heads / g_.kv_heads, d = g_.head_dim;
    at::parallel_for(0, g_.heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        const float* qh = q + h * d;
        const float* kh = keys + (h / group) * capacity_ * d;
        const float* vh = values + (h / group) * capacity_ * d;
        step::attend_head(qh, kh, vh, places, d, scaling_, scores_.data() + h * capacity_, attended_.data() + h * d);
      }
    });
  }

  void add_product(const Product& product, const float* x, float* hidden) {
    product.run(x, update_.data());
    step::add(hidden, update_.data(), g_.hidden);
  }

  Geometry g_;
  float eps_, scaling_;
  int64_t capacity_ = 0;
  std::vector<float> normed_, qkv_, attended_, gate_up_, gated_, update_, scores_;
};

std::mutex registry_lock;
std::unordered_map<int64_t, std::shared_ptr<Decoder>> registry;
int64_t next_handle = 1;

std::shared_ptr<Decoder> find(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_lock);
  const auto it = registry.find(handle);
  TORCH_CHECK(it != registry.end(), "no decoder with handle ", handle);
  return it->second;
}

at::Tensor float_vector(const std::optional<at::Tensor>& t, int64_t size, const char* what) {
  TORCH_CHECK(t && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == size, what,
              " must be a contiguous float32 tensor of ", size, " values");
  return *t;
}

// Per linear: 5 tensors (values; masks or positions; offsets; bases; bias) and 5 integers (kind: 0 dense, 1
// bitmask, 2 N:M, 3 column layout, dense or bitmask; in_features; then position stride, n, m for N:M, out_features
// for the column layout), and one activation threshold (column layout only).
Product product_from(const c10::List<std::optional<at::Tensor>>& tensors, size_t t, const std::vector<int64_t>& ints,
                     size_t i, double threshold, Isa isa) {
  const std::optional<at::Tensor> values = tensors.get(t), aux = tensors.get(t + 1), offsets = tensors.get(t + 2),
                                  bases = tensors.get(t + 3), bias = tensors.get(t + 4);
  TORCH_CHECK(values.has_value(), "a linear without values");
  Product product;
  switch (ints[i]) {
    case 0: product.row = Linear::dense(*values, bias, isa); break;
    case 1:
      TORCH_CHECK(aux && offsets, "a bitmask linear needs masks and offsets");
      product.row = Linear::bitmask(*values, *aux, *offsets, ints[i + 1], bias, isa);
      break;
    case 2:
      TORCH_CHECK(aux.has_value(), "an N:M linear needs positions");
      product.row = Linear::nm(*values, *aux, ints[i + 2], ints[i + 3], ints[i + 4], ints[i + 1], bias, isa);
      break;
    case 3:
      TORCH_CHECK(threshold >= 0, "activation thresholds must be at least 0");
      product.column = ColumnLinear(*values, aux, bases, ints[i + 2], ints[i + 1], bias, isa);
      product.threshold = float(threshold);
      break;
    default: TORCH_CHECK(false, "unknown layout kind ", ints[i]);
  }
  return product;
}

int64_t decoder_new(const c10::List<std::optional<at::Tensor>>& tensors, std::vector<int64_t> ints,
                    std::vector<double> thresholds, std::vector<int64_t> shape, double eps, double scaling,
                    const std::string& isa_name) {
  TORCH_CHECK(shape.size() == 11, "shape must hold 11 integers");
  const Geometry g{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5],
                   shape[6], shape[7], shape[8], shape[9], shape[10]};
  TORCH_CHECK(g.layers >= 1 && g.heads >= 1 && g.kv_heads >= 1 && g.heads % g.kv_heads == 0 && g.head_dim % 2 == 0,
              "unsupported geometry");
  constexpr size_t kTensors = 2 + 4 * 5, kInts = 4 * 5, kThresholds = 4;
  TORCH_CHECK(tensors.size() == g.layers * kTensors && ints.size() == g.layers * kInts &&
                  thresholds.size() == g.layers * kThresholds,
              "expected ", kTensors, " tensors, ", kInts, " integers and ", kThresholds, " thresholds per layer");
  const Isa isa = parse_isa(isa_name);
  auto decoder = std::make_shared<Decoder>(g, eps, scaling);
  for (size_t i = 0; i < tensors.size(); ++i)
    if (const std::optional<at::Tensor> t = tensors.get(i)) decoder->tensors.push_back(*t);
  for (int64_t l = 0; l < g.layers; ++l) {
    Layer layer;
    layer.norm1 = float_vector(tensors.get(l * kTensors), g.hidden, "norm weights");
    layer.norm2 = float_vector(tensors.get(l * kTensors + 1), g.hidden, "norm weights");
    for (size_t j = 0; j < 4; ++j)
      layer.linears.push_back(product_from(tensors, l * kTensors + 2 + 5 * j, ints, l * kInts + 5 * j,
                                           thresholds[l * kThresholds + j], isa));
    const Product &qkv = layer.linears[0], &o = layer.linears[1], &gate_up = layer.linears[2],
                  &down = layer.linears[3];
    const int64_t q = g.heads * g.head_dim, kv = g.kv_heads * g.head_dim;
    TORCH_CHECK(qkv.in() == g.hidden && o.out() == g.hidden && o.in() == q && gate_up.in() == g.hidden &&
                    down.out() == g.hidden && down.in() == g.inter && g.q_start + q <= qkv.out() &&
                    g.k_start + kv <= qkv.out() && g.v_start + kv <= qkv.out() &&
                    g.gate_start + g.inter <= gate_up.out() && g.up_start + g.inter <= gate_up.out(),
                "layer ", l, ": weight shapes do not fit the geometry");
    decoder->layers.push_back(std::move(layer));
  }
  decoder->allocate_scratch();
  std::lock_guard<std::mutex> guard(registry_lock);
  registry[next_handle] = decoder;
  return next_handle++;
}

std::vector<at::Tensor> decoder_reserve(int64_t handle, int64_t capacity) { return find(handle)->reserve(capacity); }

void decoder_step(int64_t handle, const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t length) {
  const auto decoder = find(handle);
  const int64_t h = decoder->layers[0].norm1.numel(), d = decoder->layers[0].keys.size(2);
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.is_contiguous() && hidden.numel() == h,
              "hidden must be a contiguous float32 tensor of ", h, " values");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == d &&
                  sin.scalar_type() == at::kFloat && sin.is_contiguous() && sin.numel() == d,
              "cos and sin must be contiguous float32 tensors of ", d, " values");
  decoder->step(hidden.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), length);
}

void decoder_free(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_lock);
  registry.erase(handle);
}

}  // namespace
}  // namespace sf

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, lib) {
  lib.def("decoder_new(Tensor?[] tensors, int[] ints, float[] thresholds, int[] shape, float eps, float scaling, "
          "str isa) -> int",
          &sf::decoder_new);
  lib.def("decoder_reserve(int handle, int capacity) -> Tensor[]", &sf::decoder_reserve);
  lib.def("decoder_step(int handle, Tensor(a!) hidden, Tensor cos, Tensor sin, int length) -> ()", &sf::decoder_step);
  lib.def("decoder_free(int handle) -> ()", &sf::decoder_free);
}
