// AVX2 + F16C + FMA kernels, for CPUs without AVX-512 (AMD Zen 2/3, Intel client cores). Work unit: OB output
// features x up to 4 rows of x over chunks of 32 inputs, each chunk four units of 8; each layout decodes a unit into
// 8 fp32 weights (the bitmask through a 256-entry pshufb table, other N:M by turning each window's positions into
// the window's bitmask) and the same FMA loop consumes them. 2:4 instead keeps its values packed, two features to a
// register, and permutes the inputs to meet them (two_four_tile). A work unit prefetches what the next one reads, as
// the AVX-512 kernels do (rows of a few KiB end before the hardware prefetcher has ramped up).
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
constexpr int kUnits = kWindow / kUnit;  // units per chunk
constexpr int kMaxRows = 4;

template <bool BF16>
SF_INLINE __m256 widen(__m128i h) {
  if constexpr (BF16) {
    // interleaving with zeros stays inside 128-bit lanes: on Zen 3 a zero-extension to 256 bits costs a shuffle
    // slot for a whole cycle, two unpacks and an insert half of that each
    const __m128i zero = _mm_setzero_si128();
    return _mm256_castsi256_ps(
        _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi16(zero, h)), _mm_unpackhi_epi16(zero, h), 1));
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

// pshufb controls: 16-bit values from a compacted run to the 8 lanes of a unit
struct ShuffleTable {
  alignas(16) uint8_t control[256][16];
};

// Bitmask: the first popcount(m) values to the set bits of m, zeros elsewhere.
constexpr ShuffleTable make_expand_table() {
  ShuffleTable t{};
  for (int m = 0; m < 256; ++m) {
    int next = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool kept = (m >> lane) & 1;
      t.control[m][2 * lane] = kept ? uint8_t(2 * next) : 0x80;
      t.control[m][2 * lane + 1] = kept ? uint8_t(2 * next + 1) : 0x80;
      next += kept;
    }
  }
  return t;
}
constexpr ShuffleTable kExpand = make_expand_table();

// 2:4: a unit is two groups of four, four kept values whose 2-bit places fill one byte (value k at bits 2k..2k+1,
// in its group k / 2); each value goes to lane 4 * (k / 2) + place, zeros elsewhere.
constexpr ShuffleTable make_two_four_table() {
  ShuffleTable t{};
  for (int b = 0; b < 256; ++b) {
    for (int i = 0; i < 16; ++i) t.control[b][i] = 0x80;
    for (int k = 0; k < 4; ++k) {
      const int lane = 4 * (k / 2) + ((b >> (2 * k)) & 3);
      t.control[b][2 * lane] = uint8_t(2 * k);
      t.control[b][2 * lane + 1] = uint8_t(2 * k + 1);
    }
  }
  return t;
}
constexpr ShuffleTable kTwoFour = make_two_four_table();

// The kept values of a unit of 8 inputs with mask m (bit i = input i), widened and placed at their inputs.
// (The count comes from the table offset m * 16, which has the same bits set: one register less to copy.)
template <bool BF16>
SF_INLINE __m256 expand_unit(const uint16_t*& p, unsigned m) {
  const unsigned offset = m * sizeof(kExpand.control[0]);
  const __m128i control = _mm_load_si128((const __m128i*)(&kExpand.control[0][0] + offset));
  const __m256 v = widen<BF16>(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)p), control));
  p += _mm_popcnt_u32(offset);
  return v;
}

// ---- decoders -----------------------------------------------------------------------------------------------------
//
// Each decodes one unit of 8 inputs of one output feature into 8 fp32. chunks(): whole chunks of 32 inputs, decoded
// by load(cursor, u, tile) for u = 0..3 (u == 0 issues the chunk's prefetches); then rest_units() units by
// load_rest() and, for the dense layout only, a partial unit of tail() inputs by load_tail(). tile(o) settles what
// the work unit starting at feature o prefetches (the rows OB features on: what the next work unit reads, one
// chunk's worth ahead per chunk read, and the same twice as far into L2), step(tile, c) what it requests per chunk
// besides its rows.

template <bool BF16, int OB>
struct DenseDecoder {
  const DenseWeight& w;
  int64_t in;
  struct Cursor {
    const uint16_t* p;
  };
  struct Tile {
    int64_t near;
  };
  Cursor start(int64_t o) const { return {w.values + o * in}; }
  Tile tile(int64_t) const { return {OB * in}; }
  SF_INLINE void step(const Tile&, int64_t) const {}
  int64_t chunks() const { return in / kWindow; }
  int rest_units() const { return int(in % kWindow) / kUnit; }
  int tail() const { return int(in % kUnit); }
  SF_INLINE __m256 load(Cursor& c, int u, const Tile& t) const {
    if (u == 0) _mm_prefetch((const char*)(c.p + t.near), _MM_HINT_T0);
    return load_rest(c, u);
  }
  SF_INLINE __m256 load_rest(Cursor& c, int) const {
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

// Masks beyond `in` are zero and x is zero-padded, so every chunk is a whole one.
template <bool BF16, int OB>
struct BitmaskDecoder {
  const BitmaskWeight& w;
  int64_t in;
  int64_t out;
  struct Cursor {
    const uint16_t* p;
    const uint8_t* mask;  // the row's little-endian 32-bit masks, read a byte (one unit) at a time
  };
  struct Tile {
    int64_t near, far;
    const uint32_t* masks;  // the next work unit's, OB per chunk
  };
  Cursor start(int64_t o) const {
    return {w.values + w.offsets[o], reinterpret_cast<const uint8_t*>(w.masks + o * chunks())};
  }
  // one distance for the unit's rows (the first row's) is close enough for a prefetch
  Tile tile(int64_t o) const {
    const int64_t near = o + OB <= out ? w.offsets[o + OB] - w.offsets[o] : 0;
    return {near, 2 * near, w.masks + std::min(o + OB, out) * chunks()};
  }
  SF_INLINE void step(const Tile& t, int64_t c) const { _mm_prefetch((const char*)(t.masks + OB * c), _MM_HINT_T0); }
  int64_t chunks() const { return (in + kWindow - 1) / kWindow; }
  int rest_units() const { return 0; }
  int tail() const { return 0; }
  SF_INLINE __m256 load(Cursor& c, int u, const Tile& t) const {
    if (u == 0) {
      _mm_prefetch((const char*)(c.p + t.near), _MM_HINT_T0);
      _mm_prefetch((const char*)(c.p + t.far), _MM_HINT_T1);
    }
    return expand_unit<BF16>(c.p, *c.mask++);
  }
  SF_INLINE __m256 load_rest(Cursor&, int) const { return _mm256_setzero_ps(); }
  SF_INLINE __m256 load_tail(Cursor&) const { return _mm256_setzero_ps(); }
};

// N:M. Whole windows of 2:4 take one table lookup per unit (its position byte): what prefill's unpack and an odd last
// feature use, the product itself takes two_four_tile. Other N:M, and the last window when it is partial, turn the
// window's positions into its 32-bit mask first (values are in input order, as in a bitmask row) and expand each
// unit like the bitmask's.
template <bool BF16, int OB>
struct NMDecoder {
  const NMWeight& w;
  int64_t in;
  bool two_four;
  int bits, kept, tail_kept;
  int64_t wbytes, row_values;
  int32_t base[kWindow];  // first input of the group of each kept value of a window

  NMDecoder(const NMWeight& w_, int64_t in_) : w(w_), in(in_) {
    two_four = w.n == 2 && w.m == 4;
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
    int64_t window;
    uint32_t mask;  // the current window's, when decoded through a mask
  };
  struct Tile {
    int64_t values, positions;
  };
  Cursor start(int64_t o) const { return {w.values + o * row_values, w.positions + o * w.pos_stride, 0, 0}; }
  Tile tile(int64_t) const { return {OB * row_values, OB * w.pos_stride}; }
  SF_INLINE void step(const Tile&, int64_t) const {}
  // 2:4: the whole windows by table, the partial one through its mask; else every window through its mask
  int64_t chunks() const { return two_four ? in / kWindow : (in + kWindow - 1) / kWindow; }
  int rest_units() const { return two_four && in % kWindow ? kUnits : 0; }
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
  SF_INLINE __m256 by_mask(Cursor& c, int u) const {
    if (u == 0) {
      c.mask = window_mask(c.pos, c.window < in / kWindow ? kept : tail_kept);
      c.pos += wbytes;
      ++c.window;
    }
    return expand_unit<BF16>(c.p, (c.mask >> (kUnit * u)) & 0xFFu);
  }
  SF_INLINE __m256 load(Cursor& c, int u, const Tile& t) const {
    if (u == 0) {
      _mm_prefetch((const char*)(c.p + t.values), _MM_HINT_T0);
      _mm_prefetch((const char*)(c.pos + t.positions), _MM_HINT_T0);
    }
    if (!two_four) return by_mask(c, u);
    const __m128i control = _mm_load_si128((const __m128i*)kTwoFour.control[c.pos[u]]);
    const __m256 v = widen<BF16>(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)c.p), control));
    c.p += 4;
    if (u == kUnits - 1) c.pos += wbytes, ++c.window;
    return v;
  }
  SF_INLINE __m256 load_rest(Cursor& c, int u) const { return by_mask(c, u); }
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
  // Units alternate between S sets of accumulators: an FMA's 4-cycle latency on two FMA ports needs 8 independent
  // chains in flight, and a batch-1 unit has only OB (stand-alone driver, Zen 3, in L2, 4 features x 1 row: 5.6 ns
  // per 32 inputs of a 50% bitmask row with one set, 3.0 ns with two)
  constexpr int S = OB * RB >= 8 ? 1 : 2;
  typename Decoder::Cursor cur[OB];
  for (int j = 0; j < OB; ++j) cur[j] = dec.start(o0 + j);
  __m256 acc[S][OB][RB];
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < RB; ++r) acc[s][j][r] = _mm256_setzero_ps();
  const float* x = p.x + r0 * p.ldx;
  const typename Decoder::Tile t = dec.tile(o0);
  __m256 w[OB];
  const int64_t chunks = dec.chunks();
  for (int64_t c = 0; c < chunks; ++c, x += kWindow) {
    dec.step(t, c);
    SF_UNROLL
    for (int u = 0; u < kUnits; ++u) {
      SF_UNROLL
      for (int j = 0; j < OB; ++j) w[j] = dec.load(cur[j], u, t);
      fma_unit<OB, RB>(acc[u % S], w, x + u * kUnit, p.ldx);
    }
  }
  for (int u = 0; u < dec.rest_units(); ++u, x += kUnit) {
    for (int j = 0; j < OB; ++j) w[j] = dec.load_rest(cur[j], u);
    fma_unit<OB, RB>(acc[0], w, x, p.ldx);
  }
  if (dec.tail()) {
    for (int j = 0; j < OB; ++j) w[j] = dec.load_tail(cur[j]);
    fma_unit<OB, RB>(acc[0], w, x, p.ldx);
  }
  for (int j = 0; j < OB; ++j)
    for (int r = 0; r < RB; ++r) {
      if constexpr (S == 2) acc[0][j][r] = _mm256_add_ps(acc[0][j][r], acc[1][j][r]);
      p.y[(r0 + r) * p.out + o0 + j] = finish(acc[0][j][r], p.bias, o0 + j);
    }
}

template <template <bool, int> class Decoder, bool BF16, int OB>
SF_TARGET void rows(const Problem& p, const Decoder<BF16, OB>& dec, const Decoder<BF16, 1>& one, int64_t begin,
                    int64_t end) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxRows) {
    const int64_t rb = std::min<int64_t>(kMaxRows, p.rows - r0);
    int64_t o = begin;
#define SF_TILES(RB)                                                   \
  for (; o + OB <= end; o += OB) tile<Decoder<BF16, OB>, OB, RB>(p, dec, o, r0); \
  for (; o < end; ++o) tile<Decoder<BF16, 1>, 1, RB>(p, one, o, r0);
    switch (rb) {
      case 1: SF_TILES(1) break;
      case 2: SF_TILES(2) break;
      case 3: SF_TILES(3) break;
      default: SF_TILES(4) break;
    }
#undef SF_TILES
  }
}

// Four features per work unit for one or two rows of x; from three rows on, two (OB * RB accumulators plus OB
// decoded units within the 16 registers).
template <template <bool, int> class Decoder, bool BF16, class... Args>
SF_TARGET void run(const Problem& p, int64_t begin, int64_t end, const Args&... args) {
  const Decoder<BF16, 1> one{args...};
  if (p.rows <= 2) {
    rows(p, Decoder<BF16, 4>{args...}, one, begin, end);
  } else {
    rows(p, Decoder<BF16, 2>{args...}, one, begin, end);
  }
}

template <template <bool, int> class Decoder, class... Args>
SF_TARGET void run_typed(const Problem& p, int64_t begin, int64_t end, const Args&... args) {
  if (p.bf16) {
    run<Decoder, true>(p, begin, end, args...);
  } else {
    run<Decoder, false>(p, begin, end, args...);
  }
}

// ---- 2:4 by pairs of features: x permuted instead of the weights expanded ----------------------------------------
//
// The expanding decode spends a table load, a shuffle, a conversion and a multiply-add on 8 lanes of which 4 hold
// zeros. Here two features share a register: a unit's kept values of features A and B as [A0 A1 B0 B1 | A2 A3 B2 B3]
// (one 32-bit unpack of the two rows' values, which are in input order), and the inputs they multiply are picked
// from the unit's 8 inputs by one in-lane permute (vpermilps reads the low two bits of each control lane: the
// places, shifted out of the two rows' window positions by one variable shift). Per 16 weights: about the
// instructions of dense, half its multiply-adds and half its bytes (stand-alone driver, Zen 3, 4096 x 4096 fp16,
// 2 threads, streamed: 1637 us with the expanding decode, 1029-1091 us here, dense 1613 us).

// lane i of unit u: A's (lanes 0, 1, 4, 5) or B's (2, 3, 6, 7) place of kept value k of the unit (k = 0, 1 in the
// low half, the unit's first group of four; 2, 3 in the high half), from [A A B B | A A B B], the two rows' 32-bit
// window positions
alignas(32) constexpr int32_t kPlaceShift[kUnits][8] = {{0, 2, 0, 2, 4, 6, 4, 6},
                                                        {8, 10, 8, 10, 12, 14, 12, 14},
                                                        {16, 18, 16, 18, 20, 22, 20, 22},
                                                        {24, 26, 24, 26, 28, 30, 28, 30}};

template <bool BF16>
SF_INLINE float to_float(uint16_t h) {
  if constexpr (BF16) {
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return _cvtsh_ss(h);
  }
}

// The inputs past the last whole window (fewer than 32, whole groups of four): scalar, once per feature.
template <bool BF16>
SF_INLINE float two_four_rest(const uint16_t* v, const uint8_t* pos, int kept, const float* x) {
  float sum = 0.0f;
  for (int k = 0; k < kept; ++k) {
    const int place = (pos[k / 4] >> (2 * (k % 4))) & 3;
    sum += to_float<BF16>(v[k]) * x[k / 2 * 4 + place];
  }
  return sum;
}

template <bool BF16, int PAIRS, int RB>
SF_TARGET void two_four_tile(const Problem& p, const NMWeight& w, int64_t o0, int64_t r0) {
  constexpr int OB = 2 * PAIRS;
  constexpr int S = PAIRS * RB >= 4 ? 1 : 2;  // accumulator sets, as in tile()
  constexpr int64_t kWindowValues = kWindow / 2, kWindowBytes = nm_window_bytes(kWindowValues, nm_bits(4));
  const int64_t row_values = p.in / 2, windows = p.in / kWindow;
  // The row pointers stay put and one window index moves: per-row cursors were kept in memory by the compiler.
  const uint16_t* v[OB];
  const uint8_t* pos[OB];
  for (int j = 0; j < OB; ++j) {
    v[j] = w.values + (o0 + j) * row_values;
    pos[j] = w.positions + (o0 + j) * w.pos_stride;
  }
  __m256 acc[S][PAIRS][RB];
  for (int s = 0; s < S; ++s)
    for (int q = 0; q < PAIRS; ++q)
      for (int r = 0; r < RB; ++r) acc[s][q][r] = _mm256_setzero_ps();
  const float* x = p.x + r0 * p.ldx;
  // what the next work unit reads: its values each window, its positions once per 64-byte line (16 windows);
  // nearer or farther distances, or an L2 copy besides, measured slower
  const int64_t next_values = OB * row_values, next_positions = OB * w.pos_stride;
  for (int64_t c = 0; c < windows; ++c) {
    const int64_t cv = c * kWindowValues, cp = c * kWindowBytes;
    const float* xc = x + c * kWindow;
    __m256i places[PAIRS];
    SF_UNROLL
    for (int q = 0; q < PAIRS; ++q) {
      SF_UNROLL
      for (int h = 0; h < 2; ++h) {
        _mm_prefetch((const char*)(v[2 * q + h] + cv + next_values), _MM_HINT_T0);
        if (c % 16 == 0) _mm_prefetch((const char*)(pos[2 * q + h] + cp + next_positions), _MM_HINT_T0);
      }
      uint32_t a, b;
      std::memcpy(&a, pos[2 * q] + cp, sizeof(a));
      std::memcpy(&b, pos[2 * q + 1] + cp, sizeof(b));
      places[q] = _mm256_broadcastsi128_si256(
          _mm_shuffle_epi32(_mm_unpacklo_epi32(_mm_cvtsi32_si128(int(a)), _mm_cvtsi32_si128(int(b))), 0x50));
    }
    SF_UNROLL
    for (int half = 0; half < 2; ++half) {  // 16 bytes of each row: two units
      __m128i a[PAIRS], b[PAIRS];
      SF_UNROLL
      for (int q = 0; q < PAIRS; ++q) {
        a[q] = _mm_loadu_si128((const __m128i*)(v[2 * q] + cv + 8 * half));
        b[q] = _mm_loadu_si128((const __m128i*)(v[2 * q + 1] + cv + 8 * half));
      }
      SF_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int u = 2 * half + h;
        SF_UNROLL
        for (int q = 0; q < PAIRS; ++q) {
          const __m256 weights = widen<BF16>(h ? _mm_unpackhi_epi32(a[q], b[q]) : _mm_unpacklo_epi32(a[q], b[q]));
          const __m256i control = _mm256_srlv_epi32(places[q], _mm256_load_si256((const __m256i*)kPlaceShift[u]));
          SF_UNROLL
          for (int r = 0; r < RB; ++r) {
            const __m256 inputs = _mm256_permutevar_ps(_mm256_loadu_ps(xc + r * p.ldx + u * kUnit), control);
            acc[u % S][q][r] = _mm256_fmadd_ps(weights, inputs, acc[u % S][q][r]);
          }
        }
      }
    }
  }
  const int rest = int(p.in % kWindow) / 2;
  const int64_t cv = windows * kWindowValues, cp = windows * kWindowBytes;
  for (int q = 0; q < PAIRS; ++q)
    for (int r = 0; r < RB; ++r) {
      if constexpr (S == 2) acc[0][q][r] = _mm256_add_ps(acc[0][q][r], acc[1][q][r]);
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[0][q][r]), _mm256_extractf128_ps(acc[0][q][r], 1));
      s = _mm_hadd_ps(s, s);  // A's sum in lane 0, B's in lane 1
      float sum[2] = {_mm_cvtss_f32(s), _mm_cvtss_f32(_mm_movehdup_ps(s))};
      for (int h = 0; h < 2; ++h) {
        const int64_t o = o0 + 2 * q + h;
        if (rest) sum[h] += two_four_rest<BF16>(v[2 * q + h] + cv, pos[2 * q + h] + cp, rest, x + r * p.ldx + cv * 2);
        p.y[(r0 + r) * p.out + o] = sum[h] + (p.bias ? p.bias[o] : 0.0f);
      }
    }
}

template <bool BF16, int PAIRS, int RB>
SF_TARGET void two_four_features(const Problem& p, const NMWeight& w, int64_t begin, int64_t end, int64_t r0) {
  int64_t o = begin;
  for (; o + 2 * PAIRS <= end; o += 2 * PAIRS) two_four_tile<BF16, PAIRS, RB>(p, w, o, r0);
  for (; o + 2 <= end; o += 2) two_four_tile<BF16, 1, RB>(p, w, o, r0);
  if (o < end) tile<NMDecoder<BF16, 1>, 1, RB>(p, NMDecoder<BF16, 1>{w, p.in}, o, r0);
}

// Two pairs (four features, as the other layouts) for one or two rows of x, one pair from three rows on; four pairs
// measured slower streamed (16 streams of rows and positions per core).
template <bool BF16>
SF_TARGET void two_four(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, p.rows - r0)) {
      case 1: two_four_features<BF16, 2, 1>(p, w, begin, end, r0); break;
      case 2: two_four_features<BF16, 2, 2>(p, w, begin, end, r0); break;
      case 3: two_four_features<BF16, 1, 3>(p, w, begin, end, r0); break;
      default: two_four_features<BF16, 1, 4>(p, w, begin, end, r0); break;
    }
  }
}

// ---- unpack: whole rows decoded to fp32, for a GEMM (prefill) ----------------------------------------------------

template <class Decoder>
SF_TARGET void unpack_rows(const Problem& p, const Decoder& dec, float* dense, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    typename Decoder::Cursor cur = dec.start(o);
    const typename Decoder::Tile t = dec.tile(o);
    float* row = dense + o * p.ldx;  // ldx is a multiple of 32: a last partial unit fits the row
    for (int64_t c = 0; c < dec.chunks(); ++c, row += kWindow) {
      SF_UNROLL
      for (int u = 0; u < kUnits; ++u) _mm256_storeu_ps(row + u * kUnit, dec.load(cur, u, t));
    }
    for (int u = 0; u < dec.rest_units(); ++u, row += kUnit) _mm256_storeu_ps(row, dec.load_rest(cur, u));
    if (dec.tail()) _mm256_storeu_ps(row, dec.load_tail(cur));
  }
}

template <template <bool, int> class Decoder, class... Args>
SF_TARGET void unpack_typed(const Problem& p, float* dense, int64_t begin, int64_t end, const Args&... args) {
  if (p.bf16) {
    unpack_rows(p, Decoder<true, 1>{args...}, dense, begin, end);
  } else {
    unpack_rows(p, Decoder<false, 1>{args...}, dense, begin, end);
  }
}

// ---- column layout (activation sparsity): acc[out] += x[i] * W[:, i] over listed inputs -------------------------

// One listed input's weight row, read 32 outputs (four units) per step. A port of the AVX-512 kernels' ColumnRow,
// not a template shared with it: vector width, tails (masked stores there, a bounce buffer here) and the bitmask
// decode differ, and what they share is a few lines of pointer set-up and prefetching.
template <bool BF16, bool MASKED>
struct ColumnRow {
  // Bytes requested ahead within a row, and of each next-pass row's head. Zen 3 (stand-alone driver, 2 threads,
  // streamed, 2048 x 2048 fp16): dense columns 563 us at 512 (the AVX-512 kernels' choice), 497 at 256, 530 at 128.
  static constexpr int64_t kAhead = 256;
  const uint16_t* p;
  const uint64_t* masks;
  __m256 x;

  ColumnRow() = default;
  SF_INLINE ColumnRow(const ColumnWeight& w, int64_t i, int64_t words, int64_t out, float xi)
      : p(w.values + (MASKED ? w.bases[i] : i * out)), masks(MASKED ? w.masks + i * words : nullptr),
        x(_mm256_set1_ps(xi)) {}

  SF_INLINE void prefetch_head() const {
    for (int64_t b = 0; b < kAhead; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_T0);
    if (MASKED)
      for (int64_t b = 0; b < kAhead / 8; b += 64) _mm_prefetch((const char*)masks + b, _MM_HINT_T0);
  }

  // the weights of outputs [j, j + 32), then step past them
  SF_INLINE void next(int64_t j, __m256 (&v)[kUnits]) {
    _mm_prefetch((const char*)p + kAhead, _MM_HINT_T0);
    if constexpr (!MASKED) {
      SF_UNROLL
      for (int u = 0; u < kUnits; ++u) v[u] = widen<BF16>(_mm_loadu_si128((const __m128i*)(p + u * kUnit)));
      p += kWindow;
    } else {
      if ((j & 127) == 0) _mm_prefetch((const char*)(masks + (j >> 6)) + kAhead / 8, _MM_HINT_T0);
      const uint32_t m = uint32_t(masks[j >> 6] >> (j & 63));
      SF_UNROLL
      for (int u = 0; u < kUnits; ++u) v[u] = expand_unit<BF16>(p, (m >> (kUnit * u)) & 0xFFu);
    }
  }
};

// R listed inputs per pass over the accumulator, so each 32 outputs cost one load and one store of it per R
// (decode, FMA) pairs; the R weight rows are R contiguous streams, and the next pass's rows are requested early.
template <bool BF16, bool MASKED, int R>
SF_TARGET void column_pass(const float* x, const int32_t* active, const int32_t* following, const ColumnWeight& w,
                           int64_t out, float* acc) {
  const int64_t words = (out + 63) / 64;
  ColumnRow<BF16, MASKED> rows[R];
  SF_UNROLL
  for (int r = 0; r < R; ++r) rows[r] = ColumnRow<BF16, MASKED>(w, active[r], words, out, x[active[r]]);
  if (following)
    for (int r = 0; r < R; ++r) ColumnRow<BF16, MASKED>(w, following[r], words, out, 0.0f).prefetch_head();
  const int64_t full = out / kWindow * kWindow;
  __m256 v[kUnits], sum[kUnits];
  for (int64_t j = 0; j < full; j += kWindow) {
    SF_UNROLL
    for (int u = 0; u < kUnits; ++u) sum[u] = _mm256_loadu_ps(acc + j + u * kUnit);
    SF_UNROLL
    for (int r = 0; r < R; ++r) {
      rows[r].next(j, v);
      SF_UNROLL
      for (int u = 0; u < kUnits; ++u) sum[u] = _mm256_fmadd_ps(v[u], rows[r].x, sum[u]);
    }
    SF_UNROLL
    for (int u = 0; u < kUnits; ++u) _mm256_storeu_ps(acc + j + u * kUnit, sum[u]);
  }
  if (full < out) {  // the last outputs: reads past the row stay inside the values' padding, lanes past out unused
    alignas(32) float last[kWindow] = {};
    for (int r = 0; r < R; ++r) {
      rows[r].next(full, v);
      for (int u = 0; u < kUnits; ++u)
        _mm256_store_ps(last + u * kUnit, _mm256_fmadd_ps(v[u], rows[r].x, _mm256_load_ps(last + u * kUnit)));
    }
    for (int64_t k = 0; k < out - full; ++k) acc[full + k] += last[k];
  }
}

template <bool BF16, bool MASKED>
SF_TARGET void column_rows(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t out,
                           float* acc) {
  // Listed inputs per pass. Zen 3 (as kAhead): dense columns 16 rows 990 us, 8 rows 497, 4 rows 506; a 50% bitmask
  // with 40% of inputs skipped 449 us at 16 (8 for the bitmask), 381 at 8, 399 at 4.
  constexpr int kRows = 8;
  int64_t a = 0;
  for (; a + kRows <= count; a += kRows)
    column_pass<BF16, MASKED, kRows>(x, active + a, a + 2 * kRows <= count ? active + a + kRows : nullptr, w, out,
                                     acc);
  for (; a + 4 <= count; a += 4) column_pass<BF16, MASKED, 4>(x, active + a, nullptr, w, out, acc);
  for (; a < count; ++a) column_pass<BF16, MASKED, 1>(x, active + a, nullptr, w, out, acc);
}

// Whole input rows decoded to float32 (prefill): each row's outputs in order, 32 at a time as the passes read them
template <bool BF16, bool MASKED>
SF_TARGET void unpack_column_rows(const ColumnWeight& w, int64_t out, float* dense, int64_t begin, int64_t end) {
  const int64_t words = (out + 63) / 64, full = out / kWindow * kWindow;
  __m256 v[kUnits];
  for (int64_t i = begin; i < end; ++i) {
    ColumnRow<BF16, MASKED> row(w, i, words, out, 0.0f);
    float* target = dense + i * out;
    for (int64_t j = 0; j < full; j += kWindow) {
      row.next(j, v);
      SF_UNROLL
      for (int u = 0; u < kUnits; ++u) _mm256_storeu_ps(target + j + u * kUnit, v[u]);
    }
    if (full < out) {  // reads past the row stay inside the next row or the values' padding
      alignas(32) float last[kWindow];
      row.next(full, v);
      for (int u = 0; u < kUnits; ++u) _mm256_store_ps(last + u * kUnit, v[u]);
      std::copy(last, last + (out - full), target + full);
    }
  }
}

}  // namespace

void column(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t out, bool bf16,
            float* acc) {
  const bool masked = w.masks != nullptr;
  if (bf16) {
    (masked ? column_rows<true, true> : column_rows<true, false>)(x, active, count, w, out, acc);
  } else {
    (masked ? column_rows<false, true> : column_rows<false, false>)(x, active, count, w, out, acc);
  }
}

void unpack(const ColumnWeight& w, int64_t out, bool bf16, float* dense, int64_t begin, int64_t end) {
  const bool masked = w.masks != nullptr;
  if (bf16) {
    (masked ? unpack_column_rows<true, true> : unpack_column_rows<true, false>)(w, out, dense, begin, end);
  } else {
    (masked ? unpack_column_rows<false, true> : unpack_column_rows<false, false>)(w, out, dense, begin, end);
  }
}

void unpack(const Problem& p, const DenseWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_typed<DenseDecoder>(p, dense, begin, end, w, p.in);
}

void unpack(const Problem& p, const BitmaskWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_typed<BitmaskDecoder>(p, dense, begin, end, w, p.in, p.out);
}

void unpack(const Problem& p, const NMWeight& w, float* dense, int64_t begin, int64_t end) {
  unpack_typed<NMDecoder>(p, dense, begin, end, w, p.in);
}

void dense(const Problem& p, const DenseWeight& w, int64_t begin, int64_t end) {
  run_typed<DenseDecoder>(p, begin, end, w, p.in);
}

void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  run_typed<BitmaskDecoder>(p, begin, end, w, p.in, p.out);
}

void nm(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) {
  if (w.n == 2 && w.m == 4) return p.bf16 ? two_four<true>(p, w, begin, end) : two_four<false>(p, w, begin, end);
  run_typed<NMDecoder>(p, begin, end, w, p.in);
}

}  // namespace sf::avx2
#endif
