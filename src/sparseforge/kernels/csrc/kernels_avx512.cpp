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
    run<ExpandKernel<DenseDecoder<true, true>>>(pair_split(p), DenseDecoder<true, true>{w, p.in}, begin, end);
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
