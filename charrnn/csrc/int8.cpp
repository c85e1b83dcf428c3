// int8 matrix products for the sampling step: activations quantised per sample, 7-bit weights packed in
// blocks of rows, exact int32 sums (AVX2 vpmaddubsw / vpmaddwd where the CPU has them, portable loops
// elsewhere), then acc * (scale_x * scale_w) + bias in fp32; and the layers (Linear) that use them.
#include "charrnn.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace charrnn {
namespace {

// ---------------------------------------------------------------- int8 activations
// Weights and activations both use 63 levels either side of zero (7 bits), the range in which
// the AVX2 byte products below can neither saturate nor overflow (see the matrix product).
constexpr int kLevels = 63;

// One sample x (K) fp32 -> xu (Kq) uint8 and its scale s:
//   m = max|x|, s = m / 63, xq = round_half_even(x * (63 / m)) in [-63, 63] (0 when m = 0),
//   xu = xq + 63 in [0, 126]; the padding columns K..Kq hold 63 (xq = 0).
// A sample holding a NaN or an infinity has a NaN scale, so that all its outputs are NaN, as in the
// PyTorch reference (whose amax propagates NaN, and whose x * (63 / inf) is NaN where x is infinite):
// a max that skips NaN would hide it.
#ifdef CHARRNN_X86
CHARRNN_AVX2 float absmax_avx2(const float* x, int64_t K) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    m = _mm256_max_ps(m, _mm256_and_ps(v, mask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = 0.f;
  for (float v : t) r = std::max(r, v);
  for (; k < K; ++k) {
    if (std::isnan(x[k])) return std::numeric_limits<float>::quiet_NaN();
    r = std::max(r, std::fabs(x[k]));
  }
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
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(x[k]);
      if (a > m || std::isnan(a)) m = a;   // once NaN, m stays NaN
    }
  if (!std::isfinite(m)) {   // every output is NaN through the scale; the codes do not matter
    *s = std::numeric_limits<float>::quiet_NaN();
    std::fill(xu, xu + Kq, static_cast<uint8_t>(kLevels));
    return;
  }
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

}  // namespace

// ---------------------------------------------------------------- layers
Tensor Linear::operator()(const Tensor& x) const {
  if (!int8) return at::addmm(b, x, w.t());
  const int64_t B = x.size(0), quads = w.size(1), Kq = 4 * quads;
  const Trace trace(B == 1 ? "charrnn::int8_matvec" : "charrnn::int8_matmul");
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

// The int8 product alone, for tests: x (B, K) fp32 -> (B, N).
Tensor int8_linear(const Tensor& x, const std::vector<Tensor>& parts, int64_t N) {
  Linear l = make_linear(parts, N, x.size(1));
  return l(x.contiguous());
}

}  // namespace charrnn
