// The small vector operations of a decode step (norms, attention, gating), vectorised for the CPU the step runs
// on. Compiled as function clones for x86-64-v4 (AVX-512), v3 (AVX2, FMA) and the baseline, picked at load time
// (GCC's target_clones): scalar reductions (a dot product's chain of dependent adds) cost the native step more
// per token than its attention reads, 1.6 of 13 ms on the default model.
#pragma once

#include <cstdint>

namespace sf::step {

float sum_squares(const float* x, int64_t n);
// y += x
void add(float* y, const float* x, int64_t n);
// out = weight * (x * scale), in transformers' RMSNorm order
void scale_mul(const float* x, const float* weight, float scale, float* out, int64_t n);
// out = silu(gate) * up
void silu_mul(const float* gate, const float* up, float* out, int64_t n);
// One query head's attention over `places` cached keys and values ([places, d] each): out[d] = softmax(scaling *
// K q) V, with `scores` [places] as scratch.
void attend_head(const float* q, const float* keys, const float* values, int64_t places, int64_t d, float scaling,
                 float* scores, float* out);

}  // namespace sf::step
