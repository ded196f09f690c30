// See step_ops.h. Each loop is an OpenMP simd loop, which lets the compiler reorder a float sum into vector lanes.
#include "step_ops.h"

#include <cstring>

#ifdef __x86_64__
#define SF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SF_CLONES
#endif

namespace sf::step {
namespace {

// exp(x) with the range reduction and polynomial of Cephes' expf (about 1 ulp), written without branches or calls
// so that it vectorises: the C library's expf is a call per value.
#pragma omp declare simd
inline float exp_approx(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

}  // namespace

SF_CLONES float sum_squares(const float* x, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return sum;
}

SF_CLONES void add(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

SF_CLONES void scale_mul(const float* x, const float* weight, float scale, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

SF_CLONES void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

SF_CLONES void attend_head(const float* q, const float* keys, const float* values, int64_t places, int64_t d,
                           float scaling, float* scores, float* out) {
  float top = -__builtin_inff();
  for (int64_t t = 0; t < places; ++t) {
    const float* key = keys + t * d;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += q[i] * key[i];
    scores[t] = sum * scaling;
    top = scores[t] > top ? scores[t] : top;
  }
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < places; ++t) {
    scores[t] = exp_approx(scores[t] - top);
    total += scores[t];
  }
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  for (int64_t t = 0; t < places; ++t) {
    const float p = scores[t] / total;
    const float* value = values + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] += p * value[i];
  }
}

}  // namespace sf::step
