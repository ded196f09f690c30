// AVX-512 kernels, included by kernels_avx512.cpp and kernels_avx512_vbmi2.cpp. The includer defines
// SF_TARGET_ISA (the target attribute string), SF_VBMI2 (0/1) and SF_NS (the namespace of its entry points), so the
// two copies never share a symbol and each is compiled only for the instructions its name promises.
//
// Work unit: OB output features x RB rows of x, one accumulator each (OB*RB independent FMA chains), over chunks
// of 32 inputs. Every weight chunk is decoded once into two vectors of 16 fp32 and used for RB rows; every x
// chunk is loaded once and used for OB output features.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

#define SF_INLINE __attribute__((always_inline, target(SF_TARGET_ISA))) inline
#define SF_TARGET __attribute__((target(SF_TARGET_ISA)))

namespace sf::SF_NS {
namespace {

constexpr int kOB = 4;       // output features per work unit
constexpr int kMaxRows = 4;  // rows of x per work unit

template <bool BF16>
SF_INLINE __m512 widen(__m256i h) {
  if constexpr (BF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}

template <bool BF16>
SF_INLINE void widen32(__m512i raw, __m512& lo, __m512& hi) {
  lo = widen<BF16>(_mm512_castsi512_si256(raw));
  hi = widen<BF16>(_mm512_extracti64x4_epi64(raw, 1));
}

// The bf16 values of a chunk as fp32 without a conversion: bf16 is the top half of fp32, so the even inputs (low
// halves of the 32-bit lanes) shift up and the odd ones (high halves) are masked, two single-uop integer operations
// where widening in input order costs two zero-extensions and an extract on the shuffle port. The chunk's x must then
// be in pair-split order (pair_split below). On this project's Xeon a bf16 bitmask product at 70% sparsity ran
// 2.55x the dense fp16 kernel this way against 1.89x in input order (4096 x 4096, streamed from memory).
SF_INLINE void widen_pairs(__m512i raw, __m512& even, __m512& odd) {
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xFFFF0000u))));
}

// Widening for a dot product: pair-split for bf16 when the kernel's x is pair-split (PAIRS), else in input order.
template <bool BF16, bool PAIRS>
SF_INLINE void widen_for_dot(__m512i raw, __m512& lo, __m512& hi) {
  if constexpr (BF16 && PAIRS) {
    widen_pairs(raw, lo, hi);
  } else {
    widen32<BF16>(raw, lo, hi);
  }
}

// Whole chunks of 32 of values[0, count) reordered to pair-split (16 even, then 16 odd) or back: for x before a
// pair-split dot product, and for the column kernels' accumulators around their passes.
SF_TARGET void pair_split_chunks(float* values, int64_t count, bool back) {
  alignas(64) int32_t to_split[2][16], to_natural[2][16];
  for (int l = 0; l < 16; ++l) {
    to_split[0][l] = 2 * l, to_split[1][l] = 2 * l + 1;  // from the natural chunk (a: 0-15, b: 16-31)
    to_natural[0][l] = (l % 2) * 16 + l / 2, to_natural[1][l] = ((16 + l) % 2) * 16 + (16 + l) / 2;
  }
  const int32_t(&index)[2][16] = back ? to_natural : to_split;
  const __m512i first = _mm512_load_si512(index[0]), second = _mm512_load_si512(index[1]);
  for (int64_t j = 0; j + kWindow <= count; j += kWindow) {
    const __m512 a = _mm512_loadu_ps(values + j), b = _mm512_loadu_ps(values + j + 16);
    _mm512_storeu_ps(values + j, _mm512_permutex2var_ps(a, first, b));
    _mm512_storeu_ps(values + j + 16, _mm512_permutex2var_ps(a, second, b));
  }
}

// Rows of x (stride p.ldx, a multiple of 32) pair-split into a buffer of the calling thread; the problem returned
// reads x from there.
SF_TARGET Problem pair_split(const Problem& p) {
  thread_local std::vector<float> split;
  split.assign(p.x, p.x + p.rows * p.ldx);
  pair_split_chunks(split.data(), p.rows * p.ldx, false);
  Problem q = p;
  q.x = split.data();
  return q;
}

SF_INLINE float finish(__m512 acc, const float* bias, int64_t o) {
  return _mm512_reduce_add_ps(acc) + (bias ? bias[o] : 0.0f);
}

// ---- decoders: one chunk of 32 inputs of one output feature -> two vectors of 16 fp32 -------------------------

// PAIRS: chunks widened pair-split for a dot product with pair-split x (bf16 only; unpacking keeps input order)
template <bool BF16, bool PAIRS = false>
struct DenseDecoder {
  const DenseWeight& w;
  int64_t in;
  struct Cursor {
    const uint16_t* p;
  };
  Cursor start(int64_t o) const { return {w.values + o * in}; }
  // what a work unit's rows prefetch: the same place kOB rows on is what the next work unit reads, one line ahead
  // per line read, so short rows (a few KiB) stream at full speed instead of each restarting the hardware prefetcher
  struct Tile {
    int64_t near;
  };
  Tile tile(int64_t) const { return {kOB * in}; }
  SF_INLINE void step(const Tile&, int64_t) const {}
  int64_t full_chunks() const { return in / kWindow; }
  __mmask32 tail_mask() const { return __mmask32((1u << (in % kWindow)) - 1u); }
  SF_INLINE void load(Cursor& c, __m512& lo, __m512& hi, const Tile& t) const {
    _mm_prefetch((const char*)(c.p + t.near), _MM_HINT_T0);
    widen_for_dot<BF16, PAIRS>(_mm512_loadu_si512(c.p), lo, hi);
    c.p += kWindow;
  }
  SF_INLINE void load_tail(Cursor& c, __mmask32 k, __m512& lo, __m512& hi) const {
    widen_for_dot<BF16, PAIRS>(_mm512_maskz_loadu_epi16(k, c.p), lo, hi);
  }
};

// Masks beyond `in` are zero and x is zero-padded, so every chunk is a full one. PAIRS as for DenseDecoder (with
// VBMI2 only: without it, values are widened before they are expanded, in input order).
template <bool BF16, bool PAIRS = false>
struct BitmaskDecoder {
  static_assert(!PAIRS || SF_VBMI2, "pair-split widening needs the 16-bit expand");
  const BitmaskWeight& w;
  int64_t in;
  int64_t out;

  struct Cursor {
    const uint16_t* p;
    const uint32_t* mask;
  };
  int64_t chunks() const { return (in + kWindow - 1) / kWindow; }
  Cursor start(int64_t o) const { return {w.values + w.offsets[o], w.masks + o * chunks()}; }
  int64_t full_chunks() const { return chunks(); }
  __mmask32 tail_mask() const { return 0; }
  // What a work unit prefetches, settled once per unit so the chunk loop carries no prefetch state per row: each
  // row requests the place kOB rows on (what the next unit reads) into L1 and twice as far into L2, and the unit
  // requests the next unit's masks, which lie together (kOB masks per chunk). One distance for the unit's rows (the
  // first row's) is close enough for a prefetch. Against per-row distances, a far request every other chunk for
  // some rows only, and masks requested row by row (stand-alone driver, 2 threads, streamed, docs/kernels.md):
  // TinyLlama-1.1B's bf16 products gained 5-9% (2048 x 5632 at 70% 2.03x -> 2.22x over dense); fp16 products,
  // whose widening keeps the core busy, moved within 2%.
  struct Tile {
    int64_t near, far;
    const uint32_t* masks;
  };
  Tile tile(int64_t o) const {
    const int64_t near = o + kOB <= out ? w.offsets[o + kOB] - w.offsets[o] : 0;
    return {near, 2 * near, w.masks + std::min(o + kOB, out) * chunks()};
  }
  // k: the chunk's index in the unit's rows
  SF_INLINE void step(const Tile& t, int64_t k) const {
    _mm_prefetch((const char*)(t.masks + kOB * k), _MM_HINT_T0);
  }
  SF_INLINE void load(Cursor& c, __m512& lo, __m512& hi, const Tile& t) const {
    _mm_prefetch((const char*)(c.p + t.near), _MM_HINT_T0);
    _mm_prefetch((const char*)(c.p + t.far), _MM_HINT_T1);
    const uint32_t m = *c.mask++;
#if SF_VBMI2
    // one expand places the kept 16-bit values at their inputs (values are padded, the full load is safe)
    widen_for_dot<BF16, PAIRS>(_mm512_maskz_expand_epi16(_cvtu32_mask32(m), _mm512_loadu_si512(c.p)), lo, hi);
    c.p += _mm_popcnt_u32(m);
#else
    // without VBMI2: widen the next 16 kept values, then expand them as 32-bit lanes, once per half
    const uint32_t m0 = m & 0xFFFFu, m1 = m >> 16;
    lo = _mm512_maskz_expand_ps(_cvtu32_mask16(m0), widen<BF16>(_mm256_loadu_si256((const __m256i*)c.p)));
    c.p += _mm_popcnt_u32(m0);
    hi = _mm512_maskz_expand_ps(_cvtu32_mask16(m1), widen<BF16>(_mm256_loadu_si256((const __m256i*)c.p)));
    c.p += _mm_popcnt_u32(m1);
#endif
  }
  SF_INLINE void load_tail(Cursor&, __mmask32, __m512&, __m512&) const {}
};

// ---- unpack: whole rows decoded to fp32, for a GEMM (prefill) -----------------------------------------------

template <class Decoder>
SF_TARGET void unpack_rows(const Problem& p, const Decoder& dec, float* dense, int64_t begin, int64_t end) {
  __m512 lo, hi;
  for (int64_t o = begin; o < end; ++o) {
    typename Decoder::Cursor cur = dec.start(o);
    const typename Decoder::Tile t = dec.tile(o);
    float* row = dense + o * p.ldx;
    const int64_t full = dec.full_chunks();
    for (int64_t c = 0; c < full; ++c) {
      dec.load(cur, lo, hi, t);
      _mm512_storeu_ps(row + c * kWindow, lo);
      _mm512_storeu_ps(row + c * kWindow + 16, hi);
    }
    if (const __mmask32 k = dec.tail_mask()) {  // ldx is a multiple of 32: the tail chunk fits the row
      dec.load_tail(cur, k, lo, hi);
      _mm512_storeu_ps(row + full * kWindow, lo);
      _mm512_storeu_ps(row + full * kWindow + 16, hi);
    }
  }
}

// ---- expand kernel: decoded chunks times x --------------------------------------------------------------------

template <int OB, int RB>
SF_INLINE void fma_chunk(__m512 (&acc)[OB][RB], const __m512 (&w)[OB][2], const float* x, int64_t ldx) {
  SF_UNROLL
  for (int r = 0; r < RB; ++r) {
    const __m512 x0 = _mm512_loadu_ps(x + r * ldx), x1 = _mm512_loadu_ps(x + r * ldx + 16);
    SF_UNROLL
    for (int j = 0; j < OB; ++j) acc[j][r] = _mm512_fmadd_ps(w[j][1], x1, _mm512_fmadd_ps(w[j][0], x0, acc[j][r]));
  }
}

template <class Decoder>
struct ExpandKernel {
  using Context = Decoder;
  template <int OB, int RB>
  SF_TARGET static void tile(const Problem& p, const Decoder& dec, int64_t o0, int64_t r0) {
    typename Decoder::Cursor cur[OB];
    for (int j = 0; j < OB; ++j) cur[j] = dec.start(o0 + j);
    __m512 acc[OB][RB];
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
    const float* x = p.x + r0 * p.ldx;
    __m512 w[OB][2];
    const int64_t full = dec.full_chunks();
    const typename Decoder::Tile t = dec.tile(o0);
    for (int64_t c = 0; c < full; ++c) {
      dec.step(t, c);
      SF_UNROLL
      for (int j = 0; j < OB; ++j) dec.load(cur[j], w[j][0], w[j][1], t);
      fma_chunk<OB, RB>(acc, w, x + c * kWindow, p.ldx);
    }
    if (const __mmask32 k = dec.tail_mask()) {
      SF_UNROLL
      for (int j = 0; j < OB; ++j) dec.load_tail(cur[j], k, w[j][0], w[j][1]);
      fma_chunk<OB, RB>(acc, w, x + full * kWindow, p.ldx);
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < RB; ++r) p.y[(r0 + r) * p.out + o0 + j] = finish(acc[j][r], p.bias, o0 + j);
  }
};

// ---- gather kernel (N:M): kept values times x gathered from the 32-input window -------------------------------

// Per 16-lane batch of a window's kept values: where each lane's position bits are and its group's first input.
struct GatherContext {
  const NMWeight& w;
  int64_t in;
  int kept;         // kept values per full window
  int tail_kept;    // kept values in the last, partial window (0 if none)
  int64_t wbytes;   // position bytes per full window
  int64_t row_values;
  __m512i word[2], word_next[2], shift[2], shift_next[2], base[2];
  __mmask16 full_mask[2], tail_mask[2];

  SF_TARGET GatherContext(const NMWeight& w_, int64_t in_) : w(w_), in(in_) {
    const int bits = nm_bits(w.m);
    kept = kWindow / w.m * w.n;
    tail_kept = int(in % kWindow) / w.m * w.n;
    wbytes = nm_window_bytes(kept, bits);
    row_values = in / w.m * w.n;
    for (int b = 0; b < 2; ++b) {
      alignas(64) int32_t wd[16], wn[16], sh[16], shn[16], bs[16];
      for (int l = 0; l < 16; ++l) {
        const int i = 16 * b + l, bit = i * bits;
        wd[l] = bit / 32, wn[l] = bit / 32 + 1, sh[l] = bit % 32, shn[l] = 32 - bit % 32;
        bs[l] = i / w.n * w.m;
      }
      word[b] = _mm512_load_si512(wd), word_next[b] = _mm512_load_si512(wn);
      shift[b] = _mm512_load_si512(sh), shift_next[b] = _mm512_load_si512(shn), base[b] = _mm512_load_si512(bs);
      full_mask[b] = _cvtu32_mask16(lanes(kept - 16 * b));
      tail_mask[b] = _cvtu32_mask16(lanes(tail_kept - 16 * b));
    }
  }
  static uint32_t lanes(int count) { return count <= 0 ? 0u : count >= 16 ? 0xFFFFu : (1u << count) - 1u; }
};

template <bool BF16, int BITS>
struct GatherKernel {
  using Context = GatherContext;

  // input index (0..31 inside the window) of each of 16 kept values
  SF_INLINE static __m512i indices(const GatherContext& g, const uint8_t* pos, int b) {
    const __m512i bits = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)pos));
    __m512i v = _mm512_srlv_epi32(_mm512_permutexvar_epi32(g.word[b], bits), g.shift[b]);
    if constexpr (BITS == 3) {  // a 3-bit field may straddle two 32-bit words
      v = _mm512_or_si512(v, _mm512_sllv_epi32(_mm512_permutexvar_epi32(g.word_next[b], bits), g.shift_next[b]));
    }
    return _mm512_add_epi32(_mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)), g.base[b]);
  }

  template <int OB, int RB>
  SF_TARGET static void tile(const Problem& p, const GatherContext& g, int64_t o0, int64_t r0) {
    const uint16_t* vals[OB];
    const uint8_t* pos[OB];
    for (int j = 0; j < OB; ++j) {
      vals[j] = g.w.values + (o0 + j) * g.row_values;
      pos[j] = g.w.positions + (o0 + j) * g.w.pos_stride;
    }
    __m512 acc[OB][RB];
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
    const float* x = p.x + r0 * p.ldx;
    const int64_t windows = (p.in + kWindow - 1) / kWindow, full = p.in / kWindow;
    for (int64_t win = 0; win < windows; ++win) {
      const __mmask16* mask = win < full ? g.full_mask : g.tail_mask;
      for (int b = 0; b < 2 && mask[b]; ++b) {
        __m512 wv[OB];
        __m512i idx[OB];
        SF_UNROLL
        for (int j = 0; j < OB; ++j) {
          _mm_prefetch((const char*)(vals[j] + 16 * b + kOB * g.row_values), _MM_HINT_T0);
          wv[j] = widen<BF16>(_mm256_maskz_loadu_epi16(mask[b], vals[j] + 16 * b));
          idx[j] = indices(g, pos[j], b);
        }
        SF_UNROLL
        for (int r = 0; r < RB; ++r) {
          const float* xw = x + r * p.ldx + win * kWindow;
          const __m512 xlo = _mm512_loadu_ps(xw), xhi = _mm512_loadu_ps(xw + 16);
          SF_UNROLL
          for (int j = 0; j < OB; ++j)
            acc[j][r] = _mm512_fmadd_ps(wv[j], _mm512_permutex2var_ps(xlo, idx[j], xhi), acc[j][r]);
        }
      }
      for (int j = 0; j < OB; ++j) {
        _mm_prefetch((const char*)(pos[j] + kOB * g.w.pos_stride), _MM_HINT_T0);
        vals[j] += g.kept, pos[j] += g.wbytes;
      }
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < RB; ++r) p.y[(r0 + r) * p.out + o0 + j] = finish(acc[j][r], p.bias, o0 + j);
  }
};

// ---- N:M unpack (prefill): each window's positions become the window's bitmask, expanded as the bitmask's -----

// The bitmask comes from the gather kernel's input indices, 16 kept values at a time (one bit set per lane, then
// OR-ed across lanes): a scalar loop over the position fields made 2:4 prefill 0.83-0.88x of dense where bitmask
// prefill ran 1.04-1.13x (128 rows, the default model's and a TinyLlama product's shapes).
template <bool BF16, int BITS>
SF_TARGET void unpack_nm_rows(const Problem& p, const NMWeight& w, float* dense, int64_t begin, int64_t end) {
  const GatherContext g(w, p.in);
  const int64_t windows = (p.in + kWindow - 1) / kWindow, full = p.in / kWindow;
  const __m512i one = _mm512_set1_epi32(1);
  __m512 lo, hi;
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* v = w.values + o * g.row_values;
    const uint8_t* pos = w.positions + o * w.pos_stride;
    float* row = dense + o * p.ldx;
    for (int64_t win = 0; win < windows; ++win, pos += g.wbytes) {
      const int64_t start = win * kWindow;
      const __mmask16* lanes = win < full ? g.full_mask : g.tail_mask;
      uint32_t m = 0;
      for (int b = 0; b < 2 && lanes[b]; ++b)
        m |= uint32_t(_mm512_mask_reduce_or_epi32(
            lanes[b], _mm512_sllv_epi32(one, GatherKernel<BF16, BITS>::indices(g, pos, b))));
      // values carry no padding: loads take only the kept count (ldx is a multiple of 32, so the row has room)
#if SF_VBMI2
      widen32<BF16>(_mm512_maskz_expandloadu_epi16(_cvtu32_mask32(m), v), lo, hi);
      v += _mm_popcnt_u32(m);
#else
      const uint32_t m0 = m & 0xFFFFu, m1 = m >> 16;
      const uint32_t c0 = _mm_popcnt_u32(m0), c1 = _mm_popcnt_u32(m1);
      lo = _mm512_maskz_expand_ps(_cvtu32_mask16(m0),
                                  widen<BF16>(_mm256_maskz_loadu_epi16(__mmask16((1u << c0) - 1u), v)));
      v += c0;
      hi = _mm512_maskz_expand_ps(_cvtu32_mask16(m1),
                                  widen<BF16>(_mm256_maskz_loadu_epi16(__mmask16((1u << c1) - 1u), v)));
      v += c1;
#endif
      _mm512_storeu_ps(row + start, lo);
      _mm512_storeu_ps(row + start + 16, hi);
    }
  }
}

// ---- column layout (activation sparsity): acc[out] += x[i] * W[:, i] over listed inputs -----------------------

// One listed input's weight row, read 32 outputs per step.
template <bool BF16, bool MASKED>
struct ColumnRow {
  // Bytes prefetched ahead within a row (short rows outrun the hardware prefetcher), and of each next-pass row's
  // head. 1024 issued 128 head requests per pass at once; 512 (stand-alone driver, 2 threads, streamed, bf16,
  // 50% bitmask, 40% of inputs skipped): 2048 x 2048 183-194 -> 160-161 us, 2560 x 2048 217 -> 196 us, 2048 x 5632
  // 495 -> 460 us, 11264 x 2048 645 -> 630 us; dense columns 2048 x 2048 331 -> 324 us; 2048 was slower (217 us).
  static constexpr int64_t kAhead = 512;
  const uint16_t* p;
  const uint64_t* masks;
  __m512 x;

  ColumnRow() = default;
  SF_INLINE ColumnRow(const ColumnWeight& w, int64_t i, int64_t words, int64_t out, float xi)
      : p(w.values + (MASKED ? w.bases[i] : i * out)), masks(MASKED ? w.masks + i * words : nullptr),
        x(_mm512_set1_ps(xi)) {}

  // the first bytes of the row, requested one pass before it is read
  SF_INLINE void prefetch_head() const {
    for (int64_t b = 0; b < kAhead; b += 64) _mm_prefetch((const char*)p + b, _MM_HINT_T0);
    if (MASKED)
      for (int64_t b = 0; b < kAhead / 8; b += 64) _mm_prefetch((const char*)masks + b, _MM_HINT_T0);
  }

  // the weights of outputs [j, j + 32) (pair-split with PAIRS, as widen_pairs), then step past them
  template <bool PAIRS>
  SF_INLINE void next(int64_t j, __m512& lo, __m512& hi) {
    _mm_prefetch((const char*)p + kAhead, _MM_HINT_T0);
    if constexpr (!MASKED) {
      widen_for_dot<BF16, PAIRS>(_mm512_loadu_si512(p), lo, hi);
      p += 32;
    } else {
      if ((j & 127) == 0) _mm_prefetch((const char*)(masks + (j >> 6)) + kAhead / 8, _MM_HINT_T0);
      const uint32_t m = uint32_t(masks[j >> 6] >> (j & 63));
#if SF_VBMI2
      widen_for_dot<BF16, PAIRS>(_mm512_maskz_expandloadu_epi16(_cvtu32_mask32(m), p), lo, hi);
      p += _mm_popcnt_u32(m);
#else
      static_assert(!PAIRS, "pair-split widening needs the 16-bit expand");
      const uint32_t m0 = m & 0xFFFFu, m1 = m >> 16;
      lo = _mm512_maskz_expand_ps(_cvtu32_mask16(m0), widen<BF16>(_mm256_loadu_si256((const __m256i*)p)));
      p += _mm_popcnt_u32(m0);
      hi = _mm512_maskz_expand_ps(_cvtu32_mask16(m1), widen<BF16>(_mm256_loadu_si256((const __m256i*)p)));
      p += _mm_popcnt_u32(m1);
#endif
    }
  }
};

// R listed inputs per pass over the accumulator, so each 32 outputs cost one load and one store of it per R
// (decode, FMA) pairs; the R weight rows are R contiguous streams, and the next pass's rows are requested early.
// PAIRS: the accumulator's whole chunks of 32 outputs are pair-split (its last, partial chunk is not).
template <bool BF16, bool MASKED, int R, bool PAIRS>
SF_TARGET void column_pass(const float* x, const int32_t* active, const int32_t* following, const ColumnWeight& w,
                           int64_t out, float* acc) {
  const int64_t words = (out + 63) / 64;
  ColumnRow<BF16, MASKED> rows[R];
  SF_UNROLL
  for (int r = 0; r < R; ++r) rows[r] = ColumnRow<BF16, MASKED>(w, active[r], words, out, x[active[r]]);
  if (following)
    for (int r = 0; r < R; ++r) ColumnRow<BF16, MASKED>(w, following[r], words, out, 0.0f).prefetch_head();
  const int64_t full = out / 32 * 32;
  __m512 lo, hi;
  for (int64_t j = 0; j < full; j += 32) {
    __m512 sum_lo = _mm512_loadu_ps(acc + j), sum_hi = _mm512_loadu_ps(acc + j + 16);
    SF_UNROLL
    for (int r = 0; r < R; ++r) {
      rows[r].template next<PAIRS>(j, lo, hi);
      sum_lo = _mm512_fmadd_ps(lo, rows[r].x, sum_lo);
      sum_hi = _mm512_fmadd_ps(hi, rows[r].x, sum_hi);
    }
    _mm512_storeu_ps(acc + j, sum_lo);
    _mm512_storeu_ps(acc + j + 16, sum_hi);
  }
  if (full < out) {  // the last outputs: reads past the row stay inside the values' padding, lanes past out unused
    const uint32_t keep = uint32_t((uint64_t(1) << (out - full)) - 1u);
    const __mmask16 k_lo = _cvtu32_mask16(keep & 0xFFFFu), k_hi = _cvtu32_mask16(keep >> 16);
    __m512 sum_lo = _mm512_maskz_loadu_ps(k_lo, acc + full), sum_hi = _mm512_maskz_loadu_ps(k_hi, acc + full + 16);
    SF_UNROLL
    for (int r = 0; r < R; ++r) {
      rows[r].template next<false>(full, lo, hi);
      sum_lo = _mm512_fmadd_ps(lo, rows[r].x, sum_lo);
      sum_hi = _mm512_fmadd_ps(hi, rows[r].x, sum_hi);
    }
    _mm512_mask_storeu_ps(acc + full, k_lo, sum_lo);
    _mm512_mask_storeu_ps(acc + full + 16, k_hi, sum_hi);
  }
}

template <bool BF16, bool MASKED, bool PAIRS>
SF_TARGET void column_passes(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w,
                             int64_t out, float* acc) {
  // Listed inputs per pass: more rows in flight hide the start of each short row (TinyLlama decode with 40% of
  // inputs skipped: 4 rows 1.24x over the dense row kernel, 8 1.33x, 16 1.40x, 32 1.36x); a bitmask row carries two
  // pointers, and past 8 rows they spill (stacked on 50% weight sparsity: 16 rows 1.61x, 8 rows 1.72x).
  constexpr int kRows = MASKED ? 8 : 16;
  int64_t a = 0;
  for (; a + kRows <= count; a += kRows)
    column_pass<BF16, MASKED, kRows, PAIRS>(x, active + a, a + 2 * kRows <= count ? active + a + kRows : nullptr, w,
                                            out, acc);
  for (; a + 4 <= count; a += 4) column_pass<BF16, MASKED, 4, PAIRS>(x, active + a, nullptr, w, out, acc);
  for (; a < count; ++a) column_pass<BF16, MASKED, 1, PAIRS>(x, active + a, nullptr, w, out, acc);
}

// Whole input rows decoded to float32 (prefill): each row's outputs in order, 32 at a time as the passes read them
template <bool BF16, bool MASKED>
SF_TARGET void unpack_column_rows(const ColumnWeight& w, int64_t out, float* dense, int64_t begin, int64_t end) {
  const int64_t words = (out + 63) / 64, full = out / 32 * 32;
  const uint32_t keep = uint32_t((uint64_t(1) << (out - full)) - 1u);  // the last, partial 32 outputs
  __m512 lo, hi;
  for (int64_t i = begin; i < end; ++i) {
    ColumnRow<BF16, MASKED> row(w, i, words, out, 0.0f);
    float* target = dense + i * out;
    for (int64_t j = 0; j < full; j += 32) {
      row.template next<false>(j, lo, hi);
      _mm512_storeu_ps(target + j, lo);
      _mm512_storeu_ps(target + j + 16, hi);
    }
    if (full < out) {  // reads past the row stay inside the next row or the values' padding
      row.template next<false>(full, lo, hi);
      _mm512_mask_storeu_ps(target + full, _cvtu32_mask16(keep & 0xFFFFu), lo);
      _mm512_mask_storeu_ps(target + full + 16, _cvtu32_mask16(keep >> 16), hi);
    }
  }
}

// bf16 weights decode pair-split (widen_pairs) wherever the layout allows, the accumulator split around the passes
template <bool BF16, bool MASKED>
SF_TARGET void column_rows(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t out,
                           float* acc) {
  if constexpr (BF16 && (!MASKED || SF_VBMI2)) {
    pair_split_chunks(acc, out, false);
    column_passes<BF16, MASKED, true>(x, active, count, w, out, acc);
    pair_split_chunks(acc, out, true);
  } else {
    column_passes<BF16, MASKED, false>(x, active, count, w, out, acc);
  }
}

// ---- driver: work units over [begin, end) x all rows ----------------------------------------------------------

template <class Kernel, int OB>
SF_TARGET void rows(const Problem& p, const typename Kernel::Context& ctx, int64_t o0) {
  for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, p.rows - r0)) {
      case 1: Kernel::template tile<OB, 1>(p, ctx, o0, r0); break;
      case 2: Kernel::template tile<OB, 2>(p, ctx, o0, r0); break;
      case 3: Kernel::template tile<OB, 3>(p, ctx, o0, r0); break;
      default: Kernel::template tile<OB, 4>(p, ctx, o0, r0); break;
    }
  }
}

template <class Kernel>
SF_TARGET void run(const Problem& p, const typename Kernel::Context& ctx, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + kOB <= end; o += kOB) rows<Kernel, kOB>(p, ctx, o);
  for (; o < end; ++o) rows<Kernel, 1>(p, ctx, o);
}

template <bool BF16>
SF_TARGET void unpack_nm_typed(const Problem& p, const NMWeight& w, float* dense, int64_t begin, int64_t end) {
  switch (nm_bits(w.m)) {
    case 2: unpack_nm_rows<BF16, 2>(p, w, dense, begin, end); break;
    case 3: unpack_nm_rows<BF16, 3>(p, w, dense, begin, end); break;
    default: unpack_nm_rows<BF16, 4>(p, w, dense, begin, end); break;
  }
}

}  // namespace

// entry points (kernels.h) defined here, one in each includer's namespace
void unpack(const Problem& p, const NMWeight& w, float* dense, int64_t begin, int64_t end) {
  if (p.bf16) {
    unpack_nm_typed<true>(p, w, dense, begin, end);
  } else {
    unpack_nm_typed<false>(p, w, dense, begin, end);
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

void column(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t out, bool bf16,
            float* acc) {
  const bool masked = w.masks != nullptr;
  if (bf16) {
    (masked ? column_rows<true, true> : column_rows<true, false>)(x, active, count, w, out, acc);
  } else {
    (masked ? column_rows<false, true> : column_rows<false, false>)(x, active, count, w, out, acc);
  }
}

}  // namespace sf::SF_NS
