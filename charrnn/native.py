"""The sampling step in C++: int8 matrix kernels and the whole per-character step in one call;
also the LSTM's training loops, the GRU's per-step gate arithmetic and the recurrent layers'
per-step fp32 products (see "fp32 recurrent products", "LSTM training loops" and "GRU training
steps" in the source and :mod:`charrnn.models.fast_rnn`, which uses them for float32 on CPU).

:class:`charrnn.sampling.Stepper` runs one character at a time.  In Python that is some thirty
small ATen calls per character, each costing microseconds of dispatch, which is as much as
the arithmetic at batch 1; and PyTorch's own int8 kernels (fbgemm, deprecated) quantise
the activations per batch.  This module compiles, on first use, a small C++ extension
(``torch.utils.cpp_extension.load_inline``; it needs a C++ compiler and ninja) that does a
whole step, and the sampling draw, in one call each:

* int8 matrix products: 7-bit weights (one scale per output row) times 8-bit activations
  (one scale per sample, so a sample's result never depends on the others in its batch),
  summed exactly in int32 (AVX2 ``vpmaddubsw`` / ``vpmaddwd`` where the CPU has them,
  portable loops elsewhere), then ``acc * (scale_x * scale_w) + bias`` in fp32;
* fp32 matrix products through the same ``at::addmm`` Python would call;
* the gate arithmetic in plain loops, with ``at::sigmoid_`` / ``at::tanh_`` applied to
  buffers of exactly the shapes the Python path uses;
* sampling: the same ATen softmax / cumsum / rand calls as :func:`charrnn.sampling.choose`.

Every operation is either exact (integer sums), a single correctly rounded IEEE operation
in the same order as the Python path (no fused multiply-adds: ``-ffp-contract=off`` and no
FMA target), or the same ATen kernel on the same shapes, so the compiled step and the
pure-PyTorch step in :mod:`charrnn.sampling` give bit-identical results (the tests check
it): a seed gives the same text with or without a compiler.

The build is cached in PyTorch's extension folder (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that hashes this source, the flags, torch, Python
and the machine, and is reused by every later process.  ``CHARRNN_NATIVE=0`` turns it off;
without a compiler :func:`load` answers None (with one warning) and the Python path runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import threading
import warnings

import torch
import torch._appdirs

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
#else
bool has_avx2() { return false; }
#endif

// ---------------------------------------------------------------- int8 activations
// Weights and activations both use 63 levels either side of zero (7 bits), the range in which
// the AVX2 byte products below can neither saturate nor overflow (see the matrix product).
constexpr int kLevels = 63;

// One sample x (K) fp32 -> xu (Kq) uint8 and its scale s:
//   m = max|x|, s = m / 63, xq = round_half_even(x * (63 / m)) in [-63, 63] (0 when m = 0),
//   xu = xq + 63 in [0, 126]; the padding columns K..Kq hold 63 (xq = 0).
#ifdef CHARRNN_X86
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

// vcvtps2dq rounds to nearest even, like std::nearbyint.
CHARRNN_AVX2 int64_t offset_round_avx2(const float* x, int64_t K, float inv, uint8_t* xu) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i off = _mm256_set1_epi32(kLevels);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s)), off);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(xu + k), _mm_packus_epi16(w, w));
  }
  return k;
}
#endif

void quantize_row(const float* x, int64_t K, uint8_t* xu, int64_t Kq, float* s) {
  float m = 0.f;
#ifdef CHARRNN_X86
  if (has_avx2())
    m = absmax_avx2(x, K);
  else
#endif
    for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  const float levels = static_cast<float>(kLevels);
  const float inv = m > 0.f ? levels / m : 0.f;
  *s = m / levels;
  int64_t k = 0;
#ifdef CHARRNN_X86
  if (has_avx2()) k = offset_round_avx2(x, K, inv, xu);
#endif
  for (; k < K; ++k) xu[k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[k] * inv)) + kLevels);
  for (k = K; k < Kq; ++k) xu[k] = kLevels;
}

// ---------------------------------------------------------------- int8 matrix product
// Weights w in [-63, 63], one fp32 scale per row, packed as
//   [blocks of 8 rows (a multiple of 4)][K/4 column quads (an even number)][8 rows][4 columns]
// int8, zero padded.  vpmaddubsw(xu, w) multiplies unsigned by signed bytes and adds
// neighbours into int16: with xu <= 126 and |w| <= 63 a pair is at most 15,876 in size, so two
// quads' pairs add up in int16 (at most 31,752) before vpmaddwd with ones widens them to int32:
// five vector operations per 64 products, no widening of the weights, no horizontal sums.
// acc = sum_k xu[k] w[k] = sum_k xq[k] w[k] + 63 * sum_k w[k]; comp[n] = 63 * sum_k w[n][k]
// comes with the weights and is subtracted exactly in int32.

// Where a block's sums go: y[s][j] = float(acc[s][j] - comp[j]) * (xs[s] * sw[j]) + bias[j] (rows j of
// the block, samples s), the epilogue's operations 8 at a time, straight from the registers; or, for
// a block whose rows run past N, the raw sums into acc (then dequantize() below, row by row).
struct Sink {
  const int32_t* comp;
  const float* sw;
  const float* bias;
  const float* xs;
  float* y;
  int64_t ldy;
  int32_t* acc;   // null: every row of the block is a real output row
  int width;      // rows per block (acc's row stride)
};

void block_portable(int ns, int nw, const uint8_t* xu, int64_t Kq, const int8_t* wp, int64_t quads, int32_t* acc) {
  for (int s = 0; s < ns; ++s)
    for (int j = 0; j < nw * 8; ++j) {
      const int8_t* w = wp + (j / 8) * quads * 32 + (j % 8) * 4;
      const uint8_t* x = xu + s * Kq;
      int32_t sum = 0;
      for (int64_t c = 0; c < quads; ++c)
        for (int i = 0; i < 4; ++i) sum += int32_t(x[4 * c + i]) * w[c * 32 + i];
      acc[s * nw * 8 + j] = sum;
    }
}

#ifdef CHARRNN_X86
CHARRNN_AVX2 inline __m256i quad_of(const uint8_t* x) {   // a sample's 4 columns, in every lane
  int32_t v;
  std::memcpy(&v, x, sizeof v);
  return _mm256_set1_epi32(v);
}
CHARRNN_AVX2 inline __m256i rows8(const int8_t* p) {       // 8 rows x 4 columns
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
// acc += the 8 rows' products with two quads of columns (x0 with w0, x1 with w1).
CHARRNN_AVX2 inline __m256i dot2(__m256i acc, __m256i x0, __m256i w0, __m256i x1, __m256i w1, __m256i ones) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(x0, w0), _mm256_maddubs_epi16(x1, w1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}
CHARRNN_AVX2 inline void put(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// y[0..8) = float(acc - comp) * (xs * sw) + bias: the scalar epilogue's operations, 8 at a time
// (separate multiplies and adds: no fused multiply-add anywhere in this file).
CHARRNN_AVX2 inline void epilogue8(__m256i acc, const int32_t* comp, __m256 xs, const float* sw, const float* bias,
                                   float* y) {
  const __m256 scale = _mm256_mul_ps(xs, _mm256_loadu_ps(sw));
  const __m256i d = _mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(comp)));
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), scale), _mm256_loadu_ps(bias)));
}

CHARRNN_AVX2 inline void emit(const Sink& o, int s, int r, __m256i v) {
  if (o.acc) return put(o.acc + s * o.width + 8 * r, v);
  epilogue8(v, o.comp + 8 * r, _mm256_set1_ps(o.xs[s]), o.sw + 8 * r, o.bias + 8 * r, o.y + s * o.ldy + 8 * r);
}

// NS samples (1..4) x 16 rows; every accumulator a named variable (unused ones vanish), so
// that all of them stay in registers.
template <int NS>
CHARRNN_AVX2 void block_nx2(const uint8_t* xu, int64_t Kq, const int8_t* wp, int64_t quads, const Sink& o) {
  const __m256i ones = _mm256_set1_epi16(1), z = _mm256_setzero_si256();
  __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z;
  const int8_t* w1 = wp + quads * 32;
  for (int64_t c = 0; c < quads; c += 2) {
    const __m256i v0 = rows8(wp + c * 32), u0 = rows8(wp + c * 32 + 32);
    const __m256i v1 = rows8(w1 + c * 32), u1 = rows8(w1 + c * 32 + 32);
    const uint8_t* x = xu + 4 * c;
    __m256i b = quad_of(x), d = quad_of(x + 4);
    a00 = dot2(a00, b, v0, d, u0, ones); a01 = dot2(a01, b, v1, d, u1, ones);
    if constexpr (NS > 1) {
      b = quad_of(x + Kq); d = quad_of(x + Kq + 4);
      a10 = dot2(a10, b, v0, d, u0, ones); a11 = dot2(a11, b, v1, d, u1, ones);
    }
    if constexpr (NS > 2) {
      b = quad_of(x + 2 * Kq); d = quad_of(x + 2 * Kq + 4);
      a20 = dot2(a20, b, v0, d, u0, ones); a21 = dot2(a21, b, v1, d, u1, ones);
    }
    if constexpr (NS > 3) {
      b = quad_of(x + 3 * Kq); d = quad_of(x + 3 * Kq + 4);
      a30 = dot2(a30, b, v0, d, u0, ones); a31 = dot2(a31, b, v1, d, u1, ones);
    }
  }
  emit(o, 0, 0, a00); emit(o, 0, 1, a01);
  if constexpr (NS > 1) { emit(o, 1, 0, a10); emit(o, 1, 1, a11); }
  if constexpr (NS > 2) { emit(o, 2, 0, a20); emit(o, 2, 1, a21); }
  if constexpr (NS > 3) { emit(o, 3, 0, a30); emit(o, 3, 1, a31); }
}

// Batch 1: one sample x 32 rows (four weight streams at once).
CHARRNN_AVX2 void block_1x4(const uint8_t* xu, const int8_t* wp, int64_t quads, const Sink& o) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  const int8_t *w0 = wp, *w1 = wp + quads * 32, *w2 = wp + 2 * quads * 32, *w3 = wp + 3 * quads * 32;
  for (int64_t c = 0; c < quads; c += 2) {
    const __m256i b = quad_of(xu + 4 * c), d = quad_of(xu + 4 * c + 4);
    a0 = dot2(a0, b, rows8(w0 + c * 32), d, rows8(w0 + c * 32 + 32), ones);
    a1 = dot2(a1, b, rows8(w1 + c * 32), d, rows8(w1 + c * 32 + 32), ones);
    a2 = dot2(a2, b, rows8(w2 + c * 32), d, rows8(w2 + c * 32 + 32), ones);
    a3 = dot2(a3, b, rows8(w3 + c * 32), d, rows8(w3 + c * 32 + 32), ones);
  }
  emit(o, 0, 0, a0); emit(o, 0, 1, a1); emit(o, 0, 2, a2); emit(o, 0, 3, a3);
}

// y[j] = float(acc[j] - comp[j]) * (xs * sw[j]) + bias[j] for whole groups of 8; returns how many.
CHARRNN_AVX2 int64_t dequantize_avx2(const int32_t* acc, const int32_t* comp, float xs, const float* sw,
                                     const float* bias, float* y, int64_t n) {
  const __m256 x = _mm256_set1_ps(xs);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    epilogue8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)), comp + j, x, sw + j, bias + j, y + j);
  return j;
}
#endif

void dequantize(const int32_t* acc, const int32_t* comp, float xs, const float* sw, const float* bias, float* y,
                int64_t n) {
  int64_t j = 0;
#ifdef CHARRNN_X86
  if (has_avx2()) j = dequantize_avx2(acc, comp, xs, sw, bias, y, n);
#endif
  for (; j < n; ++j) {
    const float scale = xs * sw[j];
    const float v = static_cast<float>(acc[j] - comp[j]) * scale;
    y[j] = v + bias[j];
  }
}

constexpr int kSamples = 4;   // samples per block at batches > 1

// ns samples x nw blocks of 8 rows starting at wp (ns = 1 with nw = 4, or ns <= 4 with nw = 2) into o.
void block(int ns, int nw, const uint8_t* xu, int64_t Kq, const int8_t* wp, int64_t quads, const Sink& o) {
#ifdef CHARRNN_X86
  if (has_avx2()) {
    if (nw == 4) return block_1x4(xu, wp, quads, o);
    switch (ns) {
      case 1: return block_nx2<1>(xu, Kq, wp, quads, o);
      case 2: return block_nx2<2>(xu, Kq, wp, quads, o);
      case 3: return block_nx2<3>(xu, Kq, wp, quads, o);
      default: return block_nx2<4>(xu, Kq, wp, quads, o);
    }
  }
#endif
  block_portable(ns, nw, xu, Kq, wp, quads, o.acc);
}

// y (B, N) = float(xq @ w.T) * (sx * sw) + bias.  Work items of 32 rows at batch 1, 16 rows
// (times every sample, 4 at a time) otherwise, shared between the threads.
void int8_gemm(const uint8_t* xu, int64_t B, int64_t Kq, const float* sx, const int8_t* wp, int64_t nblocks,
               int64_t quads, const int32_t* comp, const float* sw, const float* bias, float* y, int64_t N) {
  const int nw = B == 1 ? 4 : 2;
  const int64_t items = nblocks / nw;
  const int64_t work = nw * 8 * Kq * B;                   // multiply-adds per item
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(work, 1));
  const bool fused = has_avx2();
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    alignas(32) int32_t acc[kSamples * 16 > 32 ? kSamples * 16 : 32];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * nw * 8;
      if (n0 >= N) break;
      const int8_t* wblk = wp + it * nw * quads * 32;
      const int64_t width = std::min<int64_t>(nw * 8, N - n0);
      const bool whole = fused && width == nw * 8;
      for (int64_t b0 = 0; b0 < B; b0 += kSamples) {
        const int ns = static_cast<int>(std::min<int64_t>(kSamples, B - b0));
        const Sink o{comp + n0, sw + n0, bias + n0, sx + b0, y + b0 * N + n0, N, whole ? nullptr : acc, nw * 8};
        block(ns, nw, xu + b0 * Kq, Kq, wblk, quads, o);
        if (!whole)
          for (int s = 0; s < ns; ++s)
            dequantize(acc + s * nw * 8, comp + n0, sx[b0 + s], sw + n0, bias + n0, y + (b0 + s) * N + n0, width);
      }
    }
  });
}

// ---------------------------------------------------------------- layers
struct Linear {
  bool int8 = false;
  Tensor w, b;          // fp32: w (N, K); int8: w packed (blocks, quads, 32), b (N)
  Tensor comp, sw;      // int8: 63 * row sums (int32, padded rows), per-row scales (N)
  int64_t N = 0, K = 0;

  // x (B, K) fp32, rows contiguous -> (B, N)
  Tensor operator()(const Tensor& x) const {
    if (!int8) return at::addmm(b, x, w.t());
    const int64_t B = x.size(0), quads = w.size(1), Kq = 4 * quads;
    RECORD_FUNCTION(B == 1 ? "charrnn::int8_matvec" : "charrnn::int8_matmul", std::vector<c10::IValue>());
    Tensor xu = at::empty({B, Kq}, x.options().dtype(at::kByte));
    Tensor sx = at::empty({B}, x.options());
    const float* px = x.data_ptr<float>();
    uint8_t* pxu = xu.data_ptr<uint8_t>();
    float* psx = sx.data_ptr<float>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) quantize_row(px + b * x.stride(0), K, pxu + b * Kq, Kq, psx + b);
    });
    Tensor y = at::empty({B, N}, x.options());
    int8_gemm(pxu, B, Kq, psx, w.data_ptr<int8_t>(), w.size(0), quads, comp.data_ptr<int32_t>(),
              sw.data_ptr<float>(), b.data_ptr<float>(), y.data_ptr<float>(), N);
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
                parts[0].size(0) % 4 == 0 && parts[0].size(0) * 8 >= N && parts[0].size(1) * 4 >= K &&
                parts[0].size(1) % 2 == 0 && parts[0].size(2) == 32 && parts[1].scalar_type() == at::kInt && parts[1].numel() >= N &&
                parts[2].numel() >= N && parts[3].numel() >= N,
                "int8 layer: (packed (blocks, quads, 32), 63 * row sums, scales, bias)");
    l.int8 = true;
    l.w = parts[0].contiguous();
    l.comp = parts[1].contiguous();
    l.sw = parts[2].contiguous();
    l.b = parts[3].contiguous();
  }
  return l;
}

// f(b) for b < B, rows shared between the threads in chunks of about 32k elements of width each.
template <typename F>
void for_rows(int64_t B, int64_t width, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
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
  // plain loops over rows (in parallel for large batches), ATen for the sigmoids.  tanh(a) is
  // computed as 2 * sigmoid(2a) - 1 (doubling is exact): ATen's sigmoid costs a quarter of its tanh.

  static Tensor gru(const Rows& gi, const Tensor& h, const Tensor& gh, int64_t B, int64_t H) {
    Tensor rz = at::empty({B, 2 * H}, gh.options()), n = at::empty({B, H}, gh.options());
    Tensor hn = at::empty({B, H}, gh.options());
    float* const prz = rz.data_ptr<float>();
    float* const pn = n.data_ptr<float>();
    float* const phn = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    const float* const ph = h.data_ptr<float>();
    for_rows(B, H, [&](int64_t b) {   // rz = gi[:2H] + gh[:2H]
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * 3 * H;
      float* __restrict o = prz + b * 2 * H;
      for (int64_t j = 0; j < 2 * H; ++j) o[j] = x[j] + y[j];
    });
    at::sigmoid_(rz);
    for_rows(B, H, [&](int64_t b) {   // 2 * (r * gh_n + gi_n)
      const float* __restrict r = prz + b * 2 * H;
      const float* __restrict y = pgh + b * 3 * H + 2 * H;
      const float* __restrict x = gi[b] + 2 * H;
      float* __restrict o = pn + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = r[j] * y[j];
        const float u = t + x[j];
        o[j] = u * 2.f;
      }
    });
    at::sigmoid_(n);
    for_rows(B, H, [&](int64_t b) {   // n = 2 * sigmoid - 1;  h' = (h - n) * z + n
      const float* __restrict hp = ph + b * H;
      const float* __restrict sp = pn + b * H;
      const float* __restrict z = prz + b * 2 * H + H;
      float* __restrict o = phn + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = sp[j] * 2.f;
        const float nv = t - 1.f;
        const float d = hp[j] - nv;
        const float e = d * z[j];
        o[j] = e + nv;
      }
    });
    return hn;
  }

  static std::pair<Tensor, Tensor> lstm(const Rows& gi, const Tensor& c, const Tensor& gh, int64_t B, int64_t H) {
    Tensor g = at::empty({B, 4 * H}, gh.options()), cn = at::empty({B, H}, gh.options());
    Tensor tc = at::empty({B, H}, gh.options()), hn = at::empty({B, H}, gh.options());
    float* const pg = g.data_ptr<float>();
    float* const pc = cn.data_ptr<float>();
    float* const ptc = tc.data_ptr<float>();
    float* const phn = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    const float* const pc0 = c.data_ptr<float>();
    for_rows(B, H, [&](int64_t b) {   // [i, f, 2 g, o] = gi + gh, the g part doubled
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * 4 * H;
      float* __restrict o = pg + b * 4 * H;
      for (int64_t j = 0; j < 4 * H; ++j) o[j] = x[j] + y[j];
      for (int64_t j = 2 * H; j < 3 * H; ++j) o[j] = o[j] * 2.f;
    });
    at::sigmoid_(g);
    for_rows(B, H, [&](int64_t b) {   // g = 2 * sigmoid - 1;  c' = f * c + i * g;  2 c'
      const float* __restrict r = pg + b * 4 * H;
      const float* __restrict cp = pc0 + b * H;
      float* __restrict o = pc + b * H;
      float* __restrict t2 = ptc + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = r[2 * H + j] * 2.f;
        const float gv = t - 1.f;
        const float fc = r[H + j] * cp[j];
        const float ig = r[j] * gv;
        o[j] = fc + ig;
        t2[j] = o[j] * 2.f;
      }
    });
    at::sigmoid_(tc);
    for_rows(B, H, [&](int64_t b) {   // h' = o * (2 * sigmoid(2 c') - 1)
      const float* __restrict o4 = pg + b * 4 * H + 3 * H;
      const float* __restrict sp = ptc + b * H;
      float* __restrict o = phn + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = sp[j] * 2.f;
        const float tv = t - 1.f;
        o[j] = o4[j] * tv;
      }
    });
    return {hn, cn};
  }

  static Tensor rnn(const Rows& gi, const Tensor& gh, int64_t B, int64_t H) {
    Tensor hn = at::empty({B, H}, gh.options());
    float* const p = hn.data_ptr<float>();
    const float* const pgh = gh.data_ptr<float>();
    for_rows(B, H, [&](int64_t b) {   // 2 (gi + gh)
      const float* __restrict x = gi[b];
      const float* __restrict y = pgh + b * H;
      float* __restrict o = p + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float u = x[j] + y[j];
        o[j] = u * 2.f;
      }
    });
    at::sigmoid_(hn);
    for_rows(B, H, [&](int64_t b) {   // h' = 2 * sigmoid - 1
      float* __restrict o = p + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const float t = o[j] * 2.f;
        o[j] = t - 1.f;
      }
    });
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

void check_rows(const Tensor& t, int64_t B, int64_t W, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B && t.size(1) == W && t.stride(1) == 1,
              what, " must be float (", B, ", ", W, ") with unit last stride");
}

// ---------------------------------------------------------------- fp32 recurrent products
// A recurrent layer's per-step product, out (B, N) = x (B, K) @ w.T + bias (+ other), with one weight
// and a few hundred steps: w is packed once (pack_panels) into panels of 24 rows laid out column by
// column, (ceil(N / 24), K, 24) zero padded, and each 4 x 24 tile of out is summed in 12 AVX2
// registers with fused multiply-adds over chunks of 512 columns of K (the panel's 48 KB chunk is
// reused from cache for every 4 rows of x).  The threads share the panels.  At 32 x 1024 x 3072 on a
// 2-core Zen 3 that is 120-163 GFLOP/s of the 166 peak, where oneDNN's packed matmul reaches 85-111
// and MKL's addmm ~75 (benchmarks/kernels.py).  Not bit-identical to addmm (another summation order, fused multiply-adds).
// Without AVX2 + FMA, has_fma() says no and callers keep the ATen products.
constexpr int64_t kPanel = 24, kChunk = 512;

#ifdef CHARRNN_X86
bool has_fma() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("fma"));
  return yes && has_avx2();
}

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
#else
bool has_fma() { return false; }
#endif

// w (N, K) float -> its panels (ceil(N / 24), K, 24), zero padded.
Tensor pack_panels(const Tensor& w_in) {
  RECORD_FUNCTION("charrnn::pack_panels", std::vector<c10::IValue>());
  TORCH_CHECK(w_in.scalar_type() == at::kFloat && w_in.dim() == 2, "pack_panels: a float matrix");
  const Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), np = (N + kPanel - 1) / kPanel;
  Tensor P = at::zeros({np, K, kPanel}, w.options());
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
  RECORD_FUNCTION("charrnn::packed_matmul", std::vector<c10::IValue>());
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

// Whether a recurrent product of this many rows goes through the panels (here and in fast_rnn._Product):
// with AVX2 + FMA, up to 256 rows (from 512 on, MKL is as fast).
bool use_panels(int64_t rows) { return has_fma() && rows <= 256; }

// ---------------------------------------------------------------- LSTM training loops
// The time loops of charrnn.models.fast_rnn's LSTM (gates [i, f, g, o]).  Per step, one matrix
// product and then one pass over each row for all the gate arithmetic, instead of a dozen ATen
// calls over the whole batch: at batch 1024 x hidden 128 those calls, not the matrix products,
// were half of a training step.  sigmoid(a) = 1 / (1 + exp(-a)) with a Cephes-style exp (AVX2,
// within a few ulp), tanh(a) = 2 sigmoid(2a) - 1.  Not bit-identical to the ATen loops (the tests
// compare within float32 rounding); the gradients are exact for the activations computed.
inline float sigmoid1(float a) { return 1.0f / (1.0f + std::exp(-a)); }

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
CHARRNN_AVX2 inline __m256 exp8(__m256 x) {   // Cephes expf: 2^n * p(r), |r| <= ln(2) / 2
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
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

// gi: the input projection (T, B, 4H), unit last stride, or with ids (B, T) a (V, 4H) table whose
// rows are looked up.  -> gates (B, T, 4H) activations, cs (B, T, H) cells, tcs = tanh(cs), ys.
std::vector<Tensor> lstm_forward(const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& h0,
                                 const Tensor& c0, const Tensor& w_hh, const Tensor& b_hh) {
  RECORD_FUNCTION("charrnn::lstm_forward", std::vector<c10::IValue>());
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
  RECORD_FUNCTION("charrnn::lstm_backward", std::vector<c10::IValue>());
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

// ---------------------------------------------------------------- GRU training steps
// One time step of charrnn.models.fast_rnn's GRU around its matrix product (which stays in Python,
// on oneDNN's packed weight): one pass over each row for all the gate arithmetic instead of eight
// ATen calls over the batch, with the same sigmoid and tanh as the LSTM loops above.  Forward,
// with a = W_hh h + b_hh and x the input projection: r = sigmoid(a_r + x_r), z = sigmoid(a_z +
// x_z), n = tanh(x_n + r a_n), h' = (h - n) z + n; saved: [r, z, a_n], n, h'.
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

// Step t.  a (B, 3H) = h_{t-1} W_hh^T + b_hh; gi (T, B, 3H) with unit last stride, or with ids
// (B, T) int64 a (V, 3H) table; hp = h_{t-1} (B, H); gates (B, T, 3H), ns and ys (B, T, H) contiguous.
void gru_forward_step(const Tensor& a, const Tensor& gi, const c10::optional<Tensor>& ids_opt, const Tensor& hp,
                      const Tensor& gates, const Tensor& ns, const Tensor& ys, int64_t t) {
  RECORD_FUNCTION("charrnn::gru_forward_step", std::vector<c10::IValue>());
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
  RECORD_FUNCTION("charrnn::gru_backward_step", std::vector<c10::IValue>());
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

// The int8 product alone, for tests: x (B, K) fp32 -> (B, N).
Tensor int8_linear(const Tensor& x, const std::vector<Tensor>& parts, int64_t N) {
  Linear l = make_linear(parts, N, x.size(1));
  return l(x.contiguous());
}

// ---------------------------------------------------------------- dropout
// Dropout whose mask is a function of (key, element index): element i is kept when
// hash(key, i) >= threshold, with hash two rounds of the lowbias32 integer mixer.  The forward
// pass and the backward pass compute the same mask from the same key, so nothing is stored
// between them, and the mask does not depend on the number of threads or on AVX2 (the two
// loops below do the same integer operations and one float multiply per element).

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

// x (any shape, contiguous float) -> x * mask / (1 - p), the mask drawn from `seed`.
// Element i of x is element offset + i of the whole tensor whose mask this is (a slice of it).
// The result goes to out when given (which may be x itself).
Tensor dropout(const Tensor& x, double p, int64_t seed, int64_t offset, const c10::optional<Tensor>& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "dropout: x must be a contiguous float CPU tensor");
  TORCH_CHECK(p >= 0 && p < 1 && offset >= 0, "dropout: p must be in [0, 1) and offset >= 0");
  Tensor y = out.has_value() ? *out : at::empty_like(x);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Step>(m, "Step")
      .def(py::init<int64_t, int64_t, Tensor, std::vector<std::vector<Tensor>>, std::vector<std::vector<Tensor>>,
                    std::vector<Tensor>, int64_t>())
      .def("step", &Step::step, py::call_guard<py::gil_scoped_release>());
  m.def("lstm_forward", &lstm_forward, py::call_guard<py::gil_scoped_release>());
  m.def("lstm_backward", &lstm_backward, py::call_guard<py::gil_scoped_release>());
  m.def("gru_forward_step", &gru_forward_step, py::call_guard<py::gil_scoped_release>());
  m.def("gru_backward_step", &gru_backward_step, py::call_guard<py::gil_scoped_release>());
  m.def("dropout", &dropout, py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("offset") = 0,
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("pack_panels", &pack_panels, py::call_guard<py::gil_scoped_release>());
  m.def("packed_matmul", &packed_matmul, py::call_guard<py::gil_scoped_release>());
  m.def("has_fma", &has_fma);
  m.def("use_panels", &use_panels, "whether a product of this many rows goes through packed_matmul");
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>());
  m.def("sample", &sample, py::call_guard<py::gil_scoped_release>());
  m.def("has_avx2", &has_avx2);
  m.def("set_portable", [](bool on) { g_portable = on; }, "use the portable loops instead of AVX2 (for tests)");
}
"""

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread.  A compiler without
# OpenMP still gets the extension, single-threaded.
_VARIANTS = (["-fopenmp"], [])

_lock = threading.Lock()
_module = None
_tried = False
_error: str | None = None


def build_name(variant: list[str] | None = None) -> str:
    """The extension's name: a hash of the source, the flags, torch and the machine, so a changed
    source or another torch never picks up a stale build."""
    flags = _FLAGS + (_VARIANTS[0] if variant is None else variant)
    key = "\n".join([_SOURCE, " ".join(flags), torch.__version__, platform.machine(), sys.version,
                     torch.backends.cpu.get_cpu_capability()])
    return "charrnn_step_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _built_path(name: str) -> str:
    """Where ``load_inline`` puts the library named ``name`` (its ``_get_build_directory`` for
    torch's CPU builds; test_native_prebuilt checks the two agree)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accelerator = "cpu" if torch.version.cuda is None and torch.version.hip is None else "gpu"
        root = os.path.join(os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions")),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
                            f"_{accelerator}")
    return os.path.join(root, name, name + ".so")


def _prebuilt(variant: list[str]):
    """The library an earlier process built, imported directly, or None: importing
    torch.utils.cpp_extension (setuptools and all) costs 0.2 s and 4 MB of every process."""
    name = build_name(variant)
    path = _built_path(name)
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(variant: list[str]):
    from torch.utils import cpp_extension

    name = build_name(variant)
    build_dir = cpp_extension._get_build_directory(name, False)
    if not any(f.endswith((".so", ".pyd")) for f in os.listdir(build_dir)):
        print("charrnn: compiling its C++ kernels (once, about a minute)...", file=sys.stderr, flush=True)
    # copies: load_inline appends its own libraries to extra_ldflags, which would change build_name()
    return cpp_extension.load_inline(name, cpp_sources=[_SOURCE], extra_cflags=_FLAGS + list(variant),
                                     extra_ldflags=list(variant), build_directory=build_dir, verbose=False)


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "subcommand failed" not in ln]
    return f"{type(e).__name__}: {(errors or lines or [''])[0][:300]}"


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
        for variant in _VARIANTS:
            try:
                try:
                    _module = _prebuilt(variant)
                except Exception:                  # a partial or foreign file: load_inline decides
                    _module = None
                _module = _module or _build(variant)
                _error = None
                break
            except Exception as e:  # no compiler, no ninja, a failed build: the Python path does the same
                _error = _reason(e)
        if _module is None:
            warnings.warn(f"charrnn: the compiled sampling step is unavailable ({_error}); "
                          "using the pure-PyTorch step (same results, slower)", RuntimeWarning, stacklevel=2)
        return _module


def loaded():
    """The compiled module if an earlier :func:`load` built it, else None (never compiles)."""
    return _module


def error() -> str | None:
    """Why :func:`load` answered None, if it tried and failed."""
    return _error
