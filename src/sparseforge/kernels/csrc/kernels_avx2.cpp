// AVX2 + F16C + FMA kernels. Work unit: 2 output features x up to 4 rows of x over units of 8 inputs; each layout
// decodes a unit into 8 fp32 weights (the bitmask through a 256-entry pshufb table; N:M turns each window's
// positions into the window's bitmask first) and the same FMA loop consumes them.
#include "kernels.h"

#ifdef SF_X86
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define SF_TARGET_ISA "avx2,f16c,fma,popcnt,bmi,bmi2"
#define SF_INLINE __attribute__((always_inline, target(SF_TARGET_ISA))) inline
#define SF_TARGET __attribute__((target(SF_TARGET_ISA)))

namespace sf::avx2 {
namespace {

constexpr int kUnit = 8;
constexpr int kOB = 2;
constexpr int kMaxRows = 4;

template <bool BF16>
SF_INLINE __m256 widen(__m128i h) {
  if constexpr (BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

SF_INLINE float finish(__m256 acc, const float* bias, int64_t o) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s) + (bias ? bias[o] : 0.0f);
}

// pshufb control that moves the first popcount(m) 16-bit values to the set bits of m, zeroing the others.
struct ExpandTable {
  alignas(16) uint8_t shuffle[256][16];
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int m = 0; m < 256; ++m) {
    int next = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool kept = (m >> lane) & 1;
      t.shuffle[m][2 * lane] = kept ? uint8_t(2 * next) : 0x80;
      t.shuffle[m][2 * lane + 1] = kept ? uint8_t(2 * next + 1) : 0x80;
      next += kept;
    }
  }
  return t;
}
constexpr ExpandTable kExpand = make_expand_table();

// ---- decoders: one unit of 8 inputs of one output feature -> 8 fp32 ----------------------------------------------

template <bool BF16>
struct DenseDecoder {
  const DenseWeight& w;
  int64_t in;
  struct Cursor {
    const uint16_t* p;
  };
  Cursor start(int64_t o) const { return {w.values + o * in}; }
  int64_t full_units() const { return in / kUnit; }
  int tail() const { return int(in % kUnit); }
  SF_INLINE __m256 load(Cursor& c) const {
    const __m256 v = widen<BF16>(_mm_loadu_si128((const __m128i*)c.p));
    c.p += kUnit;
    return v;
  }
  SF_INLINE __m256 load_tail(Cursor& c) const {
    alignas(16) uint16_t buf[kUnit] = {};
    std::memcpy(buf, c.p, sizeof(uint16_t) * tail());
    return widen<BF16>(_mm_load_si128((const __m128i*)buf));
  }
};

// The kept values of a unit of 8 inputs with mask m (bit i = input i), widened and placed at their inputs.
template <bool BF16>
SF_INLINE __m256 expand_unit(const uint16_t*& p, unsigned m) {
  const __m128i control = _mm_load_si128((const __m128i*)kExpand.shuffle[m]);
  const __m256 v = widen<BF16>(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)p), control));
  p += _mm_popcnt_u32(m);
  return v;
}

// Masks beyond `in` are zero and x is zero-padded, so every unit is a full one.
template <bool BF16>
struct BitmaskDecoder {
  const BitmaskWeight& w;
  int64_t in;
  struct Cursor {
    const uint16_t* p;
    const uint8_t* mask;  // the row's little-endian 32-bit masks, read a byte (8 inputs) at a time
  };
  int64_t chunks() const { return (in + kWindow - 1) / kWindow; }
  Cursor start(int64_t o) const {
    return {w.values + w.offsets[o], reinterpret_cast<const uint8_t*>(w.masks + o * chunks())};
  }
  int64_t full_units() const { return chunks() * (kWindow / kUnit); }
  int tail() const { return 0; }
  SF_INLINE __m256 load(Cursor& c) const { return expand_unit<BF16>(c.p, *c.mask++); }
  SF_INLINE __m256 load_tail(Cursor&) const { return _mm256_setzero_ps(); }
};

// A window's positions become its 32-bit mask (values are in input order, as in a bitmask row), then each unit
// expands like the bitmask's.
template <bool BF16>
struct NMDecoder {
  const NMWeight& w;
  int64_t in;
  int bits, kept, tail_kept;
  int64_t wbytes, row_values;
  int32_t base[kWindow];  // first input of the group of each kept value of a window

  NMDecoder(const NMWeight& w_, int64_t in_) : w(w_), in(in_) {
    bits = nm_bits(w.m);
    kept = kWindow / w.m * w.n;
    tail_kept = int(in % kWindow) / w.m * w.n;
    wbytes = nm_window_bytes(kept, bits);
    row_values = in / w.m * w.n;
    for (int i = 0; i < kWindow; ++i) base[i] = i / w.n * w.m;
  }
  struct Cursor {
    const uint16_t* p;
    const uint8_t* pos;
    int64_t unit;
    uint32_t mask;
  };
  Cursor start(int64_t o) const { return {w.values + o * row_values, w.positions + o * w.pos_stride, 0, 0}; }
  int64_t full_units() const { return (in + kWindow - 1) / kWindow * (kWindow / kUnit); }
  int tail() const { return 0; }
  // 8 kept values at a time: their input bits, or-ed (each batch of 8 starts on a byte: 8 * bits bits)
  SF_INLINE uint32_t window_mask(const uint8_t* pos, int count) const {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i shift = _mm256_mullo_epi32(lane, _mm256_set1_epi32(bits));
    __m256i acc = _mm256_setzero_si256();
    for (int b = 0; 8 * b < count; ++b) {
      uint32_t word;
      std::memcpy(&word, pos + b * bits, sizeof(word));
      const __m256i field = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shift),
                                             _mm256_set1_epi32(w.m - 1));
      const __m256i input = _mm256_add_epi32(field, _mm256_loadu_si256((const __m256i*)(base + 8 * b)));
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(count - 8 * b), lane);
      acc = _mm256_or_si256(acc, _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(1), input), valid));
    }
    __m128i v = _mm_or_si128(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    v = _mm_or_si128(v, _mm_shuffle_epi32(v, 0x4E));
    v = _mm_or_si128(v, _mm_shuffle_epi32(v, 0xB1));
    return uint32_t(_mm_cvtsi128_si32(v));
  }
  SF_INLINE __m256 load(Cursor& c) const {
    const int64_t u = c.unit % (kWindow / kUnit);
    if (u == 0) {
      c.mask = window_mask(c.pos, c.unit / (kWindow / kUnit) < in / kWindow ? kept : tail_kept);
      c.pos += wbytes;
    }
    ++c.unit;
    return expand_unit<BF16>(c.p, (c.mask >> (kUnit * u)) & 0xFFu);
  }
  SF_INLINE __m256 load_tail(Cursor&) const { return _mm256_setzero_ps(); }
};

// ---- kernel -------------------------------------------------------------------------------------------------------

template <int OB, int RB>
SF_INLINE void fma_unit(__m256 (&acc)[OB][RB], const __m256 (&w)[OB], const float* x, int64_t ldx) {
  SF_UNROLL
  for (int r = 0; r < RB; ++r) {
    const __m256 xv = _mm256_loadu_ps(x + r * ldx);
    SF_UNROLL
    for (int j = 0; j < OB; ++j) acc[j][r] = _mm256_fmadd_ps(w[j], xv, acc[j][r]);
  }
}

template <class Decoder, int OB, int RB>
SF_TARGET void tile(const Problem& p, const Decoder& dec, int64_t o0, int64_t r0) {
  typename Decoder::Cursor cur[OB];
  for (int j = 0; j < OB; ++j) cur[j] = dec.start(o0 + j);
  __m256 acc[OB][RB];
  for (int j = 0; j < OB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm256_setzero_ps();
  const float* x = p.x + r0 * p.ldx;
  __m256 w[OB];
  const int64_t full = dec.full_units();
  for (int64_t u = 0; u < full; ++u) {
    SF_UNROLL
    for (int j = 0; j < OB; ++j) w[j] = dec.load(cur[j]);
    fma_unit<OB, RB>(acc, w, x + u * kUnit, p.ldx);
  }
  if (dec.tail()) {
    SF_UNROLL
    for (int j = 0; j < OB; ++j) w[j] = dec.load_tail(cur[j]);
    fma_unit<OB, RB>(acc, w, x + full * kUnit, p.ldx);
  }
  for (int j = 0; j < OB; ++j)
    for (int r = 0; r < RB; ++r) p.y[(r0 + r) * p.out + o0 + j] = finish(acc[j][r], p.bias, o0 + j);
}

template <class Decoder, int OB>
SF_TARGET void rows(const Problem& p, const Decoder& dec, int64_t o0) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, p.rows - r0)) {
      case 1: tile<Decoder, OB, 1>(p, dec, o0, r0); break;
      case 2: tile<Decoder, OB, 2>(p, dec, o0, r0); break;
      case 3: tile<Decoder, OB, 3>(p, dec, o0, r0); break;
      default: tile<Decoder, OB, 4>(p, dec, o0, r0); break;
    }
  }
}

template <class Decoder>
SF_TARGET void run(const Problem& p, const Decoder& dec, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + kOB <= end; o += kOB) rows<Decoder, kOB>(p, dec, o);
  for (; o < end; ++o) rows<Decoder, 1>(p, dec, o);
}

}  // namespace

void dense(const Problem& p, const DenseWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run(p, DenseDecoder<true>{w, p.in}, begin, end);
  } else {
    run(p, DenseDecoder<false>{w, p.in}, begin, end);
  }
}

void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run(p, BitmaskDecoder<true>{w, p.in}, begin, end);
  } else {
    run(p, BitmaskDecoder<false>{w, p.in}, begin, end);
  }
}

void nm(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run(p, NMDecoder<true>(w, p.in), begin, end);
  } else {
    run(p, NMDecoder<false>(w, p.in), begin, end);
  }
}

}  // namespace sf::avx2
#endif
