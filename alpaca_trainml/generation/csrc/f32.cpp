// The fp32 matmul of the decode kernel for a few rows (compiled into the same extension as decode.cpp, which tiles the
// output rows over the threads and calls f32_rows on each stretch).
//
// A decode step reads every weight once, so one row is bound by the memory bandwidth. A speculative verify (the
// positions of a draft) or a batch multiplies a few rows by the same weight; the FMAs for them can hide under that
// read if the weight keeps streaming while they run. So:
// - the instructions are picked at run time (f32_isa): AVX-512 where the CPU has it (32 registers of 16 floats: up to
//   6 rows x 4 weight rows of sums in registers, twice AVX2's FMAs per instruction), else AVX2+FMA (3 x 4), else
//   plain C++; each is compiled with its own target attribute, so one build serves every x86 CPU;
// - while a block of weight rows is multiplied, the next block is prefetched (one cache line per line read), so the
//   memory read runs under the compute instead of after it. Rows that do not fit the registers at once (past 6 on
//   AVX-512, 3 on AVX2) take several passes over the block, and every pass prefetches its share of the next block:
//   when the first pass prefetched it all, the memory idled through the others and a step of 8 rows paid for the
//   read and the FMAs one after the other (8 rows on a 64 MiB weight, one thread: 2.60 -> 1.93 ms; 1 row: 1.87 ms);
// - a block's sums are reduced together, 16 (AVX2: 8) at a time, by a transposed tree that makes each sum's own adds
//   in its own order with a quarter of the shuffles and adds of one reduction per sum (on a weight in L2, where the
//   FMAs bound the time, 16 rows went from 158 to 184 GFLOP/s on one thread; benchmarks/RESULTS.md, "The fp32
//   kernel at 2 to 260 rows").
// Every output is the sum of one accumulator of 16 lanes (AVX-512) or 8 (AVX2) over `in`, in order, reduced in a fixed
// order (lanes i + (i + 8), then i + (i + 4), then 0 + 2 and 1 + 3, then those two), then its remaining in % 16
// (in % 8) terms in order: the same operations whatever the number of rows and however they are blocked, so a row's
// numbers never depend on the rows decoded with it (a verify step of several positions gives a plain step's numbers,
// bit for bit; tests/test_matvec.py checks every row count against an emulation of this order). The instructions
// themselves change the order, so f32_isa is for benchmarks and tests, not for use between steps of one answer.
#include <torch/extension.h>
#include <algorithm>
#include <cstdint>
#include <algorithm>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#define F32_X86 1
#endif

namespace {

// From 3 rows on, the FMAs of a block take longer than the prefetch of the next block keeps the memory busy: each
// pass also asks for the rows FAR_BYTES further on into L2 (8-row SmolLM2 step 19.6 -> 17.6 ms, 2026-12-06)
constexpr int64_t FAR_BYTES = 32768;

enum Isa { GENERIC = 0, AVX2 = 1, AVX512 = 2 };
const char* const NAMES[] = {"generic", "avx2", "avx512"};

// one sum per output in order: the same for any number of rows
void rows_generic(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
                  int64_t o1) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t r = 0; r < rows; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < in; ++i) s += w[o * in + i] * x[r * in + i];
      y[r * out + o] = s;
    }
}

#if defined(F32_X86)
#define T2 __attribute__((target("avx2,fma")))
#define T512 __attribute__((target("avx512f,avx2,fma")))

// A block's R x C reduced sums (row by row), each plus its remaining terms from column i on, in order, into y
template <int R, int C>
inline void store_sums(const float* sum, const float* x, const float* wo, float* y, int64_t i, int64_t in, int64_t out,
                       int64_t o) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = sum[r * C + c];
      for (int64_t j = i; j < in; ++j) s += wo[c * in + j] * x[r * in + j];
      y[r * out + o + c] = s;
    }
}

// R rows of x against C rows of w from row o: y[r * out + o + c]. Each w load feeds R FMAs and each x load C;
// R * C <= 12 accumulators, with the loads, fit AVX2's 16 registers. Prefetches PF rows of w from pf (the next
// block's), one cache line per two steps.
template <int R, int C, int PF>
T2 inline void block8(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t o, const float* pf,
                      int64_t far) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const float* wo = w + o * in;
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) {
      if (c < PF && (i & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + c * in + i), _MM_HINT_T0);
      if (far && c < PF && (i & 15) == 0)  // as block16's far prefetch below
        _mm_prefetch(reinterpret_cast<const char*>(pf + far + c * in + i), _MM_HINT_T1);
      wv[c] = _mm256_loadu_ps(wo + c * in + i);
    }
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * in + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  // each accumulator's 8 lanes added i + (i + 4), then 0 + 2 and 1 + 3, then those two, for 8 at once (as AVX-512's
  // tree below): input j = 2m + h of the tree ends in lane 4h + m, so accumulator 8v + 4h + m enters as input j
  alignas(32) float sum[16];
  for (int v = 0; v < (R * C + 7) / 8; ++v) {
    __m256 l1[4], l2[2];
    for (int k = 0; k < 4; ++k) {  // 128-bit half 0: lanes i + (i + 4) of input 2k, half 1: of input 2k + 1
      int a = 8 * v + 4 * (2 * k % 2) + 2 * k / 2, b = 8 * v + 4 * ((2 * k + 1) % 2) + (2 * k + 1) / 2;
      __m256 u = a < R * C ? acc[a / C][a % C] : _mm256_setzero_ps();
      __m256 t = b < R * C ? acc[b / C][b % C] : _mm256_setzero_ps();
      l1[k] = _mm256_add_ps(_mm256_permute2f128_ps(u, t, 0x20), _mm256_permute2f128_ps(u, t, 0x31));
    }
    for (int k = 0; k < 2; ++k)  // half h: lanes 0 + 2 and 1 + 3 of input 4k + h, then of input 4k + 2 + h
      l2[k] = _mm256_add_ps(_mm256_shuffle_ps(l1[2 * k], l1[2 * k + 1], 0x44),
                            _mm256_shuffle_ps(l1[2 * k], l1[2 * k + 1], 0xEE));
    _mm256_store_ps(sum + 8 * v, _mm256_add_ps(_mm256_shuffle_ps(l2[0], l2[1], 0x88),
                                               _mm256_shuffle_ps(l2[0], l2[1], 0xDD)));
  }
  store_sums<R, C>(sum, x, wo, y, i, in, out, o);
}

// n rows of x (1 to 3) against C rows of w from row o, prefetching PF rows from pf
template <int C, int PF>
T2 void part8(const float* x, const float* w, float* y, int64_t n, int64_t in, int64_t out, int64_t o,
              const float* pf, int64_t far) {
  if (n == 1) return block8<1, C, PF>(x, w, y, in, out, o, pf, far);
  if (n == 2) return block8<2, C, PF>(x, w, y, in, out, o, pf, far);
  block8<3, C, PF>(x, w, y, in, out, o, pf, far);
}

// every row of x against C rows of w from row o, 3 rows at a time: those C rows stay in L1 while the rows pass, and
// each pass prefetches its share of the next C rows (as group16 below)
template <int C>
T2 void group8(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o,
               int64_t far = 0) {
  int64_t passes = (rows + 2) / 3;
  const float* next = w + (o + C) * in;
  for (int64_t p = 0, r = 0; p < passes; ++p, r += 3) {
    int64_t n = std::min<int64_t>(3, rows - r), pf = C / passes + (p < C % passes);
    const float *xr = x + r * in, *pr = next;
    float* yr = y + r * out;
    switch (pf) {
      case 0: part8<C, 0>(xr, w, yr, n, in, out, o, pr, far); break;
      case 1: part8<C, 1>(xr, w, yr, n, in, out, o, pr, far); break;
      case 2: part8<C, 2>(xr, w, yr, n, in, out, o, pr, far); break;
      default: part8<C, C>(xr, w, yr, n, in, out, o, pr, far); break;
    }
    next += pf * in;
  }
}

T2 void rows_avx2(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
                  int64_t o1) {
  int64_t o = o0, far = std::max<int64_t>(FAR_BYTES / (4 * in), 4) * in;  // as rows_avx512
  if (rows == 1)
    for (; o + 8 <= o1; o += 8) block8<1, 8, 8>(x, w, y, in, out, o, w + (o + 8) * in, 0);
  else
    for (; o + 4 <= o1; o += 4) group8<4>(x, w, y, rows, in, out, o, far);
  for (; o < o1; ++o) group8<1>(x, w, y, rows, in, out, o);
}

// R rows of x against C rows of w from row o, 16 floats at a time: R * C accumulators, C weights and one x in
// registers (R * C + C + 1 <= 32). Prefetches PF rows of w from pf (the next block's), one line per line read.
template <int R, int C, int PF>
T512 inline void block16(const float* x, const float* w, float* y, int64_t in, int64_t out, int64_t o,
                         const float* pf, int64_t far) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* wo = w + o * in;
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    for (int c = 0; c < PF; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + c * in + i), _MM_HINT_T0);
    if (far)  // the same rows FAR_BYTES further on, into L2: the memory keeps reading while the FMAs run
      for (int c = 0; c < PF; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + far + c * in + i), _MM_HINT_T1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(wo + c * in + i);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * in + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  // Each accumulator's 16 lanes are added in one fixed order (lanes i and i + 8, then i and i + 4, then 0 + 2 and
  // 1 + 3, then those two), for 16 accumulators at once: a transposed tree of 15 adds and 30 shuffles, where reducing
  // them one by one takes 64 of each. Input j = 4m + q of the tree ends in lane 4q + m, so accumulator 16v + 4q + m
  // enters as input j and each sum lands in its own lane (inputs past R * C are zeros).
  alignas(64) float sum[32];
  for (int v = 0; v < (R * C + 15) / 16; ++v) {
    __m512 l1[8], l2[4], l3[2];
    for (int k = 0; k < 8; ++k) {  // quads 0-1: lanes i + (i + 8) of input 2k, quads 2-3: of input 2k + 1
      int a = 16 * v + 4 * (2 * k % 4) + 2 * k / 4, b = 16 * v + 4 * ((2 * k + 1) % 4) + (2 * k + 1) / 4;
      __m512 u = a < R * C ? acc[a / C][a % C] : _mm512_setzero_ps();
      __m512 t = b < R * C ? acc[b / C][b % C] : _mm512_setzero_ps();
      l1[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u, t, 0x44), _mm512_shuffle_f32x4(u, t, 0xEE));
    }
    for (int k = 0; k < 4; ++k)  // quad q: lanes i + (i + 4) of input 4k + q
      l2[k] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * k], l1[2 * k + 1], 0x88),
                            _mm512_shuffle_f32x4(l1[2 * k], l1[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; ++k)  // quad q: lanes 0 + 2 and 1 + 3 of input 8k + q, then of input 8k + 4 + q
      l3[k] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * k], l2[2 * k + 1], 0x44),
                            _mm512_shuffle_ps(l2[2 * k], l2[2 * k + 1], 0xEE));
    _mm512_store_ps(sum + 16 * v, _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88),
                                                _mm512_shuffle_ps(l3[0], l3[1], 0xDD)));
  }
  store_sums<R, C>(sum, x, wo, y, i, in, out, o);
}

// rows of x (n of them: up to 6, or 2 when C = 8) against C rows of w from row o, prefetching PF rows from pf
template <int C, int PF>
T512 void part16(const float* x, const float* w, float* y, int64_t n, int64_t in, int64_t out, int64_t o,
                 const float* pf, int64_t far) {
  if (n == 1) return block16<1, C, PF>(x, w, y, in, out, o, pf, far);
  if (n == 2 || C > 4) return block16<2, C, PF>(x, w, y, in, out, o, pf, far);
  if constexpr (C <= 4) {
    switch (n) {
      case 3: return block16<3, C, PF>(x, w, y, in, out, o, pf, far);
      case 4: return block16<4, C, PF>(x, w, y, in, out, o, pf, far);
      case 5: return block16<5, C, PF>(x, w, y, in, out, o, pf, far);
      default: return block16<6, C, PF>(x, w, y, in, out, o, pf, far);
    }
  }
}

// every row of x against C rows of w from row o, in passes of up to 6 rows (2 when C = 8; as even as they go): the
// C rows of w are read from memory on the first pass and from L1 on the others. Each pass prefetches its share of
// the next C rows (pass p of P: C / P rows, one more for the first C % P passes): a pass without prefetches leaves
// the memory idle while it multiplies, and the step pays for the read and the FMAs one after the other.
template <int C>
T512 void group16(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o,
                  int64_t far = 0) {
  constexpr int64_t most = C > 4 ? 2 : 6;  // rows per pass: R * C + C + 1 <= 32
  int64_t passes = (rows + most - 1) / most, r = 0;
  const float* next = w + (o + C) * in;
  for (int64_t p = 0; p < passes; ++p) {
    int64_t n = (rows - r) / (passes - p), pf = C / passes + (p < C % passes);
    const float *xr = x + r * in, *pr = next;
    float* yr = y + r * out;
    switch (pf) {
      case 0: part16<C, 0>(xr, w, yr, n, in, out, o, pr, far); break;
      case 1: part16<C, 1>(xr, w, yr, n, in, out, o, pr, far); break;
      case 2: part16<C, 2>(xr, w, yr, n, in, out, o, pr, far); break;
      default: part16<C, C>(xr, w, yr, n, in, out, o, pr, far); break;
    }
    r += n;
    next += pf * in;
  }
}

// One row: 8 of w's rows at a time (8 streams in flight); 2 rows: 8 (16 sums); more: 4 (up to 24 sums)
T512 void rows_avx512(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
                      int64_t o1) {
  int64_t o = o0, far = std::max<int64_t>(FAR_BYTES / (4 * in), 4) * in;  // in floats, at least a block on
  if (rows <= 2)
    for (; o + 8 <= o1; o += 8) group16<8>(x, w, y, rows, in, out, o);
  else
    for (; o + 4 <= o1; o += 4) group16<4>(x, w, y, rows, in, out, o, far);
  for (; o < o1; ++o) group16<1>(x, w, y, rows, in, out, o);
}

#endif

Isa best_isa() {
#if defined(F32_X86)
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) return AVX512;
  if (avx2) return AVX2;
#endif
  return GENERIC;
}

Isa active = best_isa();

std::string f32_isa(const std::string& name) {
  if (name != "auto") {
    int want = -1;
    for (int i = 0; i < 3; ++i)
      if (name == NAMES[i]) want = i;
    TORCH_CHECK(want >= 0, "f32_isa: auto, generic, avx2 or avx512, got ", name);
    TORCH_CHECK(want <= best_isa(), "f32_isa: this CPU lacks ", name);
    active = static_cast<Isa>(want);
  } else {
    active = best_isa();
  }
  return NAMES[active];
}

}  // namespace

// fp32 w's rows [o0, o1) for every row of x: y[r * out + o] = x[r] . w[o]
void f32_rows(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
              int64_t o1) {
#if defined(F32_X86)
  if (active == AVX512) return rows_avx512(x, w, y, rows, in, out, o0, o1);
  if (active == AVX2) return rows_avx2(x, w, y, rows, in, out, o0, o1);
#endif
  rows_generic(x, w, y, rows, in, out, o0, o1);
}

void register_f32(pybind11::module_& m) {
  m.def("f32_isa", &f32_isa,
        "the fp32 matmul's instructions: auto (the best this CPU has), generic, avx2 or avx512; returns the one in use");
}
