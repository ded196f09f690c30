// Plain C++ interface between the torch-facing driver (ops.cpp) and the per-ISA kernels.
//
// The kernel translation units include no torch headers: each is compiled with its own per-function target
// attributes, and an inline torch function instantiated there could otherwise be emitted with AVX-512 code and
// picked by the linker for every caller. Weights travel as raw 16-bit patterns (fp16 or bf16, see `bf16`).
#pragma once

#include <cstdint>

namespace sf {

// y[rows, out] = x[rows, in] @ W.T (+ bias); x is fp32 with row stride ldx >= round_up(in, 32), zero-padded.
struct Problem {
  const float* x;
  int64_t ldx;
  int64_t rows;
  float* y;
  int64_t out;
  int64_t in;
  const float* bias;  // nullptr when absent
  bool bf16;          // weights are bfloat16 (else float16)
};

// Per output row: ceil(in / 32) little-endian 32-bit masks (bit j of mask c = input 32c + j) and the row's kept
// values, compacted, starting at values[offsets[row]]. values has 32 readable padding elements past the end.
struct BitmaskWeight {
  const uint16_t* values;
  const uint32_t* masks;
  const int64_t* offsets;
};

// N kept of every M inputs. Row r holds in*n/m values at values + r*in*n/m and its positions at
// positions + r*pos_stride: per window of 32 inputs, ceil(k*bits/8) bytes (k = kept values in the window,
// bits = log2(m)), kept value i of the window at bits [i*bits, (i+1)*bits), little-endian, giving its place in its
// group of m. positions has 16 readable padding bytes past the end.
struct NMWeight {
  const uint16_t* values;
  const uint8_t* positions;
  int64_t pos_stride;
  int n;
  int m;
};

// Row-major [out, in], no padding.
struct DenseWeight {
  const uint16_t* values;
};

// Each kernel computes output features [begin, end) for all rows of x.
using BitmaskKernel = void (*)(const Problem&, const BitmaskWeight&, int64_t begin, int64_t end);
using NMKernel = void (*)(const Problem&, const NMWeight&, int64_t begin, int64_t end);
using DenseKernel = void (*)(const Problem&, const DenseWeight&, int64_t begin, int64_t end);
// Features [begin, end) decoded to float32 rows of stride p.ldx in `dense` (zeros past `in`), for prefill-sized x,
// where one decode and a GEMM beat decoding once per 4 rows. Vectorised paths only; elsewhere see portable::unpack.
using DenseUnpack = void (*)(const Problem&, const DenseWeight&, float* dense, int64_t begin, int64_t end);
using BitmaskUnpack = void (*)(const Problem&, const BitmaskWeight&, float* dense, int64_t begin, int64_t end);
using NMUnpack = void (*)(const Problem&, const NMWeight&, float* dense, int64_t begin, int64_t end);

// Column layout, for activation sparsity (TEAL): the transposed weight, one row per input feature holding that
// input's weights for every output, so the weights of an input whose activation is zero are one contiguous block
// that is never read (in tiles of a few outputs, hardware prefetchers still pulled the skipped weights in).
// Dense: values [in][out]. Bitmask: per input a row of ceil(out / 64) 64-bit masks of its kept outputs, and the
// kept values compacted, input i's from values + bases[i]. values has kColumnPad readable elements past the end.
constexpr int64_t kColumnPad = 32;
struct ColumnWeight {
  const uint16_t* values;
  const uint64_t* masks;  // nullptr: dense
  const int64_t* bases;   // bitmask only, [in + 1]
};
// acc[out] += sum over the listed inputs i of x[i] * W[:, i] (one row of x, the inputs active[0, count)).
using ColumnKernel = void (*)(const float* x, const int32_t* active, int64_t count, const ColumnWeight&, int64_t out,
                              bool bf16, float* acc);
// Inputs [begin, end) of a column weight as float32 rows of `out` values (stride out) in `dense`, zeros where
// pruned: W^T, for prefill-sized x (x @ W^T is then one GEMM with no transpose).
using ColumnUnpack = void (*)(const ColumnWeight&, int64_t out, bool bf16, float* dense, int64_t begin, int64_t end);

namespace portable {
void column(const float*, const int32_t*, int64_t, const ColumnWeight&, int64_t, bool, float*);
void bitmask(const Problem&, const BitmaskWeight&, int64_t, int64_t);
void nm(const Problem&, const NMWeight&, int64_t, int64_t);
void dense(const Problem&, const DenseWeight&, int64_t, int64_t);
// Features [begin, end) of a compressed weight as dense fp16/bf16 rows [out, in] (no padding) in `dense`: for many
// rows of x, where one decode and a GEMM beat decoding once per 4 rows. (Bits are copied, not converted: torch's
// vectorised conversion to float32 follows.)
void unpack(const Problem&, const BitmaskWeight&, uint16_t* dense, int64_t, int64_t);
void unpack(const Problem&, const NMWeight&, uint16_t* dense, int64_t, int64_t);
}  // namespace portable

#if defined(__x86_64__) && defined(__GNUC__)
#define SF_X86 1
namespace avx2 {
void bitmask(const Problem&, const BitmaskWeight&, int64_t, int64_t);
void nm(const Problem&, const NMWeight&, int64_t, int64_t);
void dense(const Problem&, const DenseWeight&, int64_t, int64_t);
void unpack(const Problem&, const DenseWeight&, float*, int64_t, int64_t);
void unpack(const Problem&, const BitmaskWeight&, float*, int64_t, int64_t);
void unpack(const Problem&, const NMWeight&, float*, int64_t, int64_t);
void column(const float*, const int32_t*, int64_t, const ColumnWeight&, int64_t, bool, float*);
void unpack(const ColumnWeight&, int64_t, bool, float*, int64_t, int64_t);
}  // namespace avx2
namespace avx512 {
void bitmask(const Problem&, const BitmaskWeight&, int64_t, int64_t);
void nm(const Problem&, const NMWeight&, int64_t, int64_t);
void dense(const Problem&, const DenseWeight&, int64_t, int64_t);
void unpack(const Problem&, const DenseWeight&, float*, int64_t, int64_t);
void unpack(const Problem&, const BitmaskWeight&, float*, int64_t, int64_t);
void column(const float*, const int32_t*, int64_t, const ColumnWeight&, int64_t, bool, float*);
void unpack(const ColumnWeight&, int64_t, bool, float*, int64_t, int64_t);
void unpack(const Problem&, const NMWeight&, float*, int64_t, int64_t);
}  // namespace avx512
namespace avx512_vbmi2 {
void bitmask(const Problem&, const BitmaskWeight&, int64_t, int64_t);
void unpack(const Problem&, const BitmaskWeight&, float*, int64_t, int64_t);
void column(const float*, const int32_t*, int64_t, const ColumnWeight&, int64_t, bool, float*);
void unpack(const ColumnWeight&, int64_t, bool, float*, int64_t, int64_t);
void unpack(const Problem&, const NMWeight&, float*, int64_t, int64_t);
}  // namespace avx512_vbmi2
#endif

// Loops over the OB output features and RB rows of a work unit: fully unrolled, so accumulators, decoded weights
// and cursors stay in registers.
#define SF_UNROLL _Pragma("GCC unroll 8")

// Kept-value window geometry shared by every N:M kernel and by the Python packer.
constexpr int kWindow = 32;
constexpr int nm_bits(int m) { return m == 4 ? 2 : m == 8 ? 3 : 4; }
constexpr int64_t nm_window_bytes(int kept, int bits) { return (int64_t(kept) * bits + 7) / 8; }

}  // namespace sf
