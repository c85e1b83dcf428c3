// Dropout whose mask is a function of (key, element index): element i is kept when
// hash(key, i) >= threshold, with hash two rounds of the lowbias32 integer mixer.  The forward
// pass and the backward pass compute the same mask from the same key, so nothing is stored
// between them, and the mask does not depend on the number of threads or on AVX2 (the two
// loops below do the same integer operations and one float multiply per element).
#include "charrnn.h"

namespace charrnn {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

struct DropKey { uint32_t k0, k1, threshold; float scale; };

inline float drop_one(float v, uint32_t i, uint32_t hi, const DropKey& k) {
  const uint32_t h = mix32(mix32(i ^ k.k0) ^ (k.k1 + hi));
  return v * (h >= k.threshold ? k.scale : 0.0f);   // as F.dropout: x * (mask / (1 - p))
}

// The key by value and restrict pointers: the stores to y cannot alias it, so the loop vectorises.
void drop_range_portable(const float* __restrict__ x, float* __restrict__ y, uint32_t lo, uint32_t n, uint32_t hi,
                         const DropKey k) {
  for (uint32_t j = 0; j < n; ++j) y[j] = drop_one(x[j], lo + j, hi, k);
}

#ifdef CHARRNN_X86
CHARRNN_AVX2 void drop_range_avx2(const float* __restrict__ x, float* __restrict__ y, uint32_t lo, uint32_t n,
                                  uint32_t hi, const DropKey k) {
  _Pragma("omp simd")
  for (uint32_t j = 0; j < n; ++j) y[j] = drop_one(x[j], lo + j, hi, k);
}
#endif

}  // namespace

// x (any shape, contiguous float) -> x * mask / (1 - p), the mask drawn from `seed`.
// Element i of x is element offset + i of the whole tensor whose mask this is (a slice of it).
// The result goes to out when given (which may be x itself).
Tensor dropout(const Tensor& x, double p, int64_t seed, int64_t offset, const c10::optional<Tensor>& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "dropout: x must be a contiguous float CPU tensor");
  TORCH_CHECK(p >= 0 && p < 1 && offset >= 0, "dropout: p must be in [0, 1) and offset >= 0");
  Tensor y = out.has_value() ? *out : x.new_empty(x.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.numel() == x.numel(),
              "dropout: out must be a contiguous float tensor of x's size");
  const uint64_t s = static_cast<uint64_t>(seed);
  const double t = std::ldexp(p, 32);
  const DropKey k{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                  static_cast<uint32_t>(std::min(t, 4294967295.0)), static_cast<float>(1.0 / (1.0 - p))};
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const bool avx2 = has_avx2();
  at::parallel_for(offset, offset + x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      // Runs of indices that share their upper 32 bits.
      const int64_t stop = std::min<int64_t>(end, ((i >> 32) + 1) << 32);
      const uint32_t lo = static_cast<uint32_t>(i), n = static_cast<uint32_t>(stop - i);
      const uint32_t hi = static_cast<uint32_t>(i >> 32) * 0x9e3779b9U;
#ifdef CHARRNN_X86
      if (avx2) drop_range_avx2(px + i - offset, py + i - offset, lo, n, hi, k); else
#endif
      drop_range_portable(px + i - offset, py + i - offset, lo, n, hi, k);
      i = stop;
    }
  });
  return y;
}

}  // namespace charrnn
