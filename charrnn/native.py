"""The sampling step in C++: an int8 matrix kernel and the whole per-character step in one call.

:class:`charrnn.sampling.Stepper` runs one character at a time.  In Python that is some thirty
small ATen calls per character, each costing microseconds of dispatch, which is as much as
the arithmetic at batch 1; and PyTorch's own int8 kernels (fbgemm, deprecated) quantise
the activations per batch.  This module compiles, on first use, a small C++ extension
(``torch.utils.cpp_extension.load_inline``; it needs a C++ compiler and ninja) that does a
whole step in one call:

* int8 weights, one scale per output row, packed in blocks of 8 rows x 2 columns, times
  int8 activations with one scale per sample (so a sample's result never depends on the
  others in its batch), accumulated exactly in int32 (AVX2 ``vpmaddwd`` where the CPU has
  it, portable C++ elsewhere), then ``acc * (scale_x * scale_w) + bias`` in fp32;
* fp32 matrix products through the same ``at::addmm`` Python would call;
* the gate arithmetic in plain loops, with ``at::sigmoid_`` / ``at::tanh_`` applied to
  buffers of exactly the shapes the Python path uses.

Every operation is either exact (integer sums), a single correctly rounded IEEE operation
in the same order as the Python path (the file is compiled with ``-ffp-contract=off``), or
the same ATen kernel on the same shapes, so the compiled step and the pure-PyTorch step
in :mod:`charrnn.sampling` give bit-identical results (the tests check it): a seed gives
the same text with or without a compiler.

The build is cached in PyTorch's extension folder (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that hashes this source, the torch version and
the machine, and is reused by every later process.  ``CHARRNN_NATIVE=0`` turns it off;
without a compiler :func:`load` answers None (with one warning) and the Python path runs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings

import torch

ENABLED: bool = os.environ.get("CHARRNN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CHARRNN_X86 1
#endif

namespace py = pybind11;
using at::Tensor;

namespace {

bool g_portable = false;   // tests: run the portable loops even on an AVX2 CPU

#ifdef CHARRNN_X86
#define CHARRNN_AVX2 __attribute__((target("avx2")))
bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes && !g_portable;
}

CHARRNN_AVX2 float absmax_avx2(const float* x, int64_t K) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + k), mask));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = 0.f;
  for (float v : t) r = std::max(r, v);
  for (; k < K; ++k) r = std::max(r, std::fabs(x[k]));
  return r;
}

// q[k] = round_half_even(x[k] * inv): vcvtps2dq rounds to nearest even, like std::nearbyint.
CHARRNN_AVX2 int64_t round_avx2(const float* x, int64_t K, float inv, int16_t* q) {
  const __m256 s = _mm256_set1_ps(inv);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
  }
  return k;
}
#else
bool has_avx2() { return false; }
#endif

// ---------------------------------------------------------------- int8 activations
// x (B, K) fp32 with row stride ldx -> q (B, Kq) int16 (zero padded to Kq), s (B):
// s = max|x| / 127, q = round_half_even(x * (127 / max|x|)), all zeros for an all-zero row.
void quantize_rows(const float* x, int64_t B, int64_t K, int64_t ldx, int16_t* q, int64_t Kq, float* s) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * ldx;
    float m = 0.f;
    int64_t k = 0;
#ifdef CHARRNN_X86
    if (has_avx2()) {
      m = absmax_avx2(xb, K);
    } else
#endif
      for (int64_t j = 0; j < K; ++j) m = std::max(m, std::fabs(xb[j]));
    const float inv = m > 0.f ? 127.f / m : 0.f;
    s[b] = m / 127.f;
    int16_t* qb = q + b * Kq;
#ifdef CHARRNN_X86
    if (has_avx2()) k = round_avx2(xb, K, inv, qb);
#endif
    for (; k < K; ++k) qb[k] = static_cast<int16_t>(std::nearbyint(xb[k] * inv));
    for (k = K; k < Kq; ++k) qb[k] = 0;
  }
}

// ---------------------------------------------------------------- int8 matrix product
// Packed weights wp: [blocks of 8 rows, an even number][Kp column pairs][8 rows][2] int8, zero padded.
// acc[s][j] (NS samples x NW*8 rows) = sum_k q[s][k] * w[row j][k], exactly, in int32.

void block_generic(int NS, int NW, const int16_t* q, int64_t Kq, const int8_t* wp, int64_t Kp, int32_t* acc) {
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < NW * 8; ++j) {
      const int8_t* w = wp + (j / 8) * Kp * 16 + (j % 8) * 2;
      const int16_t* x = q + s * Kq;
      int32_t sum = 0;
      for (int64_t kp = 0; kp < Kp; ++kp)
        sum += int32_t(w[kp * 16]) * x[2 * kp] + int32_t(w[kp * 16 + 1]) * x[2 * kp + 1];
      acc[s * NW * 8 + j] = sum;
    }
}

#ifdef CHARRNN_X86
CHARRNN_AVX2 inline __m256i wide_rows(const int8_t* p) {   // 8 rows x 2 columns, widened to int16 pairs
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
CHARRNN_AVX2 inline __m256i pair_of(const int16_t* x) {     // a sample's 2 columns, in every lane
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return _mm256_set1_epi32(pair);
}
CHARRNN_AVX2 inline __m256i madd(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}
CHARRNN_AVX2 inline void put(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// Every accumulator a named variable (unused ones vanish), so that all stay in registers:
// NS samples (1..6) x 16 rows.
template <int NS>
CHARRNN_AVX2 void block_nx2(const int16_t* q, int64_t Kq, const int8_t* wp, int64_t Kp, int32_t* acc) {
  const __m256i z = _mm256_setzero_si256();
  __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z, a50 = z, a51 = z;
  const int8_t* w1 = wp + Kp * 16;
#pragma GCC unroll 2
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m256i v0 = wide_rows(wp + kp * 16), v1 = wide_rows(w1 + kp * 16);
    const int16_t* x = q + 2 * kp;
    __m256i b = pair_of(x);
    a00 = madd(a00, v0, b); a01 = madd(a01, v1, b);
    if constexpr (NS > 1) { b = pair_of(x + Kq); a10 = madd(a10, v0, b); a11 = madd(a11, v1, b); }
    if constexpr (NS > 2) { b = pair_of(x + 2 * Kq); a20 = madd(a20, v0, b); a21 = madd(a21, v1, b); }
    if constexpr (NS > 3) { b = pair_of(x + 3 * Kq); a30 = madd(a30, v0, b); a31 = madd(a31, v1, b); }
    if constexpr (NS > 4) { b = pair_of(x + 4 * Kq); a40 = madd(a40, v0, b); a41 = madd(a41, v1, b); }
    if constexpr (NS > 5) { b = pair_of(x + 5 * Kq); a50 = madd(a50, v0, b); a51 = madd(a51, v1, b); }
  }
  put(acc, a00); put(acc + 8, a01);
  if constexpr (NS > 1) { put(acc + 16, a10); put(acc + 24, a11); }
  if constexpr (NS > 2) { put(acc + 32, a20); put(acc + 40, a21); }
  if constexpr (NS > 3) { put(acc + 48, a30); put(acc + 56, a31); }
  if constexpr (NS > 4) { put(acc + 64, a40); put(acc + 72, a41); }
  if constexpr (NS > 5) { put(acc + 80, a50); put(acc + 88, a51); }
}

// y[j] = float(acc[j]) * (xs * sw[j]) + bias[j] for n values: the scalar epilogue's operations,
// 8 at a time (separate multiplies and adds: no fused multiply-add anywhere in this file).
CHARRNN_AVX2 int64_t dequantize_avx2(const int32_t* acc, float xs, const float* sw, const float* bias, float* y,
                                     int64_t n) {
  const __m256 x = _mm256_set1_ps(xs);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 scale = _mm256_mul_ps(x, _mm256_loadu_ps(sw + j));
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j))),
                                   scale);
    _mm256_storeu_ps(y + j, _mm256_add_ps(v, _mm256_loadu_ps(bias + j)));
  }
  return j;
}

// Batch 1: row-major weights (rows padded to 8, columns to 32), the activation split into |x| (u8)
// and sign(x) (s8).  vpmaddubsw(|x|, sign(x) * w) sums pairs of products exactly in int16
// (|x|, |w| <= 127: at most 32,258), vpmaddwd with ones widens them to int32: four vector
// operations per 32 products of one byte of weight each, and no horizontal sums until the end.
CHARRNN_AVX2 inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

CHARRNN_AVX2 void rows_x8(const uint8_t* xa, const int8_t* xs, const int8_t* w, int64_t Kr, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t k = 0; k < Kr; k += 32) {
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + k));
    const __m256i sg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + k));
#define CHARRNN_ROW(acc, r)                                                                             \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(m, _mm256_sign_epi8(            \
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (r) * Kr + k)), sg)), ones));
    CHARRNN_ROW(a0, 0) CHARRNN_ROW(a1, 1) CHARRNN_ROW(a2, 2) CHARRNN_ROW(a3, 3)
    CHARRNN_ROW(a4, 4) CHARRNN_ROW(a5, 5) CHARRNN_ROW(a6, 6) CHARRNN_ROW(a7, 7)
#undef CHARRNN_ROW
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), hsum4(a0, a1, a2, a3));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4), hsum4(a4, a5, a6, a7));
}
#endif

void rows_x8_generic(const uint8_t* xa, const int8_t* xs, const int8_t* w, int64_t Kr, int32_t* out) {
  for (int r = 0; r < 8; ++r) {
    int32_t sum = 0;
    for (int64_t k = 0; k < Kr; ++k) sum += int32_t(xa[k]) * (xs[k] < 0 ? -w[r * Kr + k] : xs[k] > 0 ? w[r * Kr + k] : 0);
    out[r] = sum;
  }
}

void dequantize(const int32_t* acc, float xs, const float* sw, const float* bias, float* y, int64_t n) {
  int64_t j = 0;
#ifdef CHARRNN_X86
  if (has_avx2()) j = dequantize_avx2(acc, xs, sw, bias, y, n);
#endif
  for (; j < n; ++j) {
    const float scale = xs * sw[j];
    const float v = static_cast<float>(acc[j]) * scale;
    y[j] = v + bias[j];
  }
}

// acc (ns samples x 16 rows) for the two 8-row blocks starting at wp.
void block(int ns, const int16_t* q, int64_t Kq, const int8_t* wp, int64_t Kp, int32_t* acc) {
#ifdef CHARRNN_X86
  if (has_avx2()) {
    switch (ns) {
      case 1: return block_nx2<1>(q, Kq, wp, Kp, acc);
      case 2: return block_nx2<2>(q, Kq, wp, Kp, acc);
      case 3: return block_nx2<3>(q, Kq, wp, Kp, acc);
      case 4: return block_nx2<4>(q, Kq, wp, Kp, acc);
      case 5: return block_nx2<5>(q, Kq, wp, Kp, acc);
      default: return block_nx2<6>(q, Kq, wp, Kp, acc);
    }
  }
#endif
  block_generic(ns, 2, q, Kq, wp, Kp, acc);
}

// y (B, N) = float(q @ w.T) * (sx * sw) + bias, for packed w of nblocks 8-row blocks (an even number).
void int8_gemm(const int16_t* q, int64_t B, int64_t Kq, const float* sx, const int8_t* wp, int64_t nblocks,
               int64_t N, int64_t Kp, const float* sw, const float* bias, float* y) {
  const int G = 2;                              // 8-row blocks per work item
  const int64_t items = nblocks / G;
  const int64_t work = G * 8 * Kp * 2 * B;      // multiply-adds per item
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(work, 1));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    alignas(32) int32_t acc[6 * 16];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t nb = it * G;
      const int8_t* wblk = wp + nb * Kp * 16;
      for (int64_t b0 = 0; b0 < B; b0 += 6) {
        const int ns = static_cast<int>(std::min<int64_t>(6, B - b0));
        block(ns, q + b0 * Kq, Kq, wblk, Kp, acc);
        const int width = G * 8;
        const int64_t n0 = nb * 8;
        for (int s = 0; s < ns; ++s)
          dequantize(acc + s * width, sx[b0 + s], sw + n0, bias + n0, y + (b0 + s) * N + n0,
                     std::min<int64_t>(width, N - n0));
      }
    }
  });
}

// x (K) fp32 -> y (N) = float(q(x) . w_row) * (sx * sw) + bias, with row-major wr (rows padded to 8).
void int8_gemv(const float* x, int64_t K, const int8_t* wr, int64_t rows, int64_t Kr, int64_t N, const float* sw,
               const float* bias, float* y) {
  std::vector<int16_t> q(Kr);
  float sx;
  quantize_rows(x, 1, K, K, q.data(), Kr, &sx);
  std::vector<uint8_t> xa(Kr);
  std::vector<int8_t> xs(Kr);
  for (int64_t k = 0; k < Kr; ++k) {
    xa[k] = static_cast<uint8_t>(q[k] < 0 ? -q[k] : q[k]);
    xs[k] = static_cast<int8_t>(q[k] < 0 ? -1 : q[k] > 0 ? 1 : 0);
  }
  const int64_t groups = rows / 8;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (8 * Kr));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    alignas(32) int32_t acc[8];
    for (int64_t g = g0; g < g1; ++g) {
#ifdef CHARRNN_X86
      if (has_avx2())
        rows_x8(xa.data(), xs.data(), wr + g * 8 * Kr, Kr, acc);
      else
#endif
        rows_x8_generic(xa.data(), xs.data(), wr + g * 8 * Kr, Kr, acc);
      const int64_t n0 = g * 8;
      dequantize(acc, sx, sw + n0, bias + n0, y + n0, std::min<int64_t>(8, N - n0));
    }
  });
}

// ---------------------------------------------------------------- layers
struct Linear {
  bool int8 = false;
  Tensor w, b;          // fp32: w (N, K); int8: w packed, b (N)
  Tensor wr;            // int8: row-major copy (rows padded to 8, columns to 32), for batch 1
  Tensor sw;            // int8: per-row scales (N)
  int64_t N = 0, K = 0, Kp = 0;

  // x (B, K) fp32, rows contiguous -> (B, N)
  Tensor operator()(const Tensor& x) const {
    if (!int8) return at::addmm(b, x, w.t());
    const int64_t B = x.size(0);
    RECORD_FUNCTION(B == 1 ? "charrnn::int8_matvec" : "charrnn::int8_matmul", std::vector<c10::IValue>());
    if (B == 1) {
      Tensor y = at::empty({1, N}, x.options());
      int8_gemv(x.data_ptr<float>(), K, wr.data_ptr<int8_t>(), wr.size(0), wr.size(1), N, sw.data_ptr<float>(),
                b.data_ptr<float>(), y.data_ptr<float>());
      return y;
    }
    Tensor q = at::empty({B, 2 * Kp}, x.options().dtype(at::kShort));
    Tensor sx = at::empty({B}, x.options());
    quantize_rows(x.data_ptr<float>(), B, K, x.stride(0), q.data_ptr<int16_t>(), 2 * Kp, sx.data_ptr<float>());
    Tensor y = at::empty({B, N}, x.options());
    int8_gemm(q.data_ptr<int16_t>(), B, 2 * Kp, sx.data_ptr<float>(), w.data_ptr<int8_t>(), w.size(0), N, Kp,
              sw.data_ptr<float>(), b.data_ptr<float>(), y.data_ptr<float>());
    return y;
  }
};

Linear make_linear(const std::vector<Tensor>& parts, int64_t N, int64_t K) {
  Linear l;
  l.N = N;
  l.K = K;
  if (parts.size() == 2) {
    l.w = parts[0].contiguous();
    l.b = parts[1].contiguous();
  } else {
    TORCH_CHECK(parts.size() == 4 && parts[0].scalar_type() == at::kChar && parts[0].dim() == 3 &&
                parts[0].size(0) % 2 == 0 && parts[0].size(0) * 8 >= N && parts[0].size(2) == 16 &&
                parts[1].scalar_type() == at::kChar && parts[1].size(0) % 8 == 0 && parts[1].size(0) >= N &&
                parts[1].size(1) % 32 == 0 && parts[1].size(1) >= K,
                "int8 layer: (packed (blocks, column pairs, 16), row-major, scales, bias)");
    l.int8 = true;
    l.w = parts[0].contiguous();
    l.wr = parts[1].contiguous();
    l.sw = parts[2].contiguous();
    l.b = parts[3].contiguous();
    l.Kp = l.w.size(1);
  }
  return l;
}

// Row b of the input projection: a row of the table, or of a (B, G*H) tensor.
struct Rows {
  const float* base;
  std::vector<int64_t> offset;
  const float* operator[](int64_t b) const { return base + offset[b]; }
};

class Step {
 public:
  // arch: 0 gru, 1 lstm, 2 rnn (tanh).  ih[0] is unused (the first layer reads the table).
  Step(int64_t arch, int64_t hidden, Tensor table, std::vector<std::vector<Tensor>> ih,
       std::vector<std::vector<Tensor>> hh, std::vector<Tensor> head, int64_t vocab)
      : arch_(arch), H_(hidden), table_(table.contiguous()) {
    const int64_t G = arch == 0 ? 3 : arch == 1 ? 4 : 1;
    for (size_t i = 0; i < hh.size(); ++i) {
      hh_.push_back(make_linear(hh[i], G * hidden, hidden));
      ih_.push_back(i == 0 ? Linear() : make_linear(ih[i], G * hidden, hidden));
    }
    head_ = make_linear(head, vocab, hidden);
  }

  // ids (B,) int64; state: per layer h (B, H), or h, c for LSTM.  -> (logits (B, vocab), new state)
  std::pair<Tensor, std::vector<Tensor>> step(const Tensor& ids_in, const std::vector<Tensor>& state) const {
    RECORD_FUNCTION("charrnn::step", std::vector<c10::IValue>());
    const Tensor ids = ids_in.to(at::kLong).contiguous();
    TORCH_CHECK(ids.dim() == 1, "step: ids (batch,)");
    for (const Tensor& t : state)
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == ids.size(0) && t.size(1) == H_,
                  "step: the state must be float (batch, hidden) tensors");
    const int64_t B = ids.size(0), H = H_, G = table_.size(1);
    const int64_t* id = ids.data_ptr<int64_t>();
    const int64_t V = table_.size(0);
    std::vector<Tensor> out;
    Tensor x, gi_t;
    for (size_t layer = 0; layer < hh_.size(); ++layer) {
      Rows gi;
      if (layer == 0) {
        gi.base = table_.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b) {
          TORCH_CHECK(id[b] >= 0 && id[b] < V, "id out of range");
          gi.offset.push_back(id[b] * G);
        }
      } else {
        gi_t = ih_[layer](x);
        gi.base = gi_t.data_ptr<float>();
        for (int64_t b = 0; b < B; ++b) gi.offset.push_back(b * G);
      }
      if (arch_ == 0) {
        const Tensor h = state[layer].contiguous();
        x = gru(gi, h, hh_[layer](h), B, H);
        out.push_back(x);
      } else if (arch_ == 1) {
        const Tensor h = state[2 * layer].contiguous(), c = state[2 * layer + 1].contiguous();
        auto hc = lstm(gi, c, hh_[layer](h), B, H);
        x = hc.first;
        out.push_back(hc.first);
        out.push_back(hc.second);
      } else {
        const Tensor h = state[layer].contiguous();
        x = rnn(gi, hh_[layer](h), B, H);
        out.push_back(x);
      }
    }
    return {head_(x), out};
  }

 private:
  // The same operations, in the same order, as Stepper's Python cells (see charrnn/sampling.py);
  // plain loops over rows (in parallel for large batches), ATen for sigmoid and tanh.
  template <typename F>
  static void each_row(int64_t B, int64_t H, const F& f) {
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  }

  static Tensor gru(const Rows& gi, const Tensor& h, const Tensor& gh, int64_t B, int64_t H) {
    Tensor rz = at::empty({B, 2 * H}, gh.options()), n = at::empty({B, H}, gh.options());
    Tensor hn = at::empty({B, H}, gh.options());
    float* const prz = rz.data_ptr<float>();
    float* const pn = n.data_ptr<float>();
    float* const phn = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    const float* const ph = h.data_ptr<float>();
    each_row(B, H, [&](int64_t b) {   // rz = gi[:2H] + gh[:2H]
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * 3 * H;
      float* __restrict o = prz + b * 2 * H;
      for (int64_t j = 0; j < 2 * H; ++j) o[j] = x[j] + y[j];
    });
    at::sigmoid_(rz);
    each_row(B, H, [&](int64_t b) {   // n = r * gh_n + gi_n
      const float* __restrict r = prz + b * 2 * H;
      const float* __restrict y = pgh + b * 3 * H + 2 * H;
      const float* __restrict x = gi[b] + 2 * H;
      float* __restrict o = pn + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = r[j] * y[j];
        o[j] = t + x[j];
      }
    });
    at::tanh_(n);
    each_row(B, H, [&](int64_t b) {   // h' = (h - n) * z + n
      const float* __restrict hp = ph + b * H;
      const float* __restrict np = pn + b * H;
      const float* __restrict z = prz + b * 2 * H + H;
      float* __restrict o = phn + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float d = hp[j] - np[j];
        const float e = d * z[j];
        o[j] = e + np[j];
      }
    });
    return hn;
  }

  static std::pair<Tensor, Tensor> lstm(const Rows& gi, const Tensor& c, const Tensor& gh, int64_t B, int64_t H) {
    Tensor g = at::empty({B, 4 * H}, gh.options()), cn = at::empty({B, H}, gh.options());
    Tensor hn = at::empty({B, H}, gh.options());
    float* const pg = g.data_ptr<float>();
    float* const pc = cn.data_ptr<float>();
    float* const phn = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    const float* const pc0 = c.data_ptr<float>();
    each_row(B, H, [&](int64_t b) {   // g = gi + gh
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * 4 * H;
      float* __restrict o = pg + b * 4 * H;
      for (int64_t j = 0; j < 4 * H; ++j) o[j] = x[j] + y[j];
    });
    g.narrow(1, 0, 2 * H).sigmoid_();
    g.narrow(1, 2 * H, H).tanh_();
    g.narrow(1, 3 * H, H).sigmoid_();
    each_row(B, H, [&](int64_t b) {   // c' = f * c + i * g
      const float* __restrict r = pg + b * 4 * H;
      const float* __restrict cp = pc0 + b * H;
      float* __restrict o = pc + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float fc = r[H + j] * cp[j];
        const float ig = r[j] * r[2 * H + j];
        o[j] = fc + ig;
      }
    });
    Tensor tc = at::tanh(cn);
    const float* const ptc = tc.data_ptr<float>();
    each_row(B, H, [&](int64_t b) {   // h' = o * tanh(c')
      const float* __restrict o4 = pg + b * 4 * H + 3 * H;
      const float* __restrict t = ptc + b * H;
      float* __restrict o = phn + b * H;
      for (int64_t j = 0; j < H; ++j) o[j] = o4[j] * t[j];
    });
    return {hn, cn};
  }

  static Tensor rnn(const Rows& gi, const Tensor& gh, int64_t B, int64_t H) {
    Tensor hn = at::empty({B, H}, gh.options());
    float* const p = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    each_row(B, H, [&](int64_t b) {   // h' = tanh(gi + gh)
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * H;
      float* __restrict o = p + b * H;
      for (int64_t j = 0; j < H; ++j) o[j] = x[j] + y[j];
    });
    at::tanh_(hn);
    return hn;
  }

  int64_t arch_, H_;
  Tensor table_;
  std::vector<Linear> ih_, hh_;
  Linear head_;
};

// The next ids (B,) from logits (B, V), as charrnn.sampling.choose does for a temperature > 0
// without top-k / top-p, with the same operations: logits / T, [UNK] (id 0) -> -inf, softmax,
// cumsum, u ~ U[0, 1) drawn from the generator as torch.rand((B, 1)), the first id whose
// cumulative probability exceeds u * total.
Tensor sample(const Tensor& logits_in, c10::optional<at::Generator> gen, double temperature) {
  RECORD_FUNCTION("charrnn::sample", std::vector<c10::IValue>());
  const Tensor logits = logits_in.contiguous();
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sample: float logits (B, V)");
  const int64_t B = logits.size(0), V = logits.size(1);
  Tensor x = at::div(logits, temperature);
  x.select(1, 0).fill_(-std::numeric_limits<float>::infinity());
  const Tensor cdf = at::softmax(x, -1).cumsum(-1);
  const Tensor u = at::rand({B, 1}, gen, logits.options());
  Tensor ids = at::empty({B}, logits.options().dtype(at::kLong));
  const float* c = cdf.data_ptr<float>();
  const float* pu = u.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = c + b * V;
    const float v = pu[b] * row[V - 1];
    out[b] = std::min<int64_t>(std::upper_bound(row, row + V, v) - row, V - 1);
  }
  return ids;
}

// The int8 product alone, for tests: x (B, K) fp32 -> (B, N).
Tensor int8_linear(const Tensor& x, const std::vector<Tensor>& parts, int64_t N) {
  Linear l = make_linear(parts, N, x.size(1));
  return l(x.contiguous());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Step>(m, "Step")
      .def(py::init<int64_t, int64_t, Tensor, std::vector<std::vector<Tensor>>, std::vector<std::vector<Tensor>>,
                    std::vector<Tensor>, int64_t>())
      .def("step", &Step::step, py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>());
  m.def("sample", &sample, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx2", &has_avx2);
  m.def("set_portable", [](bool on) { g_portable = on; }, "use the portable loops instead of AVX2 (for tests)");
}
"""

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]

_lock = threading.Lock()
_module = None
_tried = False
_error: str | None = None


def build_name() -> str:
    """The extension's name: a hash of the source, the flags, torch and the machine, so a changed
    source or another torch never picks up a stale build."""
    key = "\n".join([_SOURCE, " ".join(_FLAGS), torch.__version__, platform.machine(), sys.version,
                     torch.backends.cpu.get_cpu_capability()])
    return "charrnn_step_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def load():
    """The compiled module (built on the first call in any process, then cached on disk), or None
    when it is turned off (``CHARRNN_NATIVE=0``) or cannot be built (see :func:`error`)."""
    global _module, _tried, _error
    if not ENABLED:
        return None
    with _lock:
        if _tried:
            return _module
        _tried = True
        try:
            from torch.utils import cpp_extension

            name = build_name()
            build_dir = cpp_extension._get_build_directory(name, False)
            if not any(f.endswith((".so", ".pyd")) for f in os.listdir(build_dir)):
                print("charrnn: compiling the sampling kernels (once, about a minute)...", file=sys.stderr, flush=True)
            _module = cpp_extension.load_inline(name, cpp_sources=[_SOURCE], extra_cflags=_FLAGS,
                                                build_directory=build_dir, verbose=False)
        except Exception as e:  # no compiler, no ninja, a failed build: the Python path does the same
            _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"charrnn: the compiled sampling step is unavailable ({_error}); "
                          "using the pure-PyTorch step (same results, slower)", RuntimeWarning, stacklevel=2)
            _module = None
        return _module


def loaded():
    """The compiled module if an earlier :func:`load` built it, else None (never compiles)."""
    return _module


def error() -> str | None:
    """Why :func:`load` answered None, if it tried and failed."""
    return _error
