// Decoding's products, by hand: a few rows of x (one per sequence) times a weight that is read once for
// all of them, at the speed memory delivers it. gpt2/kernels.py builds this file once per machine (g++
// -O3 -march=native -fopenmp) and calls it through ctypes; the threads are OpenMP's, the pool PyTorch's
// own libgomp already runs. Every product: y[m, n] = x[m, :] . w[n, :] + bias[n]; M <= 8 rows of x for
// float32 and bfloat16 (oneDNN multiplies more), any M for int8.
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <memory>
#include <vector>

enum { FLOAT32 = 1, BFLOAT16 = 2, INT8 = 4, INT4 = 8, ATTENTION = 16 };  // what matvec_abilities() reports this build can do

#ifdef __AVX512F__
// The mask of the rows n.. of a block's vector of 16 that exist (the last block is padded to 64), of N.
static inline __mmask16 rows_mask(int64_t n, int64_t N) {
  return N - n >= 16 ? (__mmask16)0xffff : N <= n ? (__mmask16)0 : (__mmask16)((1u << (N - n)) - 1);
}

// e^x to float32 precision: e^x = 2^k e^r, |r| <= ln 2 / 2, e^r by its Taylor series to r^7.
static inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  const float terms[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  for (float t : terms) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(t));
  return _mm512_scalef_ps(p, k);
}

// GPT-2's tanh-GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), tanh(u) = 1 - 2 / (e^2u + 1).
static inline __m512 gelu_ps(__m512 x) {
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
  const __m512 e = exp_ps(_mm512_min_ps(_mm512_add_ps(u, u), _mm512_set1_ps(80.f)));
  const __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), t));
}

// A product's output vector, with the GELU when `gelu` (an MLP's input layer).
static inline __m512 activate(__m512 y, bool gelu) { return gelu ? gelu_ps(y) : y; }

#ifdef __AVX512BW__
// 16 bfloat16 values (those `mask` marks; the others 0) widened to float32: their bits, 16 places up.
static inline __m512 bf16_vector(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
#endif

// oneDNN's blocked float32 weight, as torch.ops.mkldnn._reorder_linear_weight lays it out: blocks of 64
// output rows, the last one padded with zeros, each block input-major: w[N / 64][K][64]. Vectors V0 to
// V0 + NV - 1 (16 rows each) of the block at row n0: each input broadcast, multiplied by 16 rows at once.
template <int M, int V0, int NV>
static inline void f32_block(const float* x, const float* w, const float* bias, float* y, int64_t K,
                             int64_t N, int64_t ldy, int64_t n0, bool gelu) {
  __m512 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* block = w + n0 * K + 16 * V0;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(block + k * 64 + 16 * v);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], xv, acc[m][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 16 * (V0 + v);
    if (n >= N) break;
    const __mmask16 mask = rows_mask(n, N);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy + n, mask, activate(_mm512_add_ps(acc[m][v], b), gelu));
  }
}

#endif

#ifdef __AVX512BF16__
// oneDNN's blocked bfloat16 weight: blocks of 64 rows, pairs of inputs side by side, as vdpbf16ps takes
// them: w[N / 64][K / 2][64][2]. x, bias and y bfloat16; the sums float32, rounded once at the end.
template <int M, int V0, int NV>
static inline void bf16_block(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                              int64_t K, int64_t N, int64_t ldy, int64_t n0, bool gelu) {
  __m512 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const uint16_t* block = w + n0 * K + 32 * V0;
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(block + k * 64 + 32 * v);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(x + m * K + k));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], wv[v], xv);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 16 * (V0 + v);
    if (n >= N) break;
    const __mmask16 mask = rows_mask(n, N);
    const __m512 b = bias ? bf16_vector(bias + n, mask) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m)
      _mm256_mask_storeu_epi16(y + m * ldy + n, mask, (__m256i)_mm512_cvtneps_pbh(activate(_mm512_add_ps(acc[m][v], b), gelu)));
  }
}
#endif

#ifdef __AVX512VNNI__
// Our blocked int8 weight (gpt2.inference.kernels.int8_blocked): blocks of 64 output rows, the last one padded with
// zeros, groups of 4 inputs side by side, as vpdpbusd takes them: w[N / 64][K / 4][64][4], with a float32
// scale and the sum of the int8 values of each row. x arrives quantised to unsigned 8 bits per row
// (xq = round(x / xs) + 128), so x . w = xs * scale * (xq . w - 128 * sum).
template <int M, int V0 = 0, int NV = 4>
static inline void i8_block(const uint8_t* xq, const float* xs, const int8_t* w, const float* scales,
                            const int32_t* sums, const float* bias, float* y, int64_t K, int64_t N, int64_t n0,
                            bool gelu) {
  __m512i acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
  const int8_t* block = w + n0 * K + 64 * V0;
  for (int64_t k = 0; k < K; k += 4) {
    __m512i wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(block + k * 64 + 64 * v);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_set1_epi32(*(const int32_t*)(xq + m * K + k));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], xv, wv[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 16 * (V0 + v);
    if (n >= N) break;
    const __mmask16 mask = rows_mask(n, N);
    const __m512i offset = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, sums + n), 7);  // 128 * sum
    const __m512 scale = _mm512_maskz_loadu_ps(mask, scales + n);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][v], offset));
      const __m512 out = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(xs[m])), b);
      _mm512_mask_storeu_ps(y + m * N + n, mask, activate(out, gelu));
    }
  }
}

// One row of x quantised: xs = max |x| / 127, xq = round(x / xs) + 128 (1 to 255); K a multiple of 16.
static inline void quantise_row(const float* x, uint8_t* xq, float* xs, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float largest = _mm512_reduce_max_ps(amax);
  *xs = largest > 0.f ? largest / 127.f : 1.f;
  const __m512 inverse = _mm512_set1_ps(1.f / *xs);
  const __m512i middle = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inverse)), middle);
    _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtepi32_epi8(q));
  }
}
#endif

#ifdef __AVX512VNNI__
// Our blocked int4 weight (gpt2.inference.kernels.int4_blocked), one stream of bytes: blocks of 64 output rows (the
// last one padded with zeros), each a run of groups of 32 inputs, each group 1280 bytes: 4 steps of 8
// inputs, each 4 vectors of 16 rows x 4 bytes (byte b of a row holds input 8j + b in its low nibble and
// 8j + 4 + b in its high one), then the group's 64 scales and 64 lows, bfloat16 (w = q * scale + low).
// x arrives quantised to signed 8 bits per row (xq = round(x / xs)) with each group's sum of x (float32),
// so a group adds scale * xs * (q . xq) + low * sum(x).

template <int M>
static inline void i4_block(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
                            const float* bias, float* y, int64_t K, int64_t N, int64_t n0, bool gelu) {
  const __m512i nibble = _mm512_set1_epi8(15);
  const int64_t groups = K / 32;
  __m512 out[M][4];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < 4; ++v) out[m][v] = _mm512_setzero_ps();
  const uint8_t* block = w + n0 / 64 * groups * 1280;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = block + g * 1280;
    const uint16_t* scales = (const uint16_t*)(group + 1024);
    __m512i acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const uint8_t* step = group + j * 256;
      __m512i low[4], high[4];
      for (int v = 0; v < 4; ++v) {
        const __m512i packed = _mm512_loadu_si512(step + 64 * v);
        low[v] = _mm512_and_si512(packed, nibble);
        high[v] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      }
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xq + m * K + g * 32 + j * 8;
        const __m512i x0 = _mm512_set1_epi32(*(const int32_t*)x), x1 = _mm512_set1_epi32(*(const int32_t*)(x + 4));
        for (int v = 0; v < 4; ++v)
          acc[m][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][v], low[v], x0), high[v], x1);
      }
    }
    for (int v = 0; v < 4; ++v) {
      const __m512 scale = bf16_vector(scales + 16 * v, 0xffff);
      const __m512 lowest = bf16_vector(scales + 64 + 16 * v, 0xffff);
      for (int m = 0; m < M; ++m) {
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][v]), _mm512_set1_ps(xs[m]));
        out[m][v] = _mm512_fmadd_ps(lowest, _mm512_set1_ps(xsum[m * groups + g]), _mm512_fmadd_ps(dot, scale, out[m][v]));
      }
    }
  }
  for (int v = 0; v < 4; ++v) {
    const int64_t n = n0 + 16 * v;
    if (n >= N) break;
    const __mmask16 mask = rows_mask(n, N);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * N + n, mask, activate(_mm512_add_ps(out[m][v], b), gelu));
  }
}

// One row of x quantised to signed 8 bits: xs = max |x| / 127, xq = round(x / xs); and each group's sum.
static inline void quantise_signed_row(const float* x, int8_t* xq, float* xs, float* xsum, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float largest = _mm512_reduce_max_ps(amax);
  *xs = largest > 0.f ? largest / 127.f : 1.f;
  const __m512 inverse = _mm512_set1_ps(1.f / *xs);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse))));
  }
  for (int64_t g = 0; g < K / 32; ++g)
    xsum[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + 32 * g), _mm512_loadu_ps(x + 32 * g + 16)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// Attention over the KV cache, one call per layer (gpt2.model.KVCache.attend): each row's new keys and
// values (a decoding step's one, or a chunk's T) written into the cache from position `length`, then
// each query attends over the positions up to its own (those `real` marks, and itself) of every head,
// the softmax in float32. Activations (qkv, out) and the cache are
// float32 or bfloat16 (A and C), each widened to float32 as it is read.
static inline __m512 widen(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 widen(const uint16_t* p) { return bf16_vector(p, 0xffff); }
static inline void narrow(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline float widen_one(const float* p) { return *p; }
static inline float widen_one(const uint16_t* p) {
  const uint32_t bits = (uint32_t)*p << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
static inline void narrow(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

template <typename A, typename C>
static void attend_head(const A* q, const C* keys, const C* values, const bool* real, A* out, int64_t length, float* scores) {
  // D = 64: a head's query, key and value rows are 4 vectors of 16
  const __m512 q0 = widen(q), q1 = widen(q + 16), q2 = widen(q + 32), q3 = widen(q + 48);
  float top = -INFINITY;
  for (int64_t l = 0; l <= length; ++l) {
    const C* k = keys + l * 64;
    __m512 dot = _mm512_mul_ps(q0, widen(k));
    dot = _mm512_fmadd_ps(q1, widen(k + 16), dot);
    dot = _mm512_fmadd_ps(q2, widen(k + 32), dot);
    dot = _mm512_fmadd_ps(q3, widen(k + 48), dot);
    // 1 / sqrt(64); a padding query sees itself (else it would see nothing: a NaN row)
    scores[l] = real[l] || l == length ? _mm512_reduce_add_ps(dot) * 0.125f : -INFINITY;
    top = scores[l] > top ? scores[l] : top;
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t l = 0; l <= length; l += 16) {
    const __mmask16 mask = rows_mask(l, length + 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scores + l);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(mask, s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(top))));
    _mm512_mask_storeu_ps(scores + l, mask, e);
    total = _mm512_add_ps(total, e);
  }
  const float inverse = 1.f / _mm512_reduce_add_ps(total);
  __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
  for (int64_t l = 0; l <= length; ++l) {
    const __m512 p = _mm512_set1_ps(scores[l]);
    const C* v = values + l * 64;
    o0 = _mm512_fmadd_ps(p, widen(v), o0);
    o1 = _mm512_fmadd_ps(p, widen(v + 16), o1);
    o2 = _mm512_fmadd_ps(p, widen(v + 32), o2);
    o3 = _mm512_fmadd_ps(p, widen(v + 48), o3);
  }
  const __m512 scale = _mm512_set1_ps(inverse);
  narrow(out, _mm512_mul_ps(o0, scale));
  narrow(out + 16, _mm512_mul_ps(o1, scale));
  narrow(out + 32, _mm512_mul_ps(o2, scale));
  narrow(out + 48, _mm512_mul_ps(o3, scale));
}

// A chunk's attention, TILE queries at a time: their scores against 64 keys at a time from the head's
// keys transposed into blocks of 64 (kt[l / 64][64 dims][64 keys], float32), each dimension of TILE
// queries broadcast and multiplied by 16 keys per instruction; then each query's softmax; then its
// output, the values' rows weighted by the probabilities, TILE queries per row read.
enum { TILE = 6 };

template <typename C>
static void transpose_keys(const C* keys, int64_t n, float* kt) {
  for (int64_t l = 0; l < (n + 63) / 64 * 64; ++l)
    for (int d = 0; d < 64; ++d) kt[(l / 64) * 4096 + d * 64 + l % 64] = l < n ? widen_one(keys + l * 64 + d) : 0.f;
}

static inline void tile_scores(const float* qf, const float* kt, float* scores, int64_t stride) {
  __m512 acc[TILE][4];
  for (int q = 0; q < TILE; ++q)
    for (int v = 0; v < 4; ++v) acc[q][v] = _mm512_setzero_ps();
  for (int d = 0; d < 64; ++d) {
    __m512 k[4];
    for (int v = 0; v < 4; ++v) k[v] = _mm512_loadu_ps(kt + d * 64 + 16 * v);
    for (int q = 0; q < TILE; ++q) {
      const __m512 x = _mm512_set1_ps(qf[q * 64 + d]);
      for (int v = 0; v < 4; ++v) acc[q][v] = _mm512_fmadd_ps(k[v], x, acc[q][v]);
    }
  }
  for (int q = 0; q < TILE; ++q)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(scores + q * stride + 16 * v, acc[q][v]);
}

// The keys l..l + 15 that the query at `position` sees: the real ones up to it, and itself.
static inline __mmask16 seen_mask(const bool* real, int64_t l, int64_t position) {
  const __mmask16 own = position >= l && position < l + 16 ? (__mmask16)(1u << (position - l)) : 0;
  const __mmask16 upto = rows_mask(l, position + 1);
  return _mm512_kor(own, _mm512_kand(upto, _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(upto, real + l),
                                                                _mm_setzero_si128())));
}

// The query at `position`: its scores (0..position) turned into unnormalised probabilities, those after
// it up to `n` zeroed; returns their sum.
static float softmax_row(float* s, const bool* real, int64_t position, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l <= position; l += 16)
    top = _mm512_mask_max_ps(top, seen_mask(real, l, position), top, _mm512_loadu_ps(s + l));
  const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; l += 16) {
    const __m512 e = _mm512_maskz_mov_ps(seen_mask(real, l, position),
                                         exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + l), most)));
    _mm512_mask_storeu_ps(s + l, rows_mask(l, n), e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

template <typename A, typename C>
static void tile_output(const float* p, const C* values, int64_t n, int64_t stride, const float* sums, A* out,
                        int64_t width, int rows) {
  __m512 o[TILE][4];
  for (int q = 0; q < TILE; ++q)
    for (int v = 0; v < 4; ++v) o[q][v] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    __m512 vv[4];
    for (int v = 0; v < 4; ++v) vv[v] = widen(values + l * 64 + 16 * v);
    for (int q = 0; q < TILE; ++q) {
      const __m512 x = _mm512_set1_ps(p[q * stride + l]);
      for (int v = 0; v < 4; ++v) o[q][v] = _mm512_fmadd_ps(x, vv[v], o[q][v]);
    }
  }
  for (int q = 0; q < rows; ++q)
    for (int v = 0; v < 4; ++v) narrow(out + q * width + 16 * v, _mm512_mul_ps(o[q][v], _mm512_set1_ps(1.f / sums[q])));
}

// One head of one row: T queries (rows `stride3` apart in qkv) at positions length..length + T - 1.
template <typename A, typename C>
static void attend_chunk(const A* q, int64_t stride3, const C* keys, const C* values, const bool* real, A* out,
                         int64_t width, int64_t length, int64_t T, float* scratch) {
  const int64_t n_all = length + T, stride = (n_all + 63) / 64 * 64;
  float *kt = scratch, *scores = kt + stride * 64, *qf = scores + TILE * stride;
  transpose_keys(keys, n_all, kt);
  for (int64_t t0 = 0; t0 < T; t0 += TILE) {
    const int rows = T - t0 < TILE ? (int)(T - t0) : TILE;
    const int64_t n = length + t0 + rows;  // keys the tile's last query sees
    for (int r = 0; r < TILE; ++r)
      for (int d = 0; d < 64; ++d) qf[r * 64 + d] = r < rows ? 0.125f * widen_one(q + (t0 + r) * stride3 + d) : 0.f;
    for (int64_t l = 0; l < n; l += 64) tile_scores(qf, kt + l * 64, scores + l, stride);
    float sums[TILE];
    for (int r = 0; r < TILE; ++r)
      if (r < rows) sums[r] = softmax_row(scores + r * stride, real, length + t0 + r, n);
      else for (int64_t l = 0; l < n; ++l) scores[r * stride + l] = 0.f;
    tile_output(scores, values, n, stride, sums, out + t0 * width, width, rows);
  }
}

// qkv (B, T, 3 * H * 64) the chunk's queries, keys and values; keys and values (rows, H, max_len, 64)
// the cache of one layer; real (rows, max_len); out (B, T, H * 64). Chunks of fewer than TILE queries
// take one query at a time.
template <typename A, typename C>
static void attend(const A* qkv, C* keys, C* values, const bool* real, A* out, int64_t B, int64_t T, int64_t H,
                   int64_t max_len, int64_t length, int threads) {
  // each thread's scratch: a decoding step's scores, or a chunk's transposed keys, scores and queries
  const int64_t width = H * 64, positions = (max_len + 63) / 64 * 64;
  const int64_t room = T >= TILE ? positions * (64 + TILE) + TILE * 64 : positions;
  const std::unique_ptr<float[]> scratch(new float[threads * room]);  // not zeroed: every use writes first
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    C *k = keys + bh * max_len * 64, *v = values + bh * max_len * 64;
    const A* q = qkv + b * T * 3 * width + h * 64;
    for (int64_t t = 0; t < T; ++t)
      for (int i = 0; i < 64; i += 16) {
        narrow(k + (length + t) * 64 + i, widen(q + t * 3 * width + width + i));
        narrow(v + (length + t) * 64 + i, widen(q + t * 3 * width + 2 * width + i));
      }
    float* mine = scratch.get() + omp_get_thread_num() * room;
    if (T >= TILE) {
      attend_chunk(q, 3 * width, k, v, real + b * max_len, out + b * T * width + h * 64, width, length, T, mine);
      continue;
    }
    for (int64_t t = 0; t < T; ++t)
      attend_head(q + t * 3 * width, k, v, real + b * max_len, out + (b * T + t) * width + h * 64, length + t, mine);
  }
}
#endif

// A whole block of 64 outputs for up to 4 rows of x at once (M x 4 accumulators: half the registers);
// rows 5 to 8 of x in a second pass, which reads the block from the cache.
#define BLOCK(FN, M)                                                                   \
  if (M <= 4) {                                                                        \
    FN<M, 0, 4>(xm, w, bias, ym, K, N, ldy, n0, gelu);                                 \
  } else {                                                                             \
    FN<4, 0, 4>(xm, w, bias, ym, K, N, ldy, n0, gelu);                                 \
    FN<(M > 4 ? M - 4 : 1), 0, 4>(xm + 4 * K, w, bias, ym + 4 * ldy, K, N, ldy, n0, gelu); \
  }

// The blocks split evenly among the threads; each block multiplied by 8 rows of x at a time (read from
// memory for the first 8, from the cache for the others).
#define BY_ROWS(FN)                                                   \
  _Pragma("omp parallel for schedule(static) num_threads(threads)")  \
  for (int64_t n0 = 0; n0 < N; n0 += 64)                             \
    for (int64_t m0 = 0; m0 < M; m0 += 8) {                          \
      const auto* xm = x + m0 * K;                                   \
      auto* ym = y + m0 * ldy;                                       \
      switch (M - m0 < 8 ? M - m0 : 8) {                             \
        case 1: BLOCK(FN, 1) break;                                  \
        case 2: BLOCK(FN, 2) break;                                  \
        case 3: BLOCK(FN, 3) break;                                  \
        case 4: BLOCK(FN, 4) break;                                  \
        case 5: BLOCK(FN, 5) break;                                  \
        case 6: BLOCK(FN, 6) break;                                  \
        case 7: BLOCK(FN, 7) break;                                  \
        default: BLOCK(FN, 8) break;                                 \
      }                                                              \
    }

extern "C" int matvec_abilities() {
  int abilities = 0;
#ifdef __AVX512F__
  abilities |= FLOAT32;
#endif
#ifdef __AVX512BF16__
  abilities |= BFLOAT16;
#endif
#ifdef __AVX512VNNI__
  abilities |= INT8 | INT4;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  abilities |= ATTENTION;
#endif
  return abilities;
}

// x (M, K) float32 times oneDNN's blocked float32 w (N rows, K inputs) into y (M rows `ldy` apart, N
// outputs); bias may be null.
extern "C" void matvec_f32(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
                           int64_t N, int64_t ldy, int gelu, int threads) {
#ifdef __AVX512F__
  BY_ROWS(f32_block)
#endif
}

// The same in bfloat16 (x, w, bias, y as uint16 bit patterns).
extern "C" void matvec_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M,
                            int64_t K, int64_t N, int64_t ldy, int gelu, int threads) {
#ifdef __AVX512BF16__
  BY_ROWS(bf16_block)
#endif
}

// x (M, K) float32 times our blocked int8 w (N rows, K inputs; see i8_block) into y (M, N) float32, for
// any M: each block of w is read from memory once and multiplied by 8 rows of x at a time, half a block
// (32 outputs) at a time so that it stays in the L1 cache (1.2x faster for a prompt than whole blocks
// by 4 rows), the last rows by 4 (from the cache after the first rows). K a multiple of 16.
extern "C" void matvec_i8(const float* x, const int8_t* w, const float* scales, const int32_t* sums,
                          const float* bias, float* y, int64_t M, int64_t K, int64_t N, int gelu, int threads) {
#ifdef __AVX512VNNI__
  std::vector<uint8_t> xq(M * K);
  std::vector<float> xs(M);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
  for (int64_t m = 0; m < M; ++m) quantise_row(x + m * K, xq.data() + m * K, xs.data() + m, K);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    int64_t m = 0;
    for (; M - m >= 8; m += 8) {
      i8_block<8, 0, 2>(xq.data() + m * K, xs.data() + m, w, scales, sums, bias, y + m * N, K, N, n0, gelu);
      i8_block<8, 2, 2>(xq.data() + m * K, xs.data() + m, w, scales, sums, bias, y + m * N, K, N, n0, gelu);
    }
    for (; m < M; m += 4) {
      const uint8_t* q = xq.data() + m * K;
      float* out = y + m * N;
      switch (M - m) {
        case 1: i8_block<1>(q, xs.data() + m, w, scales, sums, bias, out, K, N, n0, gelu); break;
        case 2: i8_block<2>(q, xs.data() + m, w, scales, sums, bias, out, K, N, n0, gelu); break;
        case 3: i8_block<3>(q, xs.data() + m, w, scales, sums, bias, out, K, N, n0, gelu); break;
        default: i8_block<4>(q, xs.data() + m, w, scales, sums, bias, out, K, N, n0, gelu); break;
      }
    }
  }
#endif
}

// x (M, K) float32 times our blocked int4 w (N rows, K inputs; see i4_block) into y (M, N) float32, for
// any M, 2 rows of x at a time. K a multiple of 32.
extern "C" void matvec_i4(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t K,
                          int64_t N, int gelu, int threads) {
#ifdef __AVX512VNNI__
  const int64_t groups = K / 32;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M), xsum(M * groups);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
  for (int64_t m = 0; m < M; ++m)
    quantise_signed_row(x + m * K, xq.data() + m * K, xs.data() + m, xsum.data() + m * groups, K);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += 64)
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m == 1)
        i4_block<1>(xq.data() + m * K, xs.data() + m, xsum.data() + m * groups, w, bias, y + m * N, K, N, n0, gelu);
      else
        i4_block<2>(xq.data() + m * K, xs.data() + m, xsum.data() + m * groups, w, bias, y + m * N, K, N, n0, gelu);
    }
#endif
}

// Attention over the cache (attend above); `activations` and `cache`: 4 for float32, 2 for bfloat16.
extern "C" void matvec_attend(const void* qkv, void* keys, void* values, const bool* real, void* out, int64_t B,
                              int64_t T, int64_t H, int64_t max_len, int64_t length, int activations, int cache,
                              int threads) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  typedef const float* F;
  typedef const uint16_t* H16;
  if (activations == 4 && cache == 4)
    attend((F)qkv, (float*)keys, (float*)values, real, (float*)out, B, T, H, max_len, length, threads);
  else if (activations == 4)
    attend((F)qkv, (uint16_t*)keys, (uint16_t*)values, real, (float*)out, B, T, H, max_len, length, threads);
  else
    attend((H16)qkv, (uint16_t*)keys, (uint16_t*)values, real, (uint16_t*)out, B, T, H, max_len, length, threads);
#endif
}
