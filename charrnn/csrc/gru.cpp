// GRU training steps: one time step of charrnn.ops.gru's GRU around its matrix product (which
// stays in Python, on oneDNN's packed weight): one pass over each row for all the gate arithmetic
// instead of eight ATen calls over the batch, with the same sigmoid and tanh as the LSTM loops
// (charrnn.h).  Forward, with a = W_hh h + b_hh and x the input projection: r = sigmoid(a_r + x_r),
// z = sigmoid(a_z + x_z), n = tanh(x_n + r a_n), h' = (h - n) z + n; saved: [r, z, a_n], n, h'.
#include "charrnn.h"

namespace charrnn {
namespace {

void gru_row_portable(const float* a, const float* x, const float* hp, float* g, float* n, float* y, int64_t H,
                      int64_t j0 = 0) {
  for (int64_t j = j0; j < H; ++j) {
    const float r = sigmoid1(a[j] + x[j]), z = sigmoid1(a[H + j] + x[H + j]), an = a[2 * H + j];
    const float nv = 2.0f * sigmoid1(2.0f * (x[2 * H + j] + r * an)) - 1.0f;
    g[j] = r; g[H + j] = z; g[2 * H + j] = an;
    n[j] = nv; y[j] = (hp[j] - nv) * z + nv;
  }
}

// Backward, one column: dh (+ dy) -> the pre-activation gradients [dr, dz, dn * r] in d (which may
// be g: j's three values are read first), dn's pre-activation gradient in dan (which may be n),
// and z * dh, the part of dh that goes straight to h_{t-1}.
inline void gru_back_j(const float* g, float* d, const float* n, float* dan, const float* hp, const float* dy,
                       const float* dh, float* zdh, int64_t H, int64_t j) {
  const float r = g[j], z = g[H + j], an = g[2 * H + j], nv = n[j];
  const float dhv = dh[j] + dy[j], zd = z * dhv;
  const float da = (dhv - zd) * (1.0f - nv * nv);
  d[j] = da * an * (r * (1.0f - r));
  d[H + j] = (hp[j] - nv) * dhv * (z * (1.0f - z));
  d[2 * H + j] = da * r;
  dan[j] = da;
  zdh[j] = zd;
}

#ifdef CHARRNN_X86
CHARRNN_AVX2 void gru_row_avx2(const float* a, const float* x, const float* hp, float* g, float* n, float* y,
                               int64_t H) {
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
    const __m256 r = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(x + j)));
    const __m256 z = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(a + H + j), _mm256_loadu_ps(x + H + j)));
    const __m256 an = _mm256_loadu_ps(a + 2 * H + j);
    const __m256 nv = tanh8(_mm256_add_ps(_mm256_loadu_ps(x + 2 * H + j), _mm256_mul_ps(r, an)));
    _mm256_storeu_ps(g + j, r);
    _mm256_storeu_ps(g + H + j, z);
    _mm256_storeu_ps(g + 2 * H + j, an);
    _mm256_storeu_ps(n + j, nv);
    _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(hp + j), nv), z), nv));
  }
  gru_row_portable(a, x, hp, g, n, y, H, j);   // the last H % 8 columns
}

CHARRNN_AVX2 void gru_back_row_avx2(const float* g, float* d, const float* n, float* dan, const float* hp,
                                    const float* dy, const float* dh, float* zdh, int64_t H) {
  _Pragma("omp simd")   // iterations are independent (each j reads before it writes)
  for (int64_t j = 0; j < H; ++j) gru_back_j(g, d, n, dan, hp, dy, dh, zdh, H, j);
}
#endif

void gru_row(const float* a, const float* x, const float* hp, float* g, float* n, float* y, int64_t H) {
#ifdef CHARRNN_X86
  if (has_avx2()) return gru_row_avx2(a, x, hp, g, n, y, H);
#endif
  gru_row_portable(a, x, hp, g, n, y, H);
}

void gru_back_row(const float* g, float* d, const float* n, float* dan, const float* hp, const float* dy,
                  const float* dh, float* zdh, int64_t H) {
#ifdef CHARRNN_X86
  if (has_avx2()) return gru_back_row_avx2(g, d, n, dan, hp, dy, dh, zdh, H);
#endif
  for (int64_t j = 0; j < H; ++j) gru_back_j(g, d, n, dan, hp, dy, dh, zdh, H, j);
}

}  // namespace

// Step t.  a (B, 3H) = h_{t-1} W_hh^T + b_hh; gi (T, B, 3H) with unit last stride, or with ids
// (B, T) int64 a (V, 3H) table; hp = h_{t-1} (B, H); gates (B, T, 3H), ns and ys (B, T, H) contiguous.
void gru_forward_step(const Tensor& a, const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& hp,
                      const Tensor& gates, const Tensor& ns, const Tensor& ys, int64_t t) {
  const Trace trace("charrnn::gru_forward_step");
  const int64_t B = gates.size(0), T = gates.size(1), G = gates.size(2), H = G / 3;
  TORCH_CHECK(gates.is_contiguous() && ns.is_contiguous() && ys.is_contiguous() && gates.scalar_type() == at::kFloat
              && ns.scalar_type() == at::kFloat && ys.scalar_type() == at::kFloat && t >= 0 && t < T,
              "gru_forward_step: float contiguous buffers (B, T, 3H), (B, T, H) and 0 <= t < T");
  check_rows(a, B, G, "gru step: a");
  check_rows(hp, B, H, "gru step: h");
  TORCH_CHECK(gi.scalar_type() == at::kFloat && gi.size(-1) == G && gi.stride(-1) == 1,
              "gru_forward_step: float input projection (..., 3 * hidden) with unit last stride");
  const int64_t* pid = nullptr;
  if (ids_opt.has_value() && ids_opt->defined()) {
    const Tensor& ids = *ids_opt;
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 2 && ids.size(0) == B
                && ids.size(1) == T && gi.dim() == 2, "gru_forward_step: ids (B, T) int64 with a (V, 3H) table");
    pid = ids.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(pid[b * T + t] >= 0 && pid[b * T + t] < gi.size(0), "gru_forward_step: id out of range");
  } else {
    TORCH_CHECK(gi.dim() == 3 && gi.size(0) == T && gi.size(1) == B, "gru_forward_step: gi (T, B, 3H)");
  }
  const float* px = gi.data_ptr<float>();
  const int64_t s0 = gi.stride(0), s1 = pid ? 0 : gi.stride(1);
  const float* pa = a.data_ptr<float>();
  const float* ph = hp.data_ptr<float>();
  const int64_t sa = a.stride(0), sh = hp.stride(0);
  float* pg = gates.data_ptr<float>();
  float* pn = ns.data_ptr<float>();
  float* py = ys.data_ptr<float>();
  for_rows(B, G, [&](int64_t b) {
    const int64_t r = b * T + t;
    gru_row(pa + b * sa, pid ? px + pid[r] * s0 : px + t * s0 + b * s1, ph + b * sh, pg + r * G, pn + r * H,
            py + r * H, H);
  });
}

// Step t of the reverse loop: dh (B, H) the gradient reaching h_t from step t + 1, dys (B, T, H)
// the outputs' gradients; writes dg[:, t] (over gates[:, t] when they are the same buffer), dan[:, t]
// and zdh (B, H).  Then Python adds dg[:, t] @ W_hh to zdh for h_{t-1}'s gradient.
void gru_backward_step(const Tensor& dh, const Tensor& dys, const Tensor& gates, const Tensor& dg,
                       const Tensor& ns, const Tensor& dan, const Tensor& hp, const Tensor& zdh, int64_t t) {
  const Trace trace("charrnn::gru_backward_step");
  const int64_t B = gates.size(0), T = gates.size(1), G = gates.size(2), H = G / 3;
  TORCH_CHECK(gates.is_contiguous() && dg.is_contiguous() && ns.is_contiguous() && dan.is_contiguous()
              && dg.sizes() == gates.sizes() && dan.sizes() == ns.sizes() && gates.scalar_type() == at::kFloat
              && dg.scalar_type() == at::kFloat && ns.scalar_type() == at::kFloat && dan.scalar_type() == at::kFloat
              && t >= 0 && t < T, "gru_backward_step: float contiguous buffers and 0 <= t < T");
  TORCH_CHECK(dys.scalar_type() == at::kFloat && dys.dim() == 3 && dys.size(0) == B && dys.size(1) == T
              && dys.size(2) == H && dys.stride(2) == 1, "gru_backward_step: dys (B, T, H) with unit last stride");
  check_rows(dh, B, H, "gru step: dh");
  check_rows(hp, B, H, "gru step: h");
  check_rows(zdh, B, H, "gru step: zdh");
  const float* pg = gates.data_ptr<float>();
  float* pd = dg.data_ptr<float>();
  const float* pn = ns.data_ptr<float>();
  float* pdan = dan.data_ptr<float>();
  const float* pdy = dys.data_ptr<float>();
  const float* pdh = dh.data_ptr<float>();
  const float* ph = hp.data_ptr<float>();
  float* pz = zdh.data_ptr<float>();
  const int64_t sy0 = dys.stride(0), sy1 = dys.stride(1), sdh = dh.stride(0), sh = hp.stride(0), sz = zdh.stride(0);
  for_rows(B, G, [&](int64_t b) {
    const int64_t r = b * T + t;
    gru_back_row(pg + r * G, pd + r * G, pn + r * H, pdan + r * H, ph + b * sh, pdy + b * sy0 + t * sy1,
                 pdh + b * sdh, pz + b * sz, H);
  });
}

}  // namespace charrnn
