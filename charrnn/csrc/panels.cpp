// fp32 recurrent products: a recurrent layer's per-step product, out (B, N) = x (B, K) @ w.T + bias
// (+ other), with one weight and a few hundred steps.  w is packed once (pack_panels) into panels of 24
// rows laid out column by column, (ceil(N / 24), K, 24) zero padded, and each 4 x 24 tile of out is
// summed in 12 AVX2 registers with fused multiply-adds over chunks of 512 columns of K (a panel's chunk
// is reused from cache for every 4 rows of x).  The threads share the panels.  Not bit-identical to
// addmm (another summation order, fused multiply-adds).  Without AVX2 + FMA, has_fma() says no and
// callers keep the ATen products.
#include "charrnn.h"

#include <cstring>

namespace charrnn {

#ifdef CHARRNN_X86
bool has_fma() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("fma"));
  return yes && has_avx2();
}
#else
bool has_fma() { return false; }
#endif

namespace {

constexpr int64_t kPanel = 24, kChunk = 512;

#ifdef CHARRNN_X86
#define CHARRNN_FMA __attribute__((target("avx2,fma")))
#define CHARRNN_ROW(i)                                                                                   \
  if constexpr (MR > i) {                                                                                 \
    const __m256 v = _mm256_broadcast_ss(a + i * lda + k);                                                \
    c##i##0 = _mm256_fmadd_ps(v, w0, c##i##0);                                                            \
    c##i##1 = _mm256_fmadd_ps(v, w1, c##i##1);                                                            \
    c##i##2 = _mm256_fmadd_ps(v, w2, c##i##2);                                                            \
  }
#define CHARRNN_TILE_IO(i, OP)                                                                            \
  if constexpr (MR > i) { OP(c##i##0, 0, i); OP(c##i##1, 8, i); OP(c##i##2, 16, i); }
#define CHARRNN_LOAD(r, o, i) r = _mm256_loadu_ps(c + i * ldc + o)
#define CHARRNN_STORE(r, o, i) _mm256_storeu_ps(c + i * ldc + o, r)

// c (MR rows, ldc apart, 24 columns) += a (MR rows, lda apart, kc columns) @ the panel chunk p (kc, 24).
// Every accumulator a named variable, so that all twelve stay in registers.
template <int MR>
CHARRNN_FMA inline void panel_tile(int64_t kc, const float* a, int64_t lda, const float* p, float* c, int64_t ldc) {
  __m256 c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
  CHARRNN_TILE_IO(0, CHARRNN_LOAD) CHARRNN_TILE_IO(1, CHARRNN_LOAD) CHARRNN_TILE_IO(2, CHARRNN_LOAD)
  CHARRNN_TILE_IO(3, CHARRNN_LOAD)
  _Pragma("GCC unroll 4")
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(p + kPanel * k), w1 = _mm256_loadu_ps(p + kPanel * k + 8),
                 w2 = _mm256_loadu_ps(p + kPanel * k + 16);
    CHARRNN_ROW(0) CHARRNN_ROW(1) CHARRNN_ROW(2) CHARRNN_ROW(3)
  }
  CHARRNN_TILE_IO(0, CHARRNN_STORE) CHARRNN_TILE_IO(1, CHARRNN_STORE) CHARRNN_TILE_IO(2, CHARRNN_STORE)
  CHARRNN_TILE_IO(3, CHARRNN_STORE)
}
#undef CHARRNN_ROW
#undef CHARRNN_TILE_IO
#undef CHARRNN_LOAD
#undef CHARRNN_STORE

CHARRNN_FMA void panel_rows(int64_t mr, int64_t kc, const float* a, int64_t lda, const float* p, float* c,
                            int64_t ldc) {
  switch (mr) {
    case 4: return panel_tile<4>(kc, a, lda, p, c, ldc);
    case 3: return panel_tile<3>(kc, a, lda, p, c, ldc);
    case 2: return panel_tile<2>(kc, a, lda, p, c, ldc);
    default: return panel_tile<1>(kc, a, lda, p, c, ldc);
  }
}
#endif

}  // namespace

// w (N, K) float -> its panels (ceil(N / 24), K, 24), zero padded.
Tensor pack_panels(const Tensor& w_in) {
  const Trace trace("charrnn::pack_panels");
  TORCH_CHECK(w_in.scalar_type() == at::kFloat && w_in.dim() == 2, "pack_panels: a float matrix");
  const Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), np = (N + kPanel - 1) / kPanel;
  Tensor P = w.new_zeros({np, K, kPanel});
  const float* src = w.data_ptr<float>();
  float* dst = P.data_ptr<float>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const float* s = src + (p * kPanel + j) * K;
        float* d = dst + p * K * kPanel + j;
        for (int64_t k = 0; k < K; ++k) d[k * kPanel] = s[k];
      }
  });
  return P;
}

// out (B, N) = x (B, K) @ w.T + bias (+ other), P = pack_panels(w).  x, other and out: float rows with unit
// last stride (any row stride); out may be other, but no element of out may be one of x's.
void packed_matmul(const Tensor& x, const Tensor& P, const c10::optional<Tensor>& bias_opt,
                   const c10::optional<Tensor>& other_opt, const Tensor& out) {
  const Trace trace("charrnn::packed_matmul");
  TORCH_CHECK(has_fma(), "packed_matmul: needs a CPU with AVX2 and FMA (see has_fma)");
  const int64_t B = x.size(0), K = x.size(1), np = P.size(0), N = out.size(1);
  check_rows(x, B, K, "packed_matmul: x");
  check_rows(out, B, N, "packed_matmul: out");
  TORCH_CHECK(P.scalar_type() == at::kFloat && P.is_contiguous() && P.dim() == 3 && P.size(1) == K
              && P.size(2) == kPanel && np == (N + kPanel - 1) / kPanel, "packed_matmul: P must be pack_panels(w) of a (N, K) w");
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const bool has_other = other_opt.has_value() && other_opt->defined();
  const Tensor bias = has_bias ? bias_opt->contiguous() : Tensor();
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N), "packed_matmul: bias (N,)");
  if (has_other) check_rows(*other_opt, B, N, "packed_matmul: other");
#ifdef CHARRNN_X86
  const float* px = x.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  const float* pb = has_bias ? bias.data_ptr<float>() : nullptr;
  const float* po = has_other ? other_opt->data_ptr<float>() : nullptr;
  float* py = out.data_ptr<float>();
  const int64_t sx = x.stride(0), so = has_other ? other_opt->stride(0) : 0, sy = out.stride(0);
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> tail;   // the last panel's columns when N is not a multiple of 24
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, nv = std::min(kPanel, N - n0);
      float* c = py + n0;
      int64_t ldc = sy;
      if (nv < kPanel) {
        tail.assign(B * kPanel, 0.0f);
        c = tail.data();
        ldc = kPanel;
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < nv; ++j) c[b * ldc + j] = (pb ? pb[n0 + j] : 0.0f) + (po ? po[b * so + n0 + j] : 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk)
        for (int64_t b = 0; b < B; b += 4)
          panel_rows(std::min<int64_t>(4, B - b), std::min(kChunk, K - k0), px + b * sx + k0, sx,
                     pp + (p * K + k0) * kPanel, c + b * ldc, ldc);
      if (nv < kPanel)
        for (int64_t b = 0; b < B; ++b) std::memcpy(py + b * sy + n0, c + b * kPanel, nv * sizeof(float));
    }
  });
#endif
}

// Whether a recurrent product of this many rows goes through the panels (here and in charrnn.ops.matmul.Product):
// with AVX2 + FMA, up to 256 rows (from there on, MKL's addmm is as fast).
bool use_panels(int64_t rows) { return has_fma() && rows <= 256; }

}  // namespace charrnn
