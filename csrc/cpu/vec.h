// fp32 SIMD vectors for the CPU kernels: Vec<8> (AVX2 + FMA + F16C) and, on hosts with AVX-512
// F/BW/VL, Vec<16>, behind one interface. An elementwise pass is written once, as a generic lambda
// over the vector type, and simd_for runs it 16 wide, then 8 wide, then leaves the tail to scalar
// code. Both widths do the same operations per lane, so a pass gives bitwise the same values at
// either width (and on hosts with or without AVX-512).
//
// Half and bfloat16 load into fp32 lanes and store back from them: bfloat16 rounds to nearest even
// with NaN to the canonical quiet NaN, the same bits as c10::BFloat16(float); c10's scalar
// conversions do not vectorize.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <type_traits>

#define FUSENORM_CPU_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FUSENORM_CPU_AVX512 1
// Hosts with AVX512-BF16 (and DQ, for vfpclassps) round to bfloat16 in one instruction
// (vcvtne(2)ps2bf16: nearest even, as ours). It flushes subnormal inputs to zero and keeps NaN
// payloads, so a vector holding either class takes the integer rounding below instead
// (bf16_exact, bf16_high), and the bits stay those of that path on every host.
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define FUSENORM_CPU_BF16 1
#endif
#endif

namespace fusenorm::cpu {

// vfpclassps classes that the hardware bfloat16 rounding does not give our bits for: QNaN, SNaN,
// subnormal
constexpr int kBf16Fixup = 0x01 | 0x80 | 0x20;

template <int W>
struct Vec;

template <>
struct Vec<8> {
  static constexpr int kWidth = 8;
  __m256 r;

  static Vec set1(float a) { return {_mm256_set1_ps(a)}; }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static Vec load(const c10::BFloat16* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(h, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, r); }
  void store(c10::Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void stream(float* p) const { _mm256_stream_ps(p, r); }
  void stream(c10::Half* p) const {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void stream(c10::BFloat16* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bf16_packed()); }
  void store(c10::BFloat16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_packed()); }
  // the 8 lanes rounded to bfloat16 (nearest even, NaN to 0x7fc0)
  __m128i bf16_packed() const {
#ifdef FUSENORM_CPU_BF16
    if (__builtin_expect(_mm256_fpclass_ps_mask(r, kBf16Fixup) == 0, 1)) return (__m128i)_mm256_cvtneps_pbh(r);
#endif
    return bf16_exact();
  }
  __m128i bf16_exact() const {
    const __m256i b = _mm256_castps_si256(r);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
    t = _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  }

  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.r, b.r)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.r, b.r)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.r, b.r)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.r, b.r)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.r, b.r, c.r)}; }    // a * b + c
  friend Vec fmsub(Vec a, Vec b, Vec c) { return {_mm256_fmsub_ps(a.r, b.r, c.r)}; }    // a * b - c
  friend Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.r, b.r, c.r)}; }  // c - a * b
  friend Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.r, b.r)}; }
  friend Vec vmin(Vec a, Vec b) { return {_mm256_min_ps(a.r, b.r)}; }
  // x where a < b, else y (NaN compares false)
  friend Vec select_lt(Vec a, Vec b, Vec x, Vec y) { return {_mm256_blendv_ps(y.r, x.r, _mm256_cmp_ps(a.r, b.r, _CMP_LT_OQ))}; }
  // ReLU's gradient mask: g except where y <= 0 (+0 there); NaN y passes g, as torch's threshold_backward
  friend Vec relu_pass(Vec y, Vec g) {
    return {_mm256_and_ps(_mm256_cmp_ps(y.r, _mm256_setzero_ps(), _CMP_NLE_UQ), g.r)};
  }
  // the bits of e plus the bits of k shifted into the exponent field (exp's 2^k)
  friend Vec add_to_exponent(Vec e, Vec k) {
    return {_mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_castps_si256(e.r), _mm256_slli_epi32(_mm256_castps_si256(k.r), 23)))};
  }
};

#ifdef FUSENORM_CPU_AVX512
template <>
struct Vec<16> {
  static constexpr int kWidth = 16;
  __m512 r;

  static Vec set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static Vec load(const c10::BFloat16* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(h, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, r); }
  void store(c10::Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(c10::BFloat16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_packed()); }
  void stream(float* p) const { _mm512_stream_ps(p, r); }
  void stream(c10::Half* p) const {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void stream(c10::BFloat16* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_packed()); }
  // the 16 lanes rounded to bfloat16, packed
  __m256i bf16_packed() const {
#ifdef FUSENORM_CPU_BF16
    if (__builtin_expect(_mm512_fpclass_ps_mask(r, kBf16Fixup) == 0, 1)) return (__m256i)_mm512_cvtneps_pbh(r);
#endif
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(), 16));
  }
  // Each lane rounded to bfloat16 (nearest even, NaN to 0x7fc0), in the high 16 bits of its lane.
  __m512i bf16_high() const {
    const __m512i b = _mm512_castps_si512(r);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i t = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_mask_mov_epi32(t, _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
  }

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.r, b.r)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.r, b.r)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.r, b.r)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.r, b.r)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.r, b.r, c.r)}; }
  friend Vec fmsub(Vec a, Vec b, Vec c) { return {_mm512_fmsub_ps(a.r, b.r, c.r)}; }
  friend Vec fnmadd(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.r, b.r, c.r)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.r, b.r)}; }
  friend Vec vmin(Vec a, Vec b) { return {_mm512_min_ps(a.r, b.r)}; }
  friend Vec select_lt(Vec a, Vec b, Vec x, Vec y) {
    return {_mm512_mask_mov_ps(y.r, _mm512_cmp_ps_mask(a.r, b.r, _CMP_LT_OQ), x.r)};
  }
  friend Vec relu_pass(Vec y, Vec g) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y.r, _mm512_setzero_ps(), _CMP_NLE_UQ), g.r)};
  }
  friend Vec add_to_exponent(Vec e, Vec k) {
    return {_mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_castps_si512(e.r), _mm512_slli_epi32(_mm512_castps_si512(k.r), 23)))};
  }
};

// 32 values as two 16-wide vectors, with Vec's interface. In order (Split = false), a holds values
// [0, 16) and b values [16, 32). Split, a holds the even values and b the odd ones: bfloat16 then
// loads with one 64-byte load and one shift or mask per vector, and stores with one merge, where
// in order it takes a widening and a narrowing shuffle per 16 values (vpmovzxwd, vpmovdw, on the
// one shuffle port of Skylake-X: the bfloat16 passes were bound by them). Passes whose operands are
// all loaded through Vec2 (or broadcast) compute the same values in either order; fp32 and half
// operands load and store split too (through a permutation, slower). A reduction over Vec2 lanes
// gives its 32 lanes back in order with lanes().
template <bool Split>
struct Vec2 {
  static constexpr int kWidth = 32;
  Vec<16> a, b;

  static Vec2 set1(float v) { return {Vec<16>::set1(v), Vec<16>::set1(v)}; }
  static Vec2 zero() { return {Vec<16>::zero(), Vec<16>::zero()}; }
  // 32 fp32 values in order -> this order
  static Vec2 from_ordered(Vec<16> lo, Vec<16> hi) {
    if constexpr (!Split) return {lo, hi};
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return {{_mm512_permutex2var_ps(lo.r, even, hi.r)}, {_mm512_permutex2var_ps(lo.r, odd, hi.r)}};
  }
  // this order -> 32 fp32 values in order (lo = [0, 16), hi = [16, 32))
  void ordered(Vec<16>& lo, Vec<16>& hi) const {
    if constexpr (!Split) {
      lo = a;
      hi = b;
    } else {
      const __m512i zlo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i zhi = _mm512_add_epi32(zlo, _mm512_set1_epi32(8));
      lo = {_mm512_permutex2var_ps(a.r, zlo, b.r)};
      hi = {_mm512_permutex2var_ps(a.r, zhi, b.r)};
    }
  }
  template <typename T>
  static Vec2 load(const T* p) {
    if constexpr (Split && std::is_same_v<T, c10::BFloat16>) {
      const __m512i w = _mm512_loadu_si512(p);
      return {{_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))},
              {_mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))))}};
    } else {
      return from_ordered(Vec<16>::load(p), Vec<16>::load(p + 16));
    }
  }
  template <typename T>
  void store(T* p) const {
    if constexpr (Split && std::is_same_v<T, c10::BFloat16>) {
      _mm512_storeu_si512(p, bf16_merged());
    } else {
      Vec<16> lo, hi;
      ordered(lo, hi);
      lo.store(p);
      hi.store(p + 16);
    }
  }
  template <typename T>
  void stream(T* p) const {
    if constexpr (Split && std::is_same_v<T, c10::BFloat16>) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bf16_merged());
    } else {
      Vec<16> lo, hi;
      ordered(lo, hi);
      lo.stream(p);
      hi.stream(p + 16);
    }
  }
  // Split bfloat16: the 32 values rounded, odd values' bits in the high halves, even values' in the low
  __m512i bf16_merged() const {
#ifdef FUSENORM_CPU_BF16
    if (__builtin_expect((_mm512_fpclass_ps_mask(a.r, kBf16Fixup) | _mm512_fpclass_ps_mask(b.r, kBf16Fixup)) == 0, 1)) {
      // words [0, 16) = a's lanes, [16, 32) = b's; interleaved into even = a, odd = b
      const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b.r, a.r);
      const __m512i zip = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      return _mm512_permutexvar_epi16(zip, h);
    }
#endif
    const __m512i e = _mm512_srli_epi32(a.bf16_high(), 16);
    return _mm512_ternarylogic_epi32(_mm512_set1_epi32(int(0xffff0000u)), b.bf16_high(), e, 0xCA);
  }
  // the 32 lanes in order
  void lanes(float* out) const {
    Vec<16> lo, hi;
    ordered(lo, hi);
    lo.store(out);
    hi.store(out + 16);
  }

  friend Vec2 operator+(Vec2 x, Vec2 y) { return {x.a + y.a, x.b + y.b}; }
  friend Vec2 operator-(Vec2 x, Vec2 y) { return {x.a - y.a, x.b - y.b}; }
  friend Vec2 operator*(Vec2 x, Vec2 y) { return {x.a * y.a, x.b * y.b}; }
  friend Vec2 operator/(Vec2 x, Vec2 y) { return {x.a / y.a, x.b / y.b}; }
  friend Vec2 fmadd(Vec2 x, Vec2 y, Vec2 z) { return {fmadd(x.a, y.a, z.a), fmadd(x.b, y.b, z.b)}; }
  friend Vec2 fmsub(Vec2 x, Vec2 y, Vec2 z) { return {fmsub(x.a, y.a, z.a), fmsub(x.b, y.b, z.b)}; }
  friend Vec2 fnmadd(Vec2 x, Vec2 y, Vec2 z) { return {fnmadd(x.a, y.a, z.a), fnmadd(x.b, y.b, z.b)}; }
  friend Vec2 vmax(Vec2 x, Vec2 y) { return {vmax(x.a, y.a), vmax(x.b, y.b)}; }
  friend Vec2 vmin(Vec2 x, Vec2 y) { return {vmin(x.a, y.a), vmin(x.b, y.b)}; }
  friend Vec2 select_lt(Vec2 p, Vec2 q, Vec2 x, Vec2 y) { return {select_lt(p.a, q.a, x.a, y.a), select_lt(p.b, q.b, x.b, y.b)}; }
  friend Vec2 relu_pass(Vec2 y, Vec2 g) { return {relu_pass(y.a, g.a), relu_pass(y.b, g.b)}; }
  friend Vec2 add_to_exponent(Vec2 e, Vec2 k) { return {add_to_exponent(e.a, k.a), add_to_exponent(e.b, k.b)}; }
};
#endif

// The widest vector of this build, for passes that have one loop (the reductions that keep 32 lanes).
#ifdef FUSENORM_CPU_AVX512
using VecWide = Vec<16>;
#else
using VecWide = Vec<8>;
#endif

// The 32-lane vector type of passes over T: on AVX-512 a Vec2, split for bfloat16; else Vec<8>
// (four of them make the 32 lanes).
#ifdef FUSENORM_CPU_AVX512
template <typename T>
using LaneVec = Vec2<std::is_same_v<T, c10::BFloat16>>;
#else
template <typename T>
using LaneVec = Vec<8>;
#endif

// Runs step(Vec<W>{}, i) for i = 0, W, 2W, ... while i + W <= n: 16 wide, then 8 wide; returns the
// first index left to the scalar tail. step reads its vector type as decltype of its first argument.
// With T = bfloat16 (the type of the operands) on AVX-512, first 32 at a time as Vec2<true>.
template <typename T = float, typename Step>
[[gnu::always_inline]] inline int64_t simd_for(int64_t n, Step&& step) {
  int64_t i = 0;
#ifdef FUSENORM_CPU_AVX512
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 32 <= n; i += 32) step(Vec2<true>{}, i);
  for (; i + 16 <= n; i += 16) step(Vec<16>{}, i);
#endif
  for (; i + 8 <= n; i += 8) step(Vec<8>{}, i);
  return i;
}

// Stores v at p; past the caches (a non-temporal store, which does not first read the line in)
// when nt and p is aligned for it. Passes whose output is too large to stay in cache write it so:
// on the EPYC VM a one-pass fp32 kernel over 64 MB ran 1.38x faster (4.35 -> 3.15 ms), over 8 MB
// 5-10 % slower. A kernel that streams ends each thread's work with stream_fence().
template <typename V, typename T>
[[gnu::always_inline]] inline void store_out(const V& v, T* p, bool nt) {
  constexpr uintptr_t mask = (V::kWidth * sizeof(T) < 64 ? V::kWidth * sizeof(T) : 64) - 1;
  if (nt && (reinterpret_cast<uintptr_t>(p) & mask) == 0) {
    v.stream(p);
  } else {
    v.store(p);
  }
}

// An accumulator's lanes in memory as the registers hold them: a Vec2 as its two halves, not
// permuted into order (for partial sums that only a final, ordered reduction reads back); any
// other vector as load/store do.
template <typename V>
inline V load_held(const float* p) {
#ifdef FUSENORM_CPU_AVX512
  if constexpr (V::kWidth == 32) return {Vec<16>::load(p), Vec<16>::load(p + 16)};
#endif
  return V::load(p);
}
template <typename V>
inline void store_held(const V& v, float* p) {
#ifdef FUSENORM_CPU_AVX512
  if constexpr (V::kWidth == 32) {
    v.a.store(p);
    v.b.store(p + 16);
    return;
  }
#endif
  v.store(p);
}

// The widest vector of an elementwise pass over T (simd_for's first step).
#ifdef FUSENORM_CPU_AVX512
template <typename T>
using StepVec = std::conditional_t<std::is_same_v<T, c10::BFloat16>, Vec2<true>, Vec<16>>;
#else
template <typename T>
using StepVec = Vec<8>;
#endif

// The first line-aligned value of a span at out and the end of its whole lines, [head, body_end):
// the span walkers below put their vectors there, so that a streamed line is written by streamed
// stores only. A line written partly streamed and partly through the cache (by the scalar tail of
// one row and the first vector of the next) is the slow case of streaming: BatchNorm2d
// channels-last 32x24x112x112 fp32, rows of 96 bytes, ran eval 7x slower than without streaming.
template <typename T>
inline void line_body(const T* out, int64_t len, int64_t& head, int64_t& body_end) {
  constexpr int64_t per_line = 64 / int64_t(sizeof(T));
  head = std::min<int64_t>(len, int64_t((-reinterpret_cast<uintptr_t>(out)) & 63) / int64_t(sizeof(T)));
  body_end = head + (len - head) / per_line * per_line;
}

// An elementwise pass over a span of consecutive runs of S values, with NC coefficients per run:
// run r of the span takes channel (c + r) mod C, and coefficient j of channel ch is coefs[j][ch].
// step(V{}, i, k) covers values [i, i + W) for the vectors of the span's whole 64-byte lines of
// out (line_body); k[j] is the vector whose lane l holds coefficient j of value i + l's channel (a
// broadcast, kept in registers over a run, unless the vector crosses a run boundary). The values
// before and after those lines go to scalar(i, channel). Looping over each run with simd_for
// instead starts every run's vectors at its own address: a run of 14x14 bfloat16 values is 392
// bytes, so most runs had no vector aligned for a streamed store.
template <typename T, int NC, typename Step, typename Scalar>
inline void runs_for(const T* out, int64_t len, int64_t S, int64_t c, int64_t C, const float* const (&coefs)[NC],
                     Step&& step, Scalar&& scalar) {
  using V = StepVec<T>;
  constexpr int64_t W = V::kWidth;
  alignas(64) static constexpr float kIota[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                  16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const auto next_channel = [C](int64_t ch) { return ch + 1 == C ? int64_t(0) : ch + 1; };
  int64_t head, end;
  line_body(out, len, head, end);
  for (int64_t i = 0; i < head; ++i) scalar(i, (c + i / S) % C);
  int64_t i = head, run_end = (head / S + 1) * S, ch = (c + head / S) % C;
  V k[NC];
  while (i < end) {
    for (int j = 0; j < NC; ++j) k[j] = V::set1(coefs[j][ch]);
    for (const int64_t stop = std::min(run_end, end); i + W <= stop; i += W) step(V{}, i, k);  // inside the run
    if (i >= end) break;
    // the vector crossing from this run into the next one(s)
    const V iota = V::load(kIota);
    for (int64_t b = run_end - i, cb = ch; b < W; b += S) {
      cb = next_channel(cb);
      const V bv = V::set1(float(b));
      for (int j = 0; j < NC; ++j) k[j] = select_lt(iota, bv, k[j], V::set1(coefs[j][cb]));
    }
    step(V{}, i, k);
    i += W;
    while (run_end <= i) {
      run_end += S;
      ch = next_channel(ch);
    }
  }
  for (; i < len; ++i) scalar(i, (c + i / S) % C);
}

// An elementwise pass over a span of whole rows of C values (channels last) with per-channel
// coefficients: step(V{}, i, k) covers values [i, i + W) for the vectors of the span's whole
// 64-byte lines (line_body), where k[j] holds coefs[j][(i + l) mod C] in lane l, one load from
// coefs[j] + i mod C (each array padded as kRowsPad says); the values before and after those lines
// go to scalar(i, channel). fp32 lanes for every T (Vec<16> loads bfloat16 without a permutation).
template <typename T, int NC, typename Step, typename Scalar>
inline void rows_for(const T* out, int64_t len, int64_t C, const float* const (&coefs)[NC], Step&& step,
                     Scalar&& scalar) {
  using V = StepVec<float>;
  constexpr int64_t W = V::kWidth;
  int64_t head, end;
  line_body(out, len, head, end);
  for (int64_t i = 0; i < head; ++i) scalar(i, i % C);
  int64_t i = head, k = head % C;
  V kv[NC];
  for (; i < end; i += W) {
    for (int j = 0; j < NC; ++j) kv[j] = V::load(coefs[j] + k);
    step(V{}, i, kv);
    k += W;
    if (k >= C) k = C >= W ? k - C : k % C;
  }
  for (; i < len; ++i) scalar(i, i % C);
}

}  // namespace fusenorm::cpu
#endif

namespace fusenorm::cpu {

// Whether a pass writing `bytes` of output streams it (store_out): from 16 MiB, about where
// streaming stopped costing in the measurements above (FUSENORM_STREAM_BYTES overrides it; 0
// streams every output, as the tests do to cover the path). For the span walkers (runs_for,
// rows_for), which keep streamed lines whole themselves.
inline bool stream_output(int64_t bytes) {
#ifdef FUSENORM_CPU_AVX2
  static const int64_t threshold = [] {
    const int64_t fallback = int64_t(16) << 20;
    const char* e = std::getenv("FUSENORM_STREAM_BYTES");
    if (!e || !*e) return fallback;
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    return *end == '\0' && v >= 0 ? int64_t(v) : fallback;  // not a byte count: the default
  }();
  return bytes >= threshold;
#else
  (void)bytes;
  return false;
#endif
}

// Padding of the coefficient arrays of rows_for (below): each holds its C values, then its first
// kRowsPad values again (wrapping around as often as C < kRowsPad needs).
constexpr int64_t kRowsPad = 32;

// Fills v[C, C + kRowsPad) with v[0, C) repeated (v holds C + kRowsPad values).
template <typename A>
inline void pad_rows(A* v, int64_t C) {
  for (int64_t j = C; j < C + kRowsPad; ++j) v[j] = v[j % C];
}

// stream_output for a pass that writes its output as rows (or runs) of row_bytes each from base,
// one simd_for per row: only when every row is whole 64-byte lines from an aligned base, so that
// no line is written partly streamed and partly through the cache (see line_body: up to 7x
// slower than not streaming at all).
inline bool stream_rows(int64_t bytes, const void* base, int64_t row_bytes) {
  return row_bytes % 64 == 0 && (reinterpret_cast<uintptr_t>(base) & 63) == 0 && stream_output(bytes);
}

// Orders this thread's streamed stores before whatever it does next.
inline void stream_fence() {
#ifdef FUSENORM_CPU_AVX2
  _mm_sfence();
#endif
}

}  // namespace fusenorm::cpu
