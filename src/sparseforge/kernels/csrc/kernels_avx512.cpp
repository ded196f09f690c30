// AVX-512 (F, BW, VL, DQ) kernels for all three layouts; the bitmask expands 32-bit lanes (no VBMI2 needed).
#include "kernels.h"

#ifdef SF_X86
#define SF_TARGET_ISA "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,popcnt,bmi,bmi2"
#define SF_VBMI2 0
#define SF_NS avx512
#include "avx512_impl.h"

namespace sf::avx512 {

void dense(const Problem& p, const DenseWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run<ExpandKernel<DenseDecoder<true>>>(p, DenseDecoder<true>{w, p.in}, begin, end);
  } else {
    run<ExpandKernel<DenseDecoder<false>>>(p, DenseDecoder<false>{w, p.in}, begin, end);
  }
}

void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run<ExpandKernel<BitmaskDecoder<true>>>(p, BitmaskDecoder<true>{w, p.in, p.out}, begin, end);
  } else {
    run<ExpandKernel<BitmaskDecoder<false>>>(p, BitmaskDecoder<false>{w, p.in, p.out}, begin, end);
  }
}

void unpack(const Problem& p, const DenseWeight& w, float* dense, int64_t begin, int64_t end) {
  if (p.bf16) {
    unpack_rows(p, DenseDecoder<true>{w, p.in}, dense, begin, end);
  } else {
    unpack_rows(p, DenseDecoder<false>{w, p.in}, dense, begin, end);
  }
}

void unpack(const Problem& p, const BitmaskWeight& w, float* dense, int64_t begin, int64_t end) {
  if (p.bf16) {
    unpack_rows(p, BitmaskDecoder<true>{w, p.in, p.out}, dense, begin, end);
  } else {
    unpack_rows(p, BitmaskDecoder<false>{w, p.in, p.out}, dense, begin, end);
  }
}

// Column kernel: four accumulators of 16 outputs per tile; per listed input one broadcast of x[i] and four
// (widen, FMA) pairs, the bitmask layout placing the kept values with one 32-bit-lane expand per quarter.
template <bool BF16, bool MASKED>
SF_TARGET static void column_tiles(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w,
                                   int64_t in, int64_t out, const float* bias, float* y, int64_t begin, int64_t end) {
  constexpr int64_t kAhead = 4;  // listed inputs prefetched ahead (their rows are not adjacent once some are skipped)
  for (int64_t t = begin; t < end; ++t) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const uint16_t* tile = w.values + (MASKED ? w.bases[t] : t * in * kTile);
    const uint64_t* masks = MASKED ? w.masks + t * in : nullptr;
    const uint32_t* offsets = MASKED ? w.offsets + t * in : nullptr;
    for (int64_t a = 0; a < count; ++a) {
      const int64_t i = active[a];
      const __m512 xi = _mm512_set1_ps(x[i]);
      if (a + kAhead < count) {
        const int64_t next = active[a + kAhead];
        const uint16_t* ahead = tile + (MASKED ? int64_t(offsets[next]) : next * kTile);
        _mm_prefetch((const char*)ahead, _MM_HINT_T0);
        _mm_prefetch((const char*)(ahead + 32), _MM_HINT_T0);
      }
      if constexpr (!MASKED) {
        const uint16_t* p = tile + i * kTile;
        SF_UNROLL
        for (int q = 0; q < 4; ++q)
          acc[q] = _mm512_fmadd_ps(widen<BF16>(_mm256_loadu_si256((const __m256i*)(p + 16 * q))), xi, acc[q]);
      } else {
        const uint64_t m = masks[i];
        const uint16_t* p = tile + offsets[i];
        SF_UNROLL
        for (int q = 0; q < 4; ++q) {
          const uint32_t mq = uint32_t(m >> (16 * q)) & 0xFFFFu;
          const __m512 v = _mm512_maskz_expand_ps(_cvtu32_mask16(mq),
                                                  widen<BF16>(_mm256_loadu_si256((const __m256i*)p)));
          p += _mm_popcnt_u32(mq);
          acc[q] = _mm512_fmadd_ps(v, xi, acc[q]);
        }
      }
    }
    for (int q = 0; q < 4; ++q) {
      const int64_t first = t * kTile + 16 * q;
      if (first >= out) break;
      const __mmask16 k = out - first >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (out - first)) - 1u);
      __m512 result = acc[q];
      if (bias) result = _mm512_add_ps(result, _mm512_maskz_loadu_ps(k, bias + first));
      _mm512_mask_storeu_ps(y + first, k, result);
    }
  }
}

void column(const float* x, const int32_t* active, int64_t count, const ColumnWeight& w, int64_t in, int64_t out,
            const float* bias, bool bf16, float* y, int64_t begin, int64_t end) {
  const bool masked = w.masks != nullptr;
  if (bf16) {
    (masked ? column_tiles<true, true> : column_tiles<true, false>)(x, active, count, w, in, out, bias, y, begin, end);
  } else {
    (masked ? column_tiles<false, true> : column_tiles<false, false>)(x, active, count, w, in, out, bias, y, begin,
                                                                       end);
  }
}

template <bool BF16>
static void nm_typed(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) {
  const GatherContext ctx(w, p.in);
  switch (nm_bits(w.m)) {
    case 2: run<GatherKernel<BF16, 2>>(p, ctx, begin, end); break;
    case 3: run<GatherKernel<BF16, 3>>(p, ctx, begin, end); break;
    default: run<GatherKernel<BF16, 4>>(p, ctx, begin, end); break;
  }
}

void nm(const Problem& p, const NMWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    nm_typed<true>(p, w, begin, end);
  } else {
    nm_typed<false>(p, w, begin, end);
  }
}

}  // namespace sf::avx512
#endif
