// Decoding's products, by hand: a few rows of x (one per sequence) times a weight that is read once for
// all of them, at the speed memory delivers it; and attention over the KV cache. gpt2/inference/kernels.py
// builds this file once per machine for the best variant the CPU runs, each variant a build of this same
// source with its own instruction sets (-m flags, never -march=native):
//   avx512bf16  AVX-512 F/BW/DQ/VL + VNNI + BF16: 16 floats a vector, vdpbf16ps on bfloat16 pairs;
//   avx512      AVX-512 F/BW/DQ/VL, with or without VNNI: bfloat16 widened to float32 by shifting;
//   avx2        AVX2 + FMA + F16C, with or without AVX-VNNI: 8 floats a vector.
// Each kernel is written once below, over the variant's vector (vf: WIDTH floats; vi: WIDTH int32 lanes)
// and a few primitives defined per width. PyTorch's operators (ops.cpp) call it, on the threads of
// OpenMP, the pool PyTorch's own libgomp already runs. Every product: y[m, n] = x[m, :] . w[n, :] +
// bias[n], for any number of rows M of x.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <type_traits>
#include <vector>

// Only the entry points leave the library (built with -fvisibility=hidden): two variants loaded in one
// process never share a function.
#define EXPORT extern "C" __attribute__((visibility("default")))

enum { FLOAT32 = 1, BFLOAT16 = 2, INT8 = 4, INT4 = 8, ATTENTION = 16 };  // what matvec_abilities() reports

// ----------------------------------------------------------------------------------------------------
// The variant's vectors: WIDTH lanes, the primitives the kernels are written with. Those whose
// intrinsics differ only in their prefix (_mm512_add_ps, _mm256_add_ps) are written once, through MM;
// the others per width below.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define WIDTH 16
#define MM(op) _mm512_##op
typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vmask;  // a bit a lane
#elif defined(__AVX2__) && defined(__FMA__)
#define WIDTH 8
#define MM(op) _mm256_##op
typedef __m256 vf;
typedef __m256i vi;
typedef __m256 vmask;  // all ones in a lane, or zeros
#endif

#ifdef WIDTH
static inline vf zero() { return MM(setzero_ps)(); }
static inline vf set1(float a) { return MM(set1_ps)(a); }
static inline vf load(const float* p) { return MM(loadu_ps)(p); }
static inline void store(float* p, vf v) { MM(storeu_ps)(p, v); }
static inline vf add(vf a, vf b) { return MM(add_ps)(a, b); }
static inline vf sub(vf a, vf b) { return MM(sub_ps)(a, b); }
static inline vf mul(vf a, vf b) { return MM(mul_ps)(a, b); }
static inline vf div(vf a, vf b) { return MM(div_ps)(a, b); }
static inline vf max(vf a, vf b) { return MM(max_ps)(a, b); }
static inline vf min(vf a, vf b) { return MM(min_ps)(a, b); }
static inline vf fma(vf a, vf b, vf c) { return MM(fmadd_ps)(a, b, c); }    // a b + c
static inline vf fnma(vf a, vf b, vf c) { return MM(fnmadd_ps)(a, b, c); }  // c - a b
static inline vf to_float(vi a) { return MM(cvtepi32_ps)(a); }
static inline vi to_int(vf a) { return MM(cvtps_epi32)(a); }  // rounded to nearest, ties to even

static inline vi iset1(int32_t a) { return MM(set1_epi32)(a); }
static inline vi iset8(int8_t a) { return MM(set1_epi8)(a); }
static inline vi iadd(vi a, vi b) { return MM(add_epi32)(a, b); }
static inline vi isub(vi a, vi b) { return MM(sub_epi32)(a, b); }
template <int S> static inline vi shift_left(vi a) { return MM(slli_epi32)(a, S); }
template <int S> static inline vi shift_right(vi a) { return MM(srli_epi32)(a, S); }
static inline vi add16(vi a, vi b) { return MM(add_epi16)(a, b); }
static inline vi srl16_4(vi a) { return MM(srli_epi16)(a, 4); }
static inline vi ones16() { return MM(set1_epi16)(1); }
static inline vi maddubs(vi u, vi s) { return MM(maddubs_epi16)(u, s); }  // u8 x s8, pairs summed (int16, saturating)
static inline vi madd(vi a, vi b) { return MM(madd_epi16)(a, b); }        // int16 x int16, pairs summed
static inline vi abs8(vi a) { return MM(abs_epi8)(a); }
static inline vi broadcast32(const void* p) {  // 4 bytes into every lane
  int32_t a;
  memcpy(&a, p, 4);
  return iset1(a);
}
#endif

#if WIDTH == 16
static inline vf abs(vf a) { return _mm512_abs_ps(a); }
static inline float reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
static inline float reduce_max(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf round_even(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf pow2(vf p, vf k) { return _mm512_scalef_ps(p, k); }  // p 2^k, k whole
static inline vf bits_as_float(vi a) { return _mm512_castsi512_ps(a); }
static inline vi float_bits(vf a) { return _mm512_castps_si512(a); }
static inline vi izero() { return _mm512_setzero_si512(); }
static inline vi iload(const void* p) { return _mm512_loadu_si512(p); }
static inline vi iand(vi a, vi b) { return _mm512_and_si512(a, b); }
// w's bytes negated where `of` is negative (AVX-512 has no vpsignb; where `of` is 0, w's byte is kept, and
// multiplied by |of| = 0)
static inline vi sign8(vi w, vi of) { return _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(of), _mm512_setzero_si512(), w); }
// The low bytes of the 16 lanes, to p.
static inline void store_bytes(uint8_t* p, vi a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(a)); }

// Lanes below `count` (none for count <= 0, all for count >= 16); lane i alone (none out of 0..15).
static inline vmask first(int64_t count) {
  return count >= 16 ? (vmask)0xffff : count <= 0 ? (vmask)0 : (vmask)((1u << count) - 1);
}
static inline vmask lane(int64_t i) { return i >= 0 && i < 16 ? (vmask)(1u << i) : (vmask)0; }
static inline vmask both(vmask a, vmask b) { return _kand_mask16(a, b); }
static inline vmask either(vmask a, vmask b) { return _kor_mask16(a, b); }
template <int C> static inline vmask compare(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, C); }
static inline vf select(vmask m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
static inline vi iselect(vmask m, vi a, vi b) { return _mm512_mask_blend_epi32(m, b, a); }
// Lanes below `count` whose byte at p is not 0 (bytes past `count` are not read).
static inline vmask true_bytes(const bool* p, int64_t count) {
  return _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(first(count), p), _mm_setzero_si128());
}

// The first `count` lanes loaded (the others 0: nothing read past count) or stored.
static inline vf load_first(const float* p, int64_t count) { return _mm512_maskz_loadu_ps(first(count), p); }
static inline vi load_first(const int32_t* p, int64_t count) { return _mm512_maskz_loadu_epi32(first(count), p); }
static inline void store_first(float* p, vf v, int64_t count) { _mm512_mask_storeu_ps(p, first(count), v); }

// bfloat16 values (uint16 bits) widened to float32: their bits, 16 places up.
static inline vf load(const uint16_t* p) {
  return bits_as_float(shift_left<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p))));
}
static inline vf load_first(const uint16_t* p, int64_t count) {
  return bits_as_float(shift_left<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(count), p))));
}
static inline vi bf16_bits(vf v);  // the nearest bfloat16s, each in a lane's low half (below)
static inline void store(uint16_t* p, vf v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(bf16_bits(v)));
#endif
}
static inline void store_first(uint16_t* p, vf v, int64_t count) {
#ifdef __AVX512BF16__
  _mm256_mask_storeu_epi16(p, first(count), (__m256i)_mm512_cvtneps_pbh(v));
#else
  _mm512_mask_cvtepi32_storeu_epi16(p, first(count), bf16_bits(v));
#endif
}

#elif WIDTH == 8
static inline vf abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
// Across the lanes: the two halves, then their halves, then the last two.
static inline float reduce_add(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float reduce_max(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline vf round_even(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^k for whole k in -126..127 (exp's: its argument is at least -87), 2^k built in the exponent's bits
static inline vf pow2(vf p, vf k) {
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23)));
}
static inline vf bits_as_float(vi a) { return _mm256_castsi256_ps(a); }
static inline vi float_bits(vf a) { return _mm256_castps_si256(a); }
static inline vi izero() { return _mm256_setzero_si256(); }
static inline vi iload(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vi iand(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi sign8(vi w, vi of) { return _mm256_sign_epi8(w, of); }
static inline void store_bytes(uint8_t* p, vi a) {
  // each 128-bit half's 4 low bytes gathered to its first 4, then the two halves' side by side
  const __m256i low = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a, low), _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  _mm_storel_epi64((__m128i*)p, _mm256_castsi256_si128(packed));
}

static inline vmask first(int64_t count) {
  const int32_t c = count <= 0 ? 0 : count >= 8 ? 8 : (int32_t)count;
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline vmask lane(int64_t i) {
  const int32_t j = i >= 0 && i < 8 ? (int32_t)i : -1;
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_set1_epi32(j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline vmask both(vmask a, vmask b) { return _mm256_and_ps(a, b); }
static inline vmask either(vmask a, vmask b) { return _mm256_or_ps(a, b); }
template <int C> static inline vmask compare(vf a, vf b) { return _mm256_cmp_ps(a, b, C); }
static inline vf select(vmask m, vf a, vf b) { return _mm256_blendv_ps(b, a, m); }
static inline vi iselect(vmask m, vi a, vi b) { return _mm256_blendv_epi8(b, a, _mm256_castps_si256(m)); }
static inline vmask true_bytes(const bool* p, int64_t count) {
  uint64_t bytes = 0;
  if (count >= 8) memcpy(&bytes, p, 8);
  else if (count > 0) memcpy(&bytes, p, count);
  const __m256i lanes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
}

// Whole vectors plainly (a masked store is slow on some CPUs), the last rows of a block through masks.
static inline vf load_first(const float* p, int64_t count) {
  return count >= 8 ? load(p) : _mm256_maskload_ps(p, _mm256_castps_si256(first(count)));
}
static inline vi load_first(const int32_t* p, int64_t count) {
  return count >= 8 ? iload(p) : _mm256_maskload_epi32((const int*)p, _mm256_castps_si256(first(count)));
}
static inline void store_first(float* p, vf v, int64_t count) {
  if (count >= 8) store(p, v);
  else _mm256_maskstore_ps(p, _mm256_castps_si256(first(count)), v);
}

static inline vf load(const uint16_t* p) {
  return bits_as_float(shift_left<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p))));
}
static inline vf load_first(const uint16_t* p, int64_t count) {
  if (count >= 8) return load(p);
  uint16_t part[8] = {0};  // no 16-bit masked load in AVX2: the few values through a copy
  memcpy(part, p, (count > 0 ? count : 0) * 2);
  return load(part);
}
static inline vi bf16_bits(vf v);
// The lanes' low halves (each at most 0xffff, so the saturating pack keeps them) as 8 uint16.
static inline __m128i low_halves(vi a) { return _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1)); }
static inline void store(uint16_t* p, vf v) { _mm_storeu_si128((__m128i*)p, low_halves(bf16_bits(v))); }
static inline void store_first(uint16_t* p, vf v, int64_t count) {
  if (count >= 8) return store(p, v);
  uint16_t part[8];
  _mm_storeu_si128((__m128i*)part, low_halves(bf16_bits(v)));
  memcpy(p, part, (count > 0 ? count : 0) * 2);
}
#endif

#ifdef WIDTH
enum { W = WIDTH, VECS = 64 / WIDTH };  // lanes a vector; vectors a block's 64 rows
// Accumulators a pass of a product keeps in registers (of 32 zmm or 16 ymm), besides its weights and x.
enum { ACC = WIDTH == 16 ? 16 : 8 };
// Bytes of a block the products read at a time: a chunk stays in a 32 or 48 KB L1 data cache while
// the next one arrives beside it.
enum { CHUNK = 16384 };

// The nearest bfloat16 (ties to even) of each lane, in its low 16 bits, in integer operations: the bits
// plus 0x7fff plus the lowest kept bit, 16 places down; a NaN stays a (quiet) NaN, as PyTorch's.
static inline vi bf16_bits(vf v) {
  const vi bits = float_bits(v);
  const vi rounded = shift_right<16>(iadd(bits, iadd(iset1(0x7fff), iand(shift_right<16>(bits), iset1(1)))));
  return iselect(compare<_CMP_UNORD_Q>(v, v), iset1(0x7fc0), rounded);
}

// Scalars: a float32 or bfloat16 value as float32.
static inline float value(const float* p) { return *p; }
static inline float value(const uint16_t* p) {
  const uint32_t bits = (uint32_t)*p << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// e^x to float32 precision: e^x = 2^k e^r, |r| <= ln 2 / 2, e^r by its Taylor series to r^7.
static inline vf exp_(vf x) {
  x = max(x, set1(-87.f));
  const vf k = round_even(mul(x, set1(1.44269504f)));
  vf r = fnma(k, set1(0.693145752f), x);
  r = fnma(k, set1(1.42860677e-6f), r);
  vf p = set1(1.f / 5040);
  const float terms[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  for (float t : terms) p = fma(p, r, set1(t));
  return pow2(p, k);
}

// GPT-2's tanh-GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), tanh(u) = 1 - 2 / (e^2u + 1).
static inline vf gelu_(vf x) {
  const vf u = mul(set1(0.7978845608f), fma(mul(set1(0.044715f), x), mul(x, x), x));
  const vf e = exp_(min(add(u, u), set1(80.f)));
  const vf t = sub(set1(1.f), div(set1(2.f), add(e, set1(1.f))));
  return mul(mul(set1(0.5f), x), add(set1(1.f), t));
}

// A product's output vector, with the GELU when `gelu` (an MLP's input layer).
static inline vf activate(vf y, bool gelu) { return gelu ? gelu_(y) : y; }

// ----------------------------------------------------------------------------------------------------
// The kinds of weights the products multiply, and what differs with BF16 and VNNI. A kind: the inputs a
// step takes (STEP, side by side in each row's lane of a vector of weights), the types of the weights
// and of x in memory, how a vector of weights and a step of a row of x (broadcast) are read, and how
// they are multiplied into the sums.

struct Float32 {
  typedef float weight, input;
  typedef vf sums, wvec, xvec;
  enum { STEP = 1 };
  static vf weights(const float* p) { return load(p); }
  static vf inputs(const float* p) { return set1(*p); }
  static vf multiply(vf acc, vf w, vf x) { return fma(w, x, acc); }
};

#ifdef __AVX512BF16__
// oneDNN's bfloat16 pairs (a row's inputs k and k + 1 in a 32-bit lane), as vdpbf16ps takes them.
struct Bfloat16 {
  typedef uint16_t weight, input;
  typedef vf sums;
  typedef __m512bh wvec, xvec;
  enum { STEP = 2 };
  static wvec weights(const uint16_t* p) { return (__m512bh)iload(p); }
  static xvec inputs(const uint16_t* p) { return (__m512bh)broadcast32(p); }
  static vf multiply(vf acc, wvec w, xvec x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#else
// Without BF16 each pair is widened to two float32 vectors (the first value 16 bits up, the second
// with its low bits cleared) and multiplied by two FMAs: exact products, summed in float32.
struct Pair {
  vf first, second;
};
static inline Pair split(vi p) { return {bits_as_float(shift_left<16>(p)), bits_as_float(iand(p, iset1((int32_t)0xffff0000)))}; }
struct Bfloat16 {
  typedef uint16_t weight, input;
  typedef vf sums;
  typedef Pair wvec, xvec;
  enum { STEP = 2 };
  static Pair weights(const uint16_t* p) { return split(iload(p)); }
  static Pair inputs(const uint16_t* p) { return split(broadcast32(p)); }
  static vf multiply(vf acc, Pair w, Pair x) { return fma(w.second, x.second, fma(w.first, x.first, acc)); }
};
#endif

#if (WIDTH == 16 && defined(__AVX512VNNI__)) || (WIDTH == 8 && defined(__AVXVNNI__))
// vpdpbusd: 4 unsigned bytes times 4 signed ones, summed into each int32 lane.
static inline vi dot_bytes(vi acc, vi u, vi s) {
#if WIDTH == 16
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
// int8: x quantised to unsigned bytes (round(x / xs) + 128), multiplied as they are; the 128 times the
// row's sum of w is taken off at the end.
struct Int8 {
  typedef int8_t weight;
  typedef uint8_t input;
  typedef vi sums, wvec, xvec;
  enum { STEP = 4, X_OFFSET = 128 };
  static vi weights(const int8_t* p) { return iload(p); }
  static vi inputs(const uint8_t* p) { return broadcast32(p); }
  static vi multiply(vi acc, vi w, vi x) { return dot_bytes(acc, x, w); }
};
// int4: the sums of a group of 32 inputs, int32 all along.
static inline vi dot_i4(vi acc, vi low, vi x0, vi high, vi x1) { return dot_bytes(dot_bytes(acc, low, x0), high, x1); }
static inline vi group_sum(vi acc) { return acc; }
#else
// Without VNNI: vpmaddubsw (unsigned bytes times signed ones, pairs summed into int16, saturating)
// then vpmaddwd by 1 into int32. int8: x quantised to signed bytes (round(x / xs), -127..127) and
// multiplied as |x| times w with x's sign (w is -127..127), so a pair is at most 2 x 127 x 127 < 2^15:
// never saturated.
struct Bytes {
  vi magnitude, sign;
};
struct Int8 {
  typedef int8_t weight;
  typedef uint8_t input;
  typedef vi sums, wvec;
  typedef Bytes xvec;
  enum { STEP = 4, X_OFFSET = 0 };
  static vi weights(const int8_t* p) { return iload(p); }
  static Bytes inputs(const uint8_t* p) {
    const vi x = broadcast32(p);
    return {abs8(x), x};
  }
  static vi multiply(vi acc, vi w, Bytes x) { return iadd(acc, madd(maddubs(x.magnitude, sign8(w, x.sign)), ones16())); }
};
// int4: nibbles (0..15) times signed bytes, summed in int16 over a group of 32 inputs (at most 16 x 15
// x 127 < 2^15 a lane), then into int32 once per group.
static inline vi dot_i4(vi acc, vi low, vi x0, vi high, vi x1) { return add16(acc, add16(maddubs(low, x0), maddubs(high, x1))); }
static inline vi group_sum(vi acc) { return madd(acc, ones16()); }
#endif

// ----------------------------------------------------------------------------------------------------
// The products. Each multiplies R rows of x by NV of a block's vectors (W rows each) in one pass over a
// chunk of its inputs: every weight vector read once for the R rows, R x NV accumulators in registers.
// A block is read a chunk at a time (CHUNK bytes of it, which stay in the L1 cache while every pass over
// them reads them), its rows' running sums kept between chunks.

// Where a pass is: the block at row n0, its vectors v0.., the inputs k0..k1 of K; `saved` the sums of its
// rows between chunks (this thread's: 64 a row). Where a chunk takes several passes, each reading only
// its vectors of each input (a stride the CPU's prefetchers do not follow), each pass fetches its share
// of the next chunk into the cache, `pace` bytes a step from `ahead` to `until`: the next chunk arrives
// while this one is multiplied.
struct Span {
  int64_t n0, k0, k1;
  int v0;
  float* saved;
  const char *ahead, *until;
  int pace;
};

// The pass's share of the next chunk, `pace` bytes a step.
static inline void fetch(const char*& ahead, const Span& s) {
  if (ahead >= s.until) return;
  for (int i = 0; i < s.pace; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
  ahead += s.pace;
}

// A pass's accumulators: zeros at the first chunk, else as the last chunk left them; after a chunk that
// is not the last, kept for the next (`suspend` is true then).
template <int R, int NV, typename V>
static inline void resume(V (&acc)[R][NV], const Span& s) {
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < NV; ++v)
      if (s.k0) memcpy(&acc[m][v], s.saved + m * 64 + W * (s.v0 + v), sizeof(V));
      else acc[m][v] = V{};
}
template <int R, int NV, typename V>
static inline bool suspend(V (&acc)[R][NV], const Span& s, int64_t K) {
  if (s.k1 == K) return false;
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < NV; ++v) memcpy(s.saved + m * 64 + W * (s.v0 + v), &acc[m][v], sizeof(V));
  return true;
}

// A pass's outputs: bias added, GELU where asked, the rows `ldy` apart; the last block's rows past N (its
// padding) not written.
template <int R, int NV, typename T>
static inline void write_rows(T* y, int64_t ldy, vf (&acc)[R][NV], const T* bias, int64_t N, const Span& s,
                              bool gelu) {
  for (int v = 0; v < NV; ++v) {
    const int64_t n = s.n0 + W * (s.v0 + v);
    if (n >= N) break;
    const vf b = bias ? load_first(bias + n, N - n) : zero();
    for (int m = 0; m < R; ++m) store_first(y + m * ldy + n, activate(add(acc[m][v], b), gelu), N - n);
  }
}

// The sums of R rows of x (K apart) times NV of a block's vectors over a span's inputs, for weights of
// kind T: each vector of weights read once for the R rows, each step of a row of x broadcast and
// multiplied by W rows at once (no sums across a vector).
template <class T, int R, int NV>
static inline void sum_products(typename T::sums (&acc)[R][NV], const Span& s, const typename T::input* x,
                                const typename T::weight* w, int64_t K) {
  resume(acc, s);
  const typename T::weight* block = w + s.n0 * K + W * T::STEP * s.v0;
  const char* ahead = s.ahead;
  for (int64_t k = s.k0; k < s.k1; k += T::STEP) {
    fetch(ahead, s);
    typename T::wvec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = T::weights(block + k * 64 + W * T::STEP * v);
    for (int m = 0; m < R; ++m) {
      const typename T::xvec xv = T::inputs(x + m * K + k);
      for (int v = 0; v < NV; ++v) acc[m][v] = T::multiply(acc[m][v], wv[v], xv);
    }
  }
}

// oneDNN's blocked float32 weight, as torch.ops.mkldnn._reorder_linear_weight lays it out: blocks of 64
// output rows, the last one padded with zeros, each block input-major: w[N / 64][K][64]; its bfloat16
// weight the same with pairs of inputs side by side: w[N / 64][K / 2][64][2], x, bias and y bfloat16,
// the sums float32, rounded once at the end.
template <class T, int R, int NV>
static inline void float_pass(const Span& s, const typename T::input* x, const typename T::weight* w,
                              const typename T::input* bias, typename T::input* y, int64_t K, int64_t N, int64_t ldy,
                              bool gelu) {
  vf acc[R][NV];
  sum_products<T>(acc, s, x, w, K);
  if (!suspend(acc, s, K)) write_rows<R, NV>(y, ldy, acc, bias, N, s, gelu);
}

// One row of x quantised to bytes: xs = max |x| / 127, xq = round(x / xs) + offset (128: unsigned, 1 to
// 255; 0: signed, -127 to 127); K a multiple of 16.
static inline void quantise_row(const float* x, uint8_t* xq, float* xs, int64_t K, int offset) {
  vf amax = zero();
  for (int64_t k = 0; k < K; k += W) amax = max(amax, abs(load(x + k)));
  const float largest = reduce_max(amax);
  *xs = largest > 0.f ? largest / 127.f : 1.f;
  const vf inverse = set1(1.f / *xs);
  for (int64_t k = 0; k < K; k += W) store_bytes(xq + k, iadd(to_int(mul(load(x + k), inverse)), iset1(offset)));
}

// Our blocked int8 weight (gpt2.inference.ops.int8_blocked): blocks of 64 output rows, the last one
// padded with zeros, groups of 4 inputs side by side, as vpdpbusd takes them: w[N / 64][K / 4][64][4],
// with a float32 scale and the sum of the int8 values of each row. x arrives quantised to bytes per row
// (quantise_row, offset Int8::X_OFFSET), so x . w = xs * scale * (xq . w - X_OFFSET * sum).
template <int R, int NV>
static inline void i8_pass(const Span& s, const uint8_t* xq, const float* xs, const int8_t* w, const float* scales,
                           const int32_t* sums, const float* bias, float* y, int64_t K, int64_t N, bool gelu) {
  vi acc[R][NV];
  sum_products<Int8>(acc, s, xq, w, K);
  if (suspend(acc, s, K)) return;
  vf out[R][NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t n = s.n0 + W * (s.v0 + v);
    const vi offset = Int8::X_OFFSET != 0 ? shift_left<7>(load_first(sums + n, N - n)) : izero();  // 128 * sum
    const vf scale = load_first(scales + n, N - n);
    for (int m = 0; m < R; ++m) out[m][v] = mul(to_float(isub(acc[m][v], offset)), mul(scale, set1(xs[m])));
  }
  write_rows<R, NV>(y, N, out, bias, N, s, gelu);
}

// Our blocked int4 weight (gpt2.inference.ops.int4_blocked), one stream of bytes: blocks of 64 output
// rows (the last one padded with zeros), each a run of groups of 32 inputs, each group 1280 bytes: 4 steps
// of 8 inputs, each 64 rows x 4 bytes (byte b of a row holds input 8j + b in its low nibble and 8j + 4 + b
// in its high one), then the group's 64 scales and 64 lows, bfloat16 (w = q * scale + low). x arrives
// quantised to signed bytes per row (xq = round(x / xs)) with each group's sum of x (float32), so a group
// adds scale * xs * (q . xq) + low * sum(x).
template <int R, int NV>
static inline void i4_pass(const Span& s, const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
                           const float* bias, float* y, int64_t K, int64_t N, bool gelu) {
  const vi nibble = iset8(15);
  const int64_t groups = K / 32;
  vf out[R][NV];
  resume(out, s);
  const uint8_t* block = w + s.n0 / 64 * groups * 1280;
  const char* ahead = s.ahead;
  for (int64_t g = s.k0 / 32; g < s.k1 / 32; ++g) {
    const uint8_t* group = block + g * 1280;
    fetch(ahead, s);
    const uint16_t* scales = (const uint16_t*)(group + 1024) + W * s.v0;
    vi acc[R][NV];
    for (int m = 0; m < R; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = izero();
    for (int j = 0; j < 4; ++j) {
      const uint8_t* step = group + j * 256 + 4 * W * s.v0;
      vi low[NV], high[NV];
      for (int v = 0; v < NV; ++v) {
        const vi packed = iload(step + 4 * W * v);
        low[v] = iand(packed, nibble);
        high[v] = iand(srl16_4(packed), nibble);
      }
      for (int m = 0; m < R; ++m) {
        const int8_t* x = xq + m * K + g * 32 + j * 8;
        const vi x0 = broadcast32(x), x1 = broadcast32(x + 4);
        for (int v = 0; v < NV; ++v) acc[m][v] = dot_i4(acc[m][v], low[v], x0, high[v], x1);
      }
    }
    for (int v = 0; v < NV; ++v) {
      const vf scale = load(scales + W * v), lowest = load(scales + 64 + W * v);
      for (int m = 0; m < R; ++m) {
        const vf dot = mul(to_float(group_sum(acc[m][v])), set1(xs[m]));
        out[m][v] = fma(lowest, set1(xsum[m * groups + g]), fma(dot, scale, out[m][v]));
      }
    }
  }
  if (!suspend(out, s, K)) write_rows<R, NV>(y, N, out, bias, N, s, gelu);
}

// One row of x quantised to signed bytes (quantise_row) and each group of 32 inputs' sum.
static inline void quantise_groups(const float* x, int8_t* xq, float* xs, float* xsum, int64_t K) {
  quantise_row(x, (uint8_t*)xq, xs, K, 0);
  for (int64_t g = 0; g < K / 32; ++g) {
    vf sum = load(x + 32 * g);
    for (int i = W; i < 32; i += W) sum = add(sum, load(x + 32 * g + i));
    xsum[g] = reduce_add(sum);
  }
}

// How many of a block's vectors a pass multiplies by R rows: as many as `budget` accumulators hold (a
// power of 2). A chunk read in several passes is still read from memory once, then from the L1 cache.
static constexpr int pass_vectors(int rows, int budget) {
  int nv = VECS;
  while (nv > 1 && rows * nv > budget) nv /= 2;
  return nv;
}

template <int N>
using Count = std::integral_constant<int, N>;

// R rows from row m0 in passes of at most P rows, each over NV vectors from s.v0, each fetching the next
// share of the next chunk.
template <int R, int P, int NV, class Pass>
static inline void row_passes(const Pass& pass, int64_t m0, Span s) {
  pass(Count<(R < P ? R : P)>(), Count<NV>(), m0, s);
  if constexpr (R > P) {
    const int64_t share = s.until - s.ahead;
    s.saved += P * 64, s.ahead = s.until, s.until += share;
    row_passes<R - P, P, NV>(pass, m0 + P, s);
  }
}

// The block at row n0 (at `block`, `bytes` an input) times R rows (at most 8) from m0: chunk by chunk
// (KC inputs, in steps of `step`), each chunk vectors by vectors, all rows over the same vectors one after
// the other.
template <int R, int P, int BUDGET, class Pass>
static inline void block_rows(const Pass& pass, int64_t m0, int64_t n0, const char* block, int64_t bytes, int64_t step,
                              int64_t K, int64_t KC, float* saved) {
  constexpr int NV = pass_vectors(R < P ? R : P, BUDGET), passes = VECS / NV * ((R + P - 1) / P);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t k1 = k0 + KC < K ? k0 + KC : K, next = (k1 + KC < K ? k1 + KC : K) - k1;
    // each pass's share of the next chunk, in whole lines; none where one pass reads each input whole
    const int64_t share = passes > 1 ? (next * bytes / passes + 63) / 64 * 64 : 0;
    const int pace = (int)((share * step / (k1 - k0) + 63) / 64 * 64);
    for (int v0 = 0; v0 < VECS; v0 += NV) {
      const char* ahead = block + k1 * bytes + v0 / NV * ((R + P - 1) / P) * share;
      row_passes<R, P, NV>(pass, m0, Span{n0, k0, k1, v0, saved, ahead, ahead + share, pace});
    }
  }
}

// Every block of 64 outputs (split evenly among the threads) times the M rows of x, 8 at a time (the
// block read from memory once for the first 8 rows, from the caches for the next), in chunks of CHUNK
// bytes; w's blocks take `bytes` an input, in steps of `step` inputs. pass(Count<rows>, Count<vectors>,
// m0, span) multiplies rows m0.. by the span's part of a block.
template <int P, int BUDGET, class Pass>
static void each_block(int64_t M, int64_t N, int64_t K, const void* w, int64_t bytes, int64_t step, int threads,
                       const Pass& pass) {
  const int64_t KC = CHUNK / bytes / step * step > step ? CHUNK / bytes / step * step : step;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    alignas(64) float saved[8 * 64];  // 8 rows' sums between chunks
    const char* block = (const char*)w + n0 / 64 * K * bytes;
    for (int64_t m0 = 0; m0 < M; m0 += 8) switch (M - m0 < 8 ? M - m0 : 8) {
        case 1: block_rows<1, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 2: block_rows<2, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 3: block_rows<3, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 4: block_rows<4, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 5: block_rows<5, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 6: block_rows<6, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        case 7: block_rows<7, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
        default: block_rows<8, P, BUDGET>(pass, m0, n0, block, bytes, step, K, KC, saved); break;
      }
  }
}

// ----------------------------------------------------------------------------------------------------
// Attention over the KV cache, one call per layer (gpt2.model.KVCache.attend): each row's new keys and
// values (a decoding step's one, or a chunk's T) written into the cache from position `length`, then
// each query attends over the positions up to its own (those `real` marks, and itself) of every head,
// the softmax in float32. Activations (qkv, out) and the cache are float32 or bfloat16 (A and C), each
// widened to float32 as it is read. Heads of D = 64: a head's query, key and value rows are VECS vectors.

// A decoding step's query against the positions 0..length, one position at a time.
template <typename A, typename C>
static void attend_head(const A* q, const C* keys, const C* values, const bool* real, A* out, int64_t length,
                        float* scores) {
  vf qv[VECS];
  for (int v = 0; v < VECS; ++v) qv[v] = load(q + W * v);
  float top = -INFINITY;
  for (int64_t l = 0; l <= length; ++l) {
    const C* k = keys + l * 64;
    vf dot = mul(qv[0], load(k));
    for (int v = 1; v < VECS; ++v) dot = fma(qv[v], load(k + W * v), dot);
    // 1 / sqrt(64); a padding query sees itself (else it would see nothing: a NaN row)
    scores[l] = real[l] || l == length ? reduce_add(dot) * 0.125f : -INFINITY;
    top = scores[l] > top ? scores[l] : top;
  }
  vf total = zero();
  for (int64_t l = 0; l <= length; l += W) {
    const vf s = load_first(scores + l, length + 1 - l);
    const vmask live = both(first(length + 1 - l), compare<_CMP_NEQ_OQ>(s, set1(-INFINITY)));
    const vf e = select(live, exp_(sub(s, set1(top))), zero());
    store_first(scores + l, e, length + 1 - l);
    total = add(total, e);
  }
  const vf inverse = set1(1.f / reduce_add(total));
  vf o[VECS];
  for (int v = 0; v < VECS; ++v) o[v] = zero();
  for (int64_t l = 0; l <= length; ++l) {
    const vf p = set1(scores[l]);
    for (int v = 0; v < VECS; ++v) o[v] = fma(p, load(values + l * 64 + W * v), o[v]);
  }
  for (int v = 0; v < VECS; ++v) store(out + W * v, mul(o[v], inverse));
}

// A chunk's attention, TILE queries at a time: their scores against 64 keys at a time from the head's
// keys transposed into blocks of 64 (kt[l / 64][64 dims][64 keys], float32), each dimension of TILE
// queries broadcast and multiplied by W keys per instruction; then each query's softmax; then its
// output, the values' rows weighted by the probabilities, TILE queries per row read. Each pass covers
// TV vectors (of keys, then of the output's dimensions): TILE x TV accumulators in registers.
enum { TILE = 6, TV = WIDTH == 16 ? 4 : 2 };

template <typename C>
static void transpose_keys(const C* keys, int64_t n, float* kt) {
  for (int64_t l = 0; l < (n + 63) / 64 * 64; ++l)
    for (int d = 0; d < 64; ++d) kt[(l / 64) * 4096 + d * 64 + l % 64] = l < n ? value(keys + l * 64 + d) : 0.f;
}

static inline void tile_scores(const float* qf, const float* kt, float* scores, int64_t stride) {
  for (int j = 0; j < 64; j += TV * W) {
    vf acc[TILE][TV];
    for (int q = 0; q < TILE; ++q)
      for (int v = 0; v < TV; ++v) acc[q][v] = zero();
    for (int d = 0; d < 64; ++d) {
      vf k[TV];
      for (int v = 0; v < TV; ++v) k[v] = load(kt + d * 64 + j + W * v);
      for (int q = 0; q < TILE; ++q) {
        const vf x = set1(qf[q * 64 + d]);
        for (int v = 0; v < TV; ++v) acc[q][v] = fma(k[v], x, acc[q][v]);
      }
    }
    for (int q = 0; q < TILE; ++q)
      for (int v = 0; v < TV; ++v) store(scores + q * stride + j + W * v, acc[q][v]);
  }
}

// The keys l..l + W - 1 that the query at `position` sees: the real ones up to it, and itself.
static inline vmask seen_mask(const bool* real, int64_t l, int64_t position) {
  return either(lane(position - l), true_bytes(real + l, position + 1 - l));
}

// The query at `position`: its scores (0..position) turned into unnormalised probabilities, those after
// it up to `n` zeroed; returns their sum. (A row of scores has room to a multiple of 64: whole vectors.)
static float softmax_row(float* s, const bool* real, int64_t position, int64_t n) {
  vf top = set1(-INFINITY);
  for (int64_t l = 0; l <= position; l += W) top = select(seen_mask(real, l, position), max(top, load(s + l)), top);
  const vf most = set1(reduce_max(top));
  vf total = zero();
  for (int64_t l = 0; l < n; l += W) {
    const vf e = select(seen_mask(real, l, position), exp_(sub(load(s + l), most)), zero());
    store(s + l, e);
    total = add(total, e);
  }
  return reduce_add(total);
}

template <typename A, typename C>
static void tile_output(const float* p, const C* values, int64_t n, int64_t stride, const float* sums, A* out,
                        int64_t width, int rows) {
  for (int j = 0; j < 64; j += TV * W) {
    vf o[TILE][TV];
    for (int q = 0; q < TILE; ++q)
      for (int v = 0; v < TV; ++v) o[q][v] = zero();
    for (int64_t l = 0; l < n; ++l) {
      vf vv[TV];
      for (int v = 0; v < TV; ++v) vv[v] = load(values + l * 64 + j + W * v);
      for (int q = 0; q < TILE; ++q) {
        const vf x = set1(p[q * stride + l]);
        for (int v = 0; v < TV; ++v) o[q][v] = fma(x, vv[v], o[q][v]);
      }
    }
    for (int q = 0; q < rows; ++q)
      for (int v = 0; v < TV; ++v) store(out + q * width + j + W * v, mul(o[q][v], set1(1.f / sums[q])));
  }
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
      for (int d = 0; d < 64; ++d) qf[r * 64 + d] = r < rows ? 0.125f * value(q + (t0 + r) * stride3 + d) : 0.f;
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
      for (int i = 0; i < 64; i += W) {
        store(k + (length + t) * 64 + i, load(q + t * 3 * width + width + i));
        store(v + (length + t) * 64 + i, load(q + t * 3 * width + 2 * width + i));
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
#endif  // WIDTH

// ----------------------------------------------------------------------------------------------------
// The entry points (ops.cpp calls them): the same in every variant; a build for no
// known instruction set has none of the abilities and computes nothing.

EXPORT int matvec_abilities() {
#ifdef WIDTH
  return FLOAT32 | BFLOAT16 | INT8 | INT4 | ATTENTION;
#else
  return 0;
#endif
}

// x (M, K) float32 times oneDNN's blocked float32 w (N rows, K inputs) into y (M rows `ldy` apart, N
// outputs); bias may be null. Rows in passes of at most 4.
EXPORT void matvec_f32(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N,
                       int64_t ldy, int gelu, int threads) {
#ifdef WIDTH
  each_block<4, ACC>(M, N, K, w, 256, 1, threads, [&](auto rows, auto vectors, int64_t m, const Span& s) {
    float_pass<Float32, decltype(rows)::value, decltype(vectors)::value>(s, x + m * K, w, bias, y + m * ldy, K, N, ldy,
                                                                         gelu);
  });
#endif
}

// The same in bfloat16 (x, w, bias, y as uint16 bit patterns).
EXPORT void matvec_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t M, int64_t K,
                        int64_t N, int64_t ldy, int gelu, int threads) {
#ifdef WIDTH
  each_block<4, ACC>(M, N, K, w, 128, 2, threads, [&](auto rows, auto vectors, int64_t m, const Span& s) {
    float_pass<Bfloat16, decltype(rows)::value, decltype(vectors)::value>(s, x + m * K, w, bias, y + m * ldy, K, N, ldy,
                                                                          gelu);
  });
#endif
}

// x (M, K) float32 times our blocked int8 w (N rows, K inputs; see i8_pass) into y (M, N) float32, for any
// M: 8 rows at a time (on AVX-512 by half a block, 8 rows a pass). K a multiple of 16.
EXPORT void matvec_i8(const float* x, const int8_t* w, const float* scales, const int32_t* sums, const float* bias,
                      float* y, int64_t M, int64_t K, int64_t N, int gelu, int threads) {
#ifdef WIDTH
  std::vector<uint8_t> xq(M * K);
  std::vector<float> xs(M);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
  for (int64_t m = 0; m < M; ++m) quantise_row(x + m * K, xq.data() + m * K, xs.data() + m, K, Int8::X_OFFSET);
  each_block<W == 16 ? 8 : 4, ACC>(M, N, K, w, 64, 4, threads, [&](auto rows, auto vectors, int64_t m,
                                                                                const Span& s) {
    i8_pass<decltype(rows)::value, decltype(vectors)::value>(s, xq.data() + m * K, xs.data() + m, w, scales, sums, bias,
                                                             y + m * N, K, N, gelu);
  });
#endif
}

// x (M, K) float32 times our blocked int4 w (N rows, K inputs; see i4_pass) into y (M, N) float32, for
// any M, 2 rows of x a pass (an accumulator and an output a row and vector). K a multiple of 32.
EXPORT void matvec_i4(const float* x, const uint8_t* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N,
                      int gelu, int threads) {
#ifdef WIDTH
  const int64_t groups = K / 32;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M), xsum(M * groups);
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
  for (int64_t m = 0; m < M; ++m) quantise_groups(x + m * K, xq.data() + m * K, xs.data() + m, xsum.data() + m * groups, K);
  each_block<2, ACC / 2>(M, N, K, w, 40, 32, threads, [&](auto rows, auto vectors, int64_t m, const Span& s) {
    i4_pass<decltype(rows)::value, decltype(vectors)::value>(s, xq.data() + m * K, xs.data() + m, xsum.data() + m * groups,
                                                             w, bias, y + m * N, K, N, gelu);
  });
#endif
}

// Attention over the cache (attend above); `activations` and `cache`: 4 for float32, 2 for bfloat16.
EXPORT void matvec_attend(const void* qkv, void* keys, void* values, const bool* real, void* out, int64_t B, int64_t T,
                          int64_t H, int64_t max_len, int64_t length, int activations, int cache, int threads) {
#ifdef WIDTH
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
