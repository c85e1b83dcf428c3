// charrnn's C++ kernels: what the source files share, and what each offers the others and bindings.cpp.
//
// Every file is compiled with -ffp-contract=off -fno-fast-math (charrnn/native.py): no fused multiply-add
// anywhere unless a function asks for it by its target ("fma": the panel product only), so that the
// sampling step gives the same bits as the pure-PyTorch step in charrnn/sampling.py.
//
// Only bindings.cpp includes pybind11 and torch's Python headers; the kernels include the core Tensor
// header here and, each, the per-operator headers (ATen/ops/*.h) of the ATen functions it calls, which
// compile much faster than <ATen/ATen.h>.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CHARRNN_X86 1
#define CHARRNN_AVX2 __attribute__((target("avx2")))
#endif

namespace at {
struct RecordFunction;
}  // namespace at

namespace charrnn {

using at::Tensor;

// ---------------------------------------------------------------- the CPU
extern bool g_portable;   // tests: run the portable loops even on an AVX2 CPU

#ifdef CHARRNN_X86
inline bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes && !g_portable;
}
#else
inline bool has_avx2() { return false; }
#endif

// ---------------------------------------------------------------- shared helpers
// A profiler label for the enclosing scope, what RECORD_FUNCTION(name, {}) does (defined in step.cpp,
// so that only one file compiles <ATen/record_function.h>).
class Trace {
 public:
  explicit Trace(const char* name);
  ~Trace();

 private:
  std::unique_ptr<at::RecordFunction> guard_;   // only while a profiler listens
};

// f(b) for b < B, rows shared between the threads in chunks of about 32k elements of width each.
template <typename F>
void for_rows(int64_t B, int64_t width, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// t must be a float (B, W) tensor with unit last stride (any row stride).
inline void check_rows(const Tensor& t, int64_t B, int64_t W, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B && t.size(1) == W && t.stride(1) == 1,
              what, " must be float (", B, ", ", W, ") with unit last stride");
}

// The training loops' activations (lstm.cpp, gru.cpp): sigmoid(a) = 1 / (1 + exp(-a)) with a Cephes-style
// exp (AVX2, within a few ulp), tanh(a) = 2 sigmoid(2a) - 1.  Not bit-identical to ATen's.
inline float sigmoid1(float a) { return 1.0f / (1.0f + std::exp(-a)); }

#ifdef CHARRNN_X86
CHARRNN_AVX2 inline __m256 exp8(__m256 x) {   // Cephes expf: 2^n * p(r), |r| <= ln(2) / 2
  // Clamped with x as the second operand: max/min return their second operand when either is NaN,
  // so a NaN stays NaN (as std::exp's) instead of becoming a bound.
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                                 _mm256_set1_ps(0.5f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_add_ps(_mm256_mul_ps(p, x), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, x), _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(x, x)), x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

CHARRNN_AVX2 inline __m256 sigmoid8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
}

CHARRNN_AVX2 inline __m256 tanh8(__m256 a) {   // 2 sigmoid(2a) - 1
  const __m256 two = _mm256_set1_ps(2.0f);
  return _mm256_sub_ps(_mm256_mul_ps(two, sigmoid8(_mm256_mul_ps(two, a))), _mm256_set1_ps(1.0f));
}
#endif

// ---------------------------------------------------------------- int8.cpp: int8 and fp32 layers
// A layer of the sampling step: fp32 (at::addmm) or int8 (7-bit weights, one scale per output row,
// times 8-bit activations, one scale per sample).
struct Linear {
  bool int8 = false;
  Tensor w, b;          // fp32: w (N, K); int8: w packed (blocks, quads, 32), b (N)
  Tensor comp, sw;      // int8: 63 * row sums (int32, padded rows), per-row scales (N)
  int64_t N = 0, K = 0;

  Tensor operator()(const Tensor& x) const;   // x (B, K) fp32, rows contiguous -> (B, N)
};

// parts: fp32 [w, b], or int8 [packed, 63 * row sums, scales, bias].
Linear make_linear(const std::vector<Tensor>& parts, int64_t N, int64_t K);

// The int8 product alone, for tests: x (B, K) fp32 -> (B, N).
Tensor int8_linear(const Tensor& x, const std::vector<Tensor>& parts, int64_t N);

// ---------------------------------------------------------------- step.cpp: the sampling step
class Step {
 public:
  // arch: 0 gru, 1 lstm, 2 rnn (tanh).  ih[0] is unused (the first layer reads the table).
  Step(int64_t arch, int64_t hidden, Tensor table, std::vector<std::vector<Tensor>> ih,
       std::vector<std::vector<Tensor>> hh, std::vector<Tensor> head, int64_t vocab);

  // ids (B,) int64; state: per layer h (B, H), or h, c for LSTM.  -> (logits (B, vocab), new state)
  std::pair<Tensor, std::vector<Tensor>> step(const Tensor& ids_in, const std::vector<Tensor>& state) const;

 private:
  int64_t arch_, H_;
  Tensor table_;
  std::vector<Linear> ih_, hh_;
  Linear head_;
};

// The next ids (B,) from logits (B, V), as charrnn.decoding.choose draws them; sample_rows: groups of rows,
// each with its own generator and temperature (the server's batch of requests).
Tensor sample(const Tensor& logits, c10::optional<at::Generator> gen, double temperature);
void sample_rows(const Tensor& logits, const std::vector<c10::optional<at::Generator>>& gens,
                 const std::vector<double>& temperatures, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& counts, Tensor ids);

// ---------------------------------------------------------------- panels.cpp: fp32 recurrent products
bool has_fma();                          // AVX2 and FMA: packed_matmul can run
bool use_panels(int64_t rows);           // whether a product of this many rows goes through the panels
Tensor pack_panels(const Tensor& w_in);  // w (N, K) -> its panels (ceil(N / 24), K, 24)
// out (B, N) = x (B, K) @ w.T + bias (+ other), P = pack_panels(w).
void packed_matmul(const Tensor& x, const Tensor& P, const c10::optional<Tensor>& bias_opt,
                   const c10::optional<Tensor>& other_opt, const Tensor& out);

// ---------------------------------------------------------------- lstm.cpp: LSTM training loops
std::vector<Tensor> lstm_forward(const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& h0,
                                 const Tensor& c0, const Tensor& w_hh, const Tensor& b_hh);
std::vector<Tensor> lstm_backward(const c10::optional<Tensor>& dys_opt, const c10::optional<Tensor>& dhT,
                                  const c10::optional<Tensor>& dcT, const Tensor& gates, const Tensor& cs,
                                  const Tensor& tcs, const Tensor& c0, const Tensor& w_hh, bool reuse);

// ---------------------------------------------------------------- gru.cpp: GRU training steps
void gru_forward_step(const Tensor& a, const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& hp,
                      const Tensor& gates, const Tensor& ns, const Tensor& ys, int64_t t);
void gru_backward_step(const Tensor& dh, const Tensor& dys, const Tensor& gates, const Tensor& dg,
                       const Tensor& ns, const Tensor& dan, const Tensor& hp, const Tensor& zdh, int64_t t);

// ---------------------------------------------------------------- dropout.cpp
// x * mask / (1 - p), the mask a function of (seed, element index); into out when given.
Tensor dropout(const Tensor& x, double p, int64_t seed, int64_t offset, const c10::optional<Tensor>& out);

}  // namespace charrnn
