// Instruction-set choice shared by the torch-facing drivers (ops.cpp: one matmul per call; decode.cpp: a whole
// decode step per call): which kernels this build and this CPU can run, and the kernel of each layout for a name.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace sf {

enum class Isa { portable, avx2, avx512, avx512_vbmi2 };

// The instruction set called `name`; throws (a torch error) when unknown, not compiled in or not on this CPU.
Isa parse_isa(const std::string& name);
std::vector<std::string> cpu_isa_names();
std::vector<std::string> compiled_isa_names();

DenseKernel dense_kernel(Isa isa);
BitmaskKernel bitmask_kernel(Isa isa);
NMKernel nm_kernel(Isa isa);
// nullptr where the instruction set has no vectorised unpack (Linear then unpacks bits and lets torch widen them)
DenseUnpack dense_unpack(Isa isa);
BitmaskUnpack bitmask_unpack(Isa isa);
NMUnpack nm_unpack(Isa isa);
// the column kernel (activation sparsity) of a vectorised instruction set, or the portable one
ColumnKernel column_kernel(Isa isa);
// nullptr where the instruction set has no vectorised column unpack (ColumnLinear then scatters the 16-bit values
// and lets torch widen them)
ColumnUnpack column_unpack(Isa isa);

constexpr int64_t kGrain = 16;  // fewer output features than this run on one thread

}  // namespace sf
