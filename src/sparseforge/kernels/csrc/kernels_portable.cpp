// Portable C++ kernels (any CPU, baseline compiler flags): each output feature's weights are decoded into an fp32
// row once, then dotted with every row of x using 8 partial sums the compiler can vectorise.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace sf::portable {
namespace {

// fp16 -> fp32 by table (256 KiB, built once): the bit-twiddling conversion costs several ns per value, which
// made decoding a whole weight for the GEMM path slower than the product itself.
const float* half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(1 << 16);
    for (uint32_t h = 0; h < t.size(); ++h) t[h] = c10::detail::fp16_ieee_to_fp32_value(uint16_t(h));
    return t;
  }();
  return table.data();
}

float widen(uint16_t h, bool bf16) { return bf16 ? c10::detail::f32_from_bits(h) : half_table()[h]; }

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

// Runs decode(o, bits) then dot_rows on the widened row for each feature.
template <class Decode>
void run(const Problem& p, int64_t begin, int64_t end, Decode decode) {
  std::vector<uint16_t> bits(p.ldx);
  std::vector<float> row(p.ldx);
  for (int64_t o = begin; o < end; ++o) {
    std::fill(bits.begin(), bits.end(), uint16_t(0));
    decode(o, bits.data());
    for (int64_t i = 0; i < p.ldx; ++i) row[i] = widen(bits[i], p.bf16);
    dot_rows(p, row.data(), o);
  }
}

// Row decoders: feature o's weights into row as fp16/bf16 bits (zeroed by the caller; 0 is +0.0 in both)
struct DenseRow {
  const Problem& p;
  const DenseWeight& w;
  void operator()(int64_t o, uint16_t* row) const { std::copy(w.values + o * p.in, w.values + (o + 1) * p.in, row); }
};

struct BitmaskRow {
  const Problem& p;
  const BitmaskWeight& w;
  void operator()(int64_t o, uint16_t* row) const {
    const int64_t chunks = (p.in + kWindow - 1) / kWindow;
    const uint16_t* v = w.values + w.offsets[o];
    for (int64_t c = 0; c < chunks; ++c)
      for (uint32_t m = w.masks[o * chunks + c]; m; m &= m - 1)
        row[c * kWindow + __builtin_ctz(m)] = *v++;
  }
};

struct NMRow {
  const Problem& p;
  const NMWeight& w;
  void operator()(int64_t o, uint16_t* row) const {
    const int bits = nm_bits(w.m), kept = kWindow / w.m * w.n;
    const int64_t wbytes = nm_window_bytes(kept, bits);
    const uint16_t* v = w.values + o * (p.in / w.m * w.n);
    const uint8_t* pos = w.positions + o * w.pos_stride;
    for (int64_t start = 0; start < p.in; start += kWindow, pos += wbytes) {  // window by window, no divisions
      const int groups = int(std::min<int64_t>(kWindow, p.in - start) / w.m);
      for (int g = 0, k = 0; g < groups; ++g)
        for (int j = 0; j < w.n; ++j, ++k) {
          const int bit = k * bits;
          const unsigned field = (unsigned(pos[bit / 8]) | unsigned(pos[bit / 8 + 1]) << 8) >> (bit % 8);
          row[start + g * w.m + (field & unsigned(w.m - 1))] = *v++;
        }
    }
  }
};

// Features [begin, end) of the weight into dense[o * in ...] (fp16/bf16 bits, unpadded rows).
template <class Decode>
void unpack_rows(const Problem& p, uint16_t* dense, int64_t begin, int64_t end, Decode decode) {
  for (int64_t o = begin; o < end; ++o) {
    uint16_t* row = dense + o * p.in;
    std::fill(row, row + p.in, uint16_t(0));
    decode(o, row);
  }
}

}  // namespace

void dense(const Problem& p, const DenseWeight& w, int64_t begin, int64_t end) { run(p, begin, end, DenseRow{p, w}); }
void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  run(p, begin, end, BitmaskRow{p, w});
}
void nm(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) { run(p, begin, end, NMRow{p, w}); }

void unpack(const Problem& p, const BitmaskWeight& w, uint16_t* dense, int64_t begin, int64_t end) {
  unpack_rows(p, dense, begin, end, BitmaskRow{p, w});
}
void unpack(const Problem& p, const NMWeight& w, uint16_t* dense, int64_t begin, int64_t end) {
  unpack_rows(p, dense, begin, end, NMRow{p, w});
}

void column(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t out, bool bf16,
            float* acc) {
  const int64_t words = (out + 63) / 64;
  for (int64_t a = 0; a < count; ++a) {
    const int64_t i = active[a];
    const float xi = x[i];
    if (w.masks == nullptr) {
      const uint16_t* p = w.values + i * out;
      for (int64_t j = 0; j < out; ++j) acc[j] += widen(p[j], bf16) * xi;
    } else {
      const uint16_t* p = w.values + w.bases[i];
      for (int64_t word = 0; word < words; ++word)
        for (uint64_t m = w.masks[i * words + word]; m; m &= m - 1)
          acc[word * 64 + __builtin_ctzll(m)] += widen(*p++, bf16) * xi;
    }
  }
}

}  // namespace sf::portable
