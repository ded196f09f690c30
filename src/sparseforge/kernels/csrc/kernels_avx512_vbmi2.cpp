// AVX-512 bitmask kernels with VBMI2: one 16-bit-lane expand per 32 values (row and column layouts). Dense and
// N:M need no VBMI2 and come from kernels_avx512.cpp.
#include "kernels.h"

#ifdef SF_X86
#define SF_TARGET_ISA "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,f16c,fma,popcnt,bmi,bmi2"
#define SF_VBMI2 1
#define SF_NS avx512_vbmi2
#include "avx512_impl.h"

namespace sf::avx512_vbmi2 {

void bitmask(const Problem& p, const BitmaskWeight& w, int64_t begin, int64_t end) {
  if (p.bf16) {
    run<ExpandKernel<BitmaskDecoder<true, true>>>(pair_split(p), BitmaskDecoder<true, true>{w, p.in, p.out}, begin,
                                                  end);
  } else {
    run<ExpandKernel<BitmaskDecoder<false>>>(p, BitmaskDecoder<false>{w, p.in, p.out}, begin, end);
  }
}

void unpack(const Problem& p, const BitmaskWeight& w, float* dense, int64_t begin, int64_t end) {
  if (p.bf16) {
    unpack_rows(p, BitmaskDecoder<true>{w, p.in, p.out}, dense, begin, end);
  } else {
    unpack_rows(p, BitmaskDecoder<false>{w, p.in, p.out}, dense, begin, end);
  }
}

}  // namespace sf::avx512_vbmi2
#endif
