// Portable C++ kernels (any CPU, baseline compiler flags): each output feature's weights are decoded into an fp32
// row once, then dotted with every row of x using 8 partial sums the compiler can vectorise.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "kernels.h"

namespace sf::portable {
namespace {

float widen(uint16_t h, bool bf16) {
  return bf16 ? c10::detail::f32_from_bits(h) : c10::detail::fp16_ieee_to_fp32_value(h);
}

// y[:, o] for every row of x from the decoded fp32 weights of feature o
void dot_rows(const Problem& p, const float* w, int64_t o) {
  constexpr int kLanes = 8;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * p.ldx;
    float part[kLanes] = {};
    for (int64_t i = 0; i < p.ldx; i += kLanes)
      for (int l = 0; l < kLanes; ++l) part[l] += w[i + l] * x[i + l];
    float sum = 0.0f;
    for (float v : part) sum += v;
    p.y[r * p.out + o] = sum + (p.bias ? p.bias[o] : 0.0f);
  }
}

// Runs decode(o, row) then dot_rows for each feature; row has ldx zeroed floats on entry.
template <class Decode>
void run(const Problem& p, int64_t begin, int64_t end, Decode decode) {
  std::vector<float> row(p.ldx);
  for (int64_t o = begin; o < end; ++o) {
    std::fill(row.begin(), row.end(), 0.0f);
    decode(o, row.data());
    dot_rows(p, row.data(), o);
  }
}

// Row decoders: feature o's weights into row (in floats, zeroed by the caller)
struct DenseRow {
  const Problem& p;
  const DenseWeight& w;
  void operator()(int64_t o, float* row) const {
    const uint16_t* v = w.values + o * p.in;
    for (int64_t i = 0; i < p.in; ++i) row[i] = widen(v[i], p.bf16);
  }
};

struct BitmaskRow {
  const Problem& p;
  const BitmaskWeight& w;
  void operator()(int64_t o, float* row) const {
    const int64_t chunks = (p.in + kWindow - 1) / kWindow;
    const uint16_t* v = w.values + w.offsets[o];
    for (int64_t c = 0; c < chunks; ++c)
      for (uint32_t m = w.masks[o * chunks + c]; m; m &= m - 1)
        row[c * kWindow + __builtin_ctz(m)] = widen(*v++, p.bf16);
  }
};

struct NMRow {
  const Problem& p;
  const NMWeight& w;
  void operator()(int64_t o, float* row) const {
    const int bits = nm_bits(w.m), kept = kWindow / w.m * w.n;
    const int64_t wbytes = nm_window_bytes(kept, bits), row_values = p.in / w.m * w.n;
    const uint16_t* v = w.values + o * row_values;
    for (int64_t i = 0; i < row_values; ++i) {
      const int64_t win = i / kept, k = i % kept, bit = k * bits;
      const uint8_t* pos = w.positions + o * w.pos_stride + win * wbytes + bit / 8;
      const unsigned field = (unsigned(pos[0]) | unsigned(pos[1]) << 8) >> (bit % 8);
      row[win * kWindow + k / w.n * w.m + (field & unsigned(w.m - 1))] = widen(v[i], p.bf16);
    }
  }
};

// Features [begin, end) of the weight into dense[o * in ...] (float32, unpadded rows).
template <class Decode>
void unpack_rows(const Problem& p, float* dense, int64_t begin, int64_t end, Decode decode) {
  for (int64_t o = begin; o < end; ++o) {
    float* row = dense + o * p.in;
    std::fill(row, row + p.in, 0.0f);
    decode(o, row);
  }
}

}  // namespace

void dense(const Problem& p, const DenseWeight& w, int64_t begin, int64_t end) { run(p, begin, end, DenseRow{p, w}); }
void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  run(p, begin, end, BitmaskRow{p, w});
}
void nm(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) { run(p, begin, end, NMRow{p, w}); }

void unpack(const Problem& p, const DenseWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_rows(p, dense, begin, end, DenseRow{p, w});
}
void unpack(const Problem& p, const BitmaskWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_rows(p, dense, begin, end, BitmaskRow{p, w});
}
void unpack(const Problem& p, const NMWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_rows(p, dense, begin, end, NMRow{p, w});
}

}  // namespace sf::portable
