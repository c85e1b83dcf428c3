// LSTM training loops: the time loops of charrnn.ops.lstm's LSTM (gates [i, f, g, o]).  Per step,
// one matrix product and then one pass over each row for all the gate arithmetic, instead of a dozen
// ATen calls over the whole batch.  The activations are charrnn.h's sigmoid1 / sigmoid8 / tanh8: not
// bit-identical to the ATen loops (the tests compare within float32 rounding); the gradients are exact
// for the activations computed.
#include "charrnn.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

namespace charrnn {
namespace {

// Columns j0..H-1 of one row of a forward step: a = W_hh h + b_hh, x = the input projection (4H
// each); cp = the previous cell.  Writes the activations [i, f, tanh g, o] to g, the cell, its tanh
// and h'.
void lstm_row_portable(const float* a, const float* x, const float* cp, float* g, float* c, float* tc,
                       float* y, int64_t H, int64_t j0 = 0) {
  for (int64_t j = j0; j < H; ++j) {
    const float i = sigmoid1(a[j] + x[j]), f = sigmoid1(a[H + j] + x[H + j]);
    const float gg = 2.0f * sigmoid1(2.0f * (a[2 * H + j] + x[2 * H + j])) - 1.0f;
    const float o = sigmoid1(a[3 * H + j] + x[3 * H + j]);
    const float cn = f * cp[j] + i * gg, t = 2.0f * sigmoid1(2.0f * cn) - 1.0f;
    g[j] = i; g[H + j] = f; g[2 * H + j] = gg; g[3 * H + j] = o;
    c[j] = cn; tc[j] = t; y[j] = o * t;
  }
}

// One row of a backward step: from the activations g, tanh of the cell tc, the previous cell cp,
// dh (+ dy) and dc (updated to the previous step's), the gate pre-activation gradients d (which
// may be g itself: each j reads its four activations before writing).
inline void lstm_back_j(const float* g, float* d, const float* tc, const float* cp, const float* dy,
                        const float* dh, float* dc, int64_t H, int64_t j) {
  const float i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j], t = tc[j];
  const float dhv = dh[j] + dy[j];
  const float dcv = dc[j] + dhv * o * (1.0f - t * t);
  d[j] = dcv * gg * (i * (1.0f - i));
  d[H + j] = dcv * cp[j] * (f * (1.0f - f));
  d[2 * H + j] = dcv * i * (1.0f - gg * gg);
  d[3 * H + j] = dhv * t * (o * (1.0f - o));
  dc[j] = dcv * f;
}

void lstm_back_row_portable(const float* g, float* d, const float* tc, const float* cp, const float* dy,
                            const float* dh, float* dc, int64_t H) {
  for (int64_t j = 0; j < H; ++j) lstm_back_j(g, d, tc, cp, dy, dh, dc, H, j);
}

#ifdef CHARRNN_X86
CHARRNN_AVX2 void lstm_row_avx2(const float* a, const float* x, const float* cp, float* g, float* c, float* tc,
                                float* y, int64_t H) {
  int64_t j = 0;
  for (; j + 8 <= H; j += 8) {
#define LD(k) _mm256_add_ps(_mm256_loadu_ps(a + (k) * H + j), _mm256_loadu_ps(x + (k) * H + j))
    const __m256 i = sigmoid8(LD(0)), f = sigmoid8(LD(1)), gg = tanh8(LD(2)), o = sigmoid8(LD(3));
#undef LD
    const __m256 cn = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(cp + j)), _mm256_mul_ps(i, gg));
    const __m256 t = tanh8(cn);
    _mm256_storeu_ps(g + j, i);
    _mm256_storeu_ps(g + H + j, f);
    _mm256_storeu_ps(g + 2 * H + j, gg);
    _mm256_storeu_ps(g + 3 * H + j, o);
    _mm256_storeu_ps(c + j, cn);
    _mm256_storeu_ps(tc + j, t);
    _mm256_storeu_ps(y + j, _mm256_mul_ps(o, t));
  }
  lstm_row_portable(a, x, cp, g, c, tc, y, H, j);   // the last H % 8 columns
}

CHARRNN_AVX2 void lstm_back_row_avx2(const float* g, float* d, const float* tc, const float* cp, const float* dy,
                                     const float* dh, float* dc, int64_t H) {
  _Pragma("omp simd")   // iterations are independent (d may be g: each j reads before it writes)
  for (int64_t j = 0; j < H; ++j) lstm_back_j(g, d, tc, cp, dy, dh, dc, H, j);
}
#endif

void lstm_row(const float* a, const float* x, const float* cp, float* g, float* c, float* tc, float* y, int64_t H) {
#ifdef CHARRNN_X86
  if (has_avx2()) return lstm_row_avx2(a, x, cp, g, c, tc, y, H);
#endif
  lstm_row_portable(a, x, cp, g, c, tc, y, H);
}

void lstm_back_row(const float* g, float* d, const float* tc, const float* cp, const float* dy, const float* dh,
                   float* dc, int64_t H) {
#ifdef CHARRNN_X86
  if (has_avx2()) return lstm_back_row_avx2(g, d, tc, cp, dy, dh, dc, H);
#endif
  lstm_back_row_portable(g, d, tc, cp, dy, dh, dc, H);
}

}  // namespace

// gi: the input projection (T, B, 4H), unit last stride, or with ids (B, T) a (V, 4H) table whose
// rows are looked up.  -> gates (B, T, 4H) activations, cs (B, T, H) cells, tcs = tanh(cs), ys.
std::vector<Tensor> lstm_forward(const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& h0,
                                 const Tensor& c0, const Tensor& w_hh, const Tensor& b_hh) {
  const Trace trace("charrnn::lstm_forward");
  const int64_t H = w_hh.size(1), G = 4 * H;
  TORCH_CHECK(gi.scalar_type() == at::kFloat && gi.dim() >= 2 && gi.size(-1) == G && gi.stride(-1) == 1,
              "lstm_forward: float input projection (..., 4 * hidden) with unit last stride");
  Tensor ids;
  int64_t B, T;
  if (ids_opt.has_value() && ids_opt->defined()) {
    ids = ids_opt->to(at::kLong).contiguous();
    TORCH_CHECK(ids.dim() == 2 && gi.dim() == 2, "lstm_forward: ids (B, T) with a (V, 4H) table");
    B = ids.size(0);
    T = ids.size(1);
    const int64_t* p = ids.data_ptr<int64_t>();
    for (int64_t k = 0; k < B * T; ++k) TORCH_CHECK(p[k] >= 0 && p[k] < gi.size(0), "lstm_forward: id out of range");
  } else {
    TORCH_CHECK(gi.dim() == 3, "lstm_forward: gi (T, B, 4H)");
    T = gi.size(0);
    B = gi.size(1);
  }
  const auto opt = h0.options();
  Tensor gates = at::empty({B, T, G}, opt), cs = at::empty({B, T, H}, opt);
  Tensor tcs = at::empty({B, T, H}, opt), ys = at::empty({B, T, H}, opt);
  // The matrix product goes to a contiguous buffer (addmm into a strided slice would copy); h is
  // read from ys through its strides.
  Tensor gh = at::empty({B, G}, opt);
  const Tensor w_t = w_hh.t(), c0c = c0.contiguous();
  const float* px = gi.data_ptr<float>();
  const int64_t* pid = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  const int64_t s0 = gi.stride(0), s1 = pid ? 0 : gi.stride(1);
  const float* const pgh = gh.data_ptr<float>();
  float* const pg = gates.data_ptr<float>();
  float* const pc = cs.data_ptr<float>();
  float* const ptc = tcs.data_ptr<float>();
  float* const py = ys.data_ptr<float>();
  const float* const pc0 = c0c.data_ptr<float>();
  const Tensor panels = use_panels(B) ? pack_panels(w_hh) : Tensor();
  for (int64_t t = 0; t < T; ++t) {
    const Tensor h = t ? ys.select(1, t - 1) : h0;
    if (panels.defined()) packed_matmul(h, panels, b_hh, c10::nullopt, gh); else at::addmm_out(gh, b_hh, h, w_t);
    for_rows(B, G, [&](int64_t b) {
      const int64_t r = b * T + t;
      lstm_row(pgh + b * G, pid ? px + pid[r] * s0 : px + t * s0 + b * s1, t ? pc + (r - 1) * H : pc0 + b * H,
               pg + r * G, pc + r * H, ptc + r * H, py + r * H, H);
    });
  }
  return {gates, cs, tcs, ys};
}

// The reverse loop: dys (B, T, H), dhT, dcT (B, H) and the forward's buffers -> the gradient of the
// gate pre-activations dg (B, T, 4H) (written over ``gates`` when ``reuse``), dh0, dc0.
// Gradients that autograd did not materialise (outputs that were not used) come as None.
std::vector<Tensor> lstm_backward(const c10::optional<Tensor>& dys_opt, const c10::optional<Tensor>& dhT,
                                  const c10::optional<Tensor>& dcT, const Tensor& gates, const Tensor& cs,
                                  const Tensor& tcs, const Tensor& c0, const Tensor& w_hh, bool reuse) {
  const Trace trace("charrnn::lstm_backward");
  const int64_t B = gates.size(0), T = gates.size(1), G = gates.size(2), H = G / 4;
  TORCH_CHECK(gates.is_contiguous() && cs.is_contiguous() && tcs.is_contiguous(), "lstm_backward: saved buffers");
  const bool has_dys = dys_opt.has_value() && dys_opt->defined();
  const Tensor dys = has_dys ? dys_opt->contiguous() : at::zeros({B, H}, gates.options());
  const int64_t dys_row = has_dys ? T * H : H, dys_t = has_dys ? H : 0;
  const Tensor c0c = c0.contiguous();
  Tensor dg = reuse ? gates : at::empty_like(gates);
  Tensor dh = dhT.has_value() && dhT->defined() ? dhT->contiguous().clone() : at::zeros({B, H}, gates.options());
  Tensor dc = dcT.has_value() && dcT->defined() ? dcT->contiguous().clone() : at::zeros({B, H}, gates.options());
  const float* const pg = gates.data_ptr<float>();
  float* const pd = dg.data_ptr<float>();
  const float* const pc = cs.data_ptr<float>();
  const float* const ptc = tcs.data_ptr<float>();
  const float* const pdy = dys.data_ptr<float>();
  const float* const pc0 = c0c.data_ptr<float>();
  const float* const pdh = dh.data_ptr<float>();
  float* const pdc = dc.data_ptr<float>();
  const Tensor panels = use_panels(B) ? pack_panels(w_hh.t()) : Tensor();
  for (int64_t t = T - 1; t >= 0; --t) {
    for_rows(B, G, [&](int64_t b) {
      const int64_t r = b * T + t;
      lstm_back_row(pg + r * G, pd + r * G, ptc + r * H, t ? pc + (r - 1) * H : pc0 + b * H,
                    pdy + b * dys_row + t * dys_t,
                    pdh + b * H, pdc + b * H, H);
    });
    if (panels.defined()) packed_matmul(dg.select(1, t), panels, c10::nullopt, c10::nullopt, dh);
    else at::mm_out(dh, dg.select(1, t), w_hh);
  }
  return {dg, dh, dc};
}

}  // namespace charrnn
