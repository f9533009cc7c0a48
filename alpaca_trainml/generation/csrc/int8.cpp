// int8 weights for the decode kernel (compiled into the same extension as decode.cpp; generation/int8.py packs them).
//
// A packed weight is a uint8 tensor (out, in + in / 16): each output row holds its `in` int8 weights, then one fp16
// scale per block of 32 of them (llama.cpp's q8_0 numbers: w ~= q * d, d = max|w| / 127 over the block, stored as
// fp16), so a row streams as two contiguous runs and the whole weight is 1.0625 bytes per number.
// A product quantizes each input row in blocks of 32 to 16-bit integers X (an fp32 scale e = max|x| / 32767 per block,
// X = round(x / e), |X| <= 32767), sums w * X in int32 per block (exact), then adds block sum * d * e in fp32.
// Why 16 bits and not llama.cpp's 8 (q8_0 x q8_0): rounding the input rows to 8 bits, not the weights, was what moved
// greedy tokens and the decode path's perplexity away from fp32 (benchmarks/RESULTS.md, 2026-12-05); the weight read,
// the bound of a batch-1 step, is the same either way, and only the instructions per loaded weight grow.
// VNNI multiplies unsigned by signed bytes, so X goes as sign and magnitude, |X| = 256 * H + L (H in 0..127, L in
// 0..255), the sign moved onto the weight: w * X = 256 * (H * sw) + L * sw with sw = +-w. int32 bounds: one lane of
// vpdpbusd sums 4 products, H's at most 4 * 127 * 127 = 64,516 (times 256: 16,516,096) and L's at most
// 4 * 255 * 127 = 129,540, so a lane holds at most 4 * 32767 * 127 = 16,645,636 < 2^24: exact in int32 and in its
// conversion to fp32; a whole block at most 32 * 32767 * 127 = 133,161,088 < 2^31. AVX2's vpmaddubsw would saturate
// on L's pairs (2 * 255 * 127 > 32767), so AVX2 multiplies X by the weights widened to 16 bits (vpmaddwd: a lane
// holds two products, then two lanes are added: the same 16,645,636 bound).
// The instructions are picked at run time from the CPU's flags (q8_isa): AVX512-VNNI (vpdpbusd on 64 bytes),
// AVX-VNNI (on 32), AVX2 (vpmaddwd), or plain C++; all give the same block sums, so every CPU gets the same numbers up
// to the order of the fp32 sums. Each is compiled with its own target attribute, so one build serves every x86 CPU and
// a CPU without the flags never runs them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define Q8_X86 1
#endif

namespace {

constexpr int64_t BLOCK = 32;  // weights per scale
constexpr int64_t TILE = 64;   // output rows per tile: a tile stays in L2 while every input row passes over it
enum Isa { GENERIC = 0, AVX2 = 1, AVXVNNI = 2, AVX512VNNI = 3, AVX512VNNI8 = 4, AVX512F32 = 5 };
// two other ways, measured against the rest (docs/decode-kernel.md) and never chosen by auto: avx512vnni8, input rows
// rounded to 8 bits (q8_0 x q8_0, as llama.cpp); avx512f32, fp32 input rows, each int8 weight widened to fp32
const char* const NAMES[] = {"generic", "avx2", "avxvnni", "avx512vnni", "avx512vnni8", "avx512f32"};

// One input row, per block of 32 its scale (e above; d here, (in / 32,)) and: X int16 (generic, avx2); H, L and the
// sign as -1 or 1 (VNNI); or for avx512vnni8, q int8 and |q| (q = round(x / d), d = max|x| / 127)
struct Act {
  const float* x;  // the row itself (avx512f32)
  const int16_t* v;
  const uint8_t* hi;
  const uint8_t* lo;
  const int8_t* sg;
  const int8_t* q;
  const uint8_t* a;
  const float* d;
};

// y[k] = row k of the packed weight w (rows `stride` bytes apart) . x, for N rows at once
using Dot = void (*)(const Act&, const uint8_t*, int64_t, int64_t, float*);

inline float half_at(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof h);
  return static_cast<float>(h);
}

template <int N>
void dot_generic(const Act& x, const uint8_t* w, int64_t stride, int64_t in, float* y) {
  for (int k = 0; k < N; ++k) {
    const int8_t* wq = reinterpret_cast<const int8_t*>(w + k * stride);
    const uint8_t* ws = w + k * stride + in;
    float sum = 0.f;
    for (int64_t b = 0; b < in / BLOCK; ++b) {
      int32_t s = 0;
      for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; ++i) s += static_cast<int32_t>(wq[i]) * x.v[i];
      sum += static_cast<float>(s) * (half_at(ws + 2 * b) * x.d[b]);
    }
    y[k] = sum;
  }
}

#ifdef Q8_X86
__attribute__((target("avx2,fma,f16c"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The body of the 256-bit kernels: one block of 32 per step; LOAD_X reads the block's input once, PRODUCT(wk) gives
// 8 int32 sums of the block's 32 products with weight row wk
#define Q8_DOT256(LOAD_X, PRODUCT)                                                             \
  __m256 acc[N];                                                                               \
  for (int k = 0; k < N; ++k) acc[k] = _mm256_setzero_ps();                                    \
  for (int64_t b = 0; b < in / BLOCK; ++b) {                                                   \
    LOAD_X                                                                                     \
    for (int k = 0; k < N; ++k) {                                                              \
      const uint8_t* wk = w + k * stride;                                                      \
      uint16_t h;                                                                              \
      std::memcpy(&h, wk + in + 2 * b, 2);                                                     \
      __m256 scale = _mm256_set1_ps(_cvtsh_ss(h) * x.d[b]);                                    \
      acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PRODUCT(wk)), scale, acc[k]);                \
    }                                                                                          \
  }                                                                                            \
  for (int k = 0; k < N; ++k) y[k] = hsum256(acc[k]);

inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// X (two halves of 16 int16) times the block's weights widened to int16, pairs summed in int32 by vpmaddwd
#define Q8_AVX2_X __m256i v0 = load256(x.v + b * BLOCK), v1 = load256(x.v + b * BLOCK + 16);
#define Q8_AVX2_PRODUCT(wk)                                                                                      \
  _mm256_add_epi32(                                                                                              \
      _mm256_madd_epi16(v0, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + b * BLOCK)))), \
      _mm256_madd_epi16(v1, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + b * BLOCK + 16)))))

template <int N>
__attribute__((target("avx2,fma,f16c"))) void dot_avx2(const Act& x, const uint8_t* w, int64_t stride, int64_t in,
                                                        float* y) {
  Q8_DOT256(Q8_AVX2_X, Q8_AVX2_PRODUCT)
}

// 256 * (H . sw) + L . sw, sw = the weights with X's signs (vpsignb: sg is never 0)
__attribute__((target("avx2,fma,f16c,avxvnni"))) inline __m256i product_vnni(__m256i hi, __m256i lo, __m256i sg,
                                                                              const uint8_t* wb) {
  __m256i sw = _mm256_sign_epi8(load256(wb), sg);
  __m256i p = _mm256_slli_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), hi, sw), 8);
  return _mm256_dpbusd_avx_epi32(p, lo, sw);
}

#define Q8_VNNI_X \
  __m256i hi = load256(x.hi + b * BLOCK), lo = load256(x.lo + b * BLOCK), sg = load256(x.sg + b * BLOCK);
#define Q8_VNNI_PRODUCT(wk) product_vnni(hi, lo, sg, wk + b * BLOCK)

template <int N>
__attribute__((target("avx2,fma,f16c,avxvnni"))) void dot_avxvnni(const Act& x, const uint8_t* w, int64_t stride,
                                                                  int64_t in, float* y) {
  Q8_DOT256(Q8_VNNI_X, Q8_VNNI_PRODUCT)
}
#undef Q8_DOT256

// 64 weights (two blocks) per step: the low 8 int32 lanes hold block 2j's sums, the high 8 block 2j+1's; a last lone
// block of 32 loads as the low half, with zeros (and zero scales) in the high one. WIDE: 16-bit input rows (H, L and
// the sign), else 8-bit ones (avx512vnni8: |q| and q's sign). The products d * e of up to CHUNK blocks of the N weight
// rows are made first, 16 at a time, so the inner loop reads each pair of them as one 8-byte load.
constexpr int64_t CHUNK = 128;  // blocks per pass (4 KiB of weights a row)

template <int N, bool WIDE>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) void dot_avx512(
    const Act& x, const uint8_t* w, int64_t stride, int64_t in, float* y) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[N];
  alignas(64) float sd[N][CHUNK + 16];  // d * e, zero past the last block (a lone block's neighbour)
  for (int k = 0; k < N; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t c = 0; c < in; c += CHUNK * BLOCK) {
    int64_t c1 = std::min(in, c + CHUNK * BLOCK), blocks = (c1 - c) / BLOCK;
    for (int k = 0; k < N; ++k)
      for (int64_t j = 0; j < blocks; j += 16) {
        __mmask16 m = blocks - j >= 16 ? 0xffff : __mmask16((1u << (blocks - j)) - 1);
        __m256i h = _mm256_maskz_loadu_epi16(m, w + k * stride + in + 2 * (c / BLOCK + j));
        __m512 e = _mm512_maskz_loadu_ps(m, x.d + c / BLOCK + j);
        _mm512_storeu_ps(sd[k] + j, _mm512_mul_ps(_mm512_cvtph_ps(h), e));
      }
    for (int64_t i = c; i < c1; i += 2 * BLOCK) {
      __mmask64 load = c1 - i >= 2 * BLOCK ? ~__mmask64(0) : __mmask64(0xffffffffu);
      __m512i hi = _mm512_maskz_loadu_epi8(load, WIDE ? x.hi + i : x.a + i);
      __m512i lo = WIDE ? _mm512_maskz_loadu_epi8(load, x.lo + i) : zero;
      __mmask64 neg = _mm512_movepi8_mask(_mm512_maskz_loadu_epi8(load, WIDE ? x.sg + i : x.q + i));
      for (int k = 0; k < N; ++k) {
        __m512i wv = _mm512_maskz_loadu_epi8(load, w + k * stride + i);
        __m512i sw = _mm512_mask_sub_epi8(wv, neg, zero, wv);  // w where x >= 0, -w where x < 0
        __m512i p = _mm512_dpbusd_epi32(zero, hi, sw);
        if (WIDE) p = _mm512_dpbusd_epi32(_mm512_slli_epi32(p, 8), lo, sw);  // 256 * (H . sw) + L . sw
        __m128 s2 = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sd[k] + (i - c) / BLOCK)));
        __m512 s = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(s2));
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc[k]);
      }
    }
  }
  for (int k = 0; k < N; ++k) y[k] = _mm512_reduce_add_ps(acc[k]);
}

// fp32 x against int8 weights widened to fp32, one block of 32 per step (no rounding of the input row)
template <int N>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void dot_avx512f32(
    const Act& x, const uint8_t* w, int64_t stride, int64_t in, float* y) {
  __m512 acc[N];
  for (int k = 0; k < N; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t b = 0; b < in / BLOCK; ++b) {
    __m512 x0 = _mm512_loadu_ps(x.x + b * BLOCK), x1 = _mm512_loadu_ps(x.x + b * BLOCK + 16);
    for (int k = 0; k < N; ++k) {
      const uint8_t* wk = w + k * stride + b * BLOCK;
      __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk))));
      __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + 16))));
      uint16_t h;
      std::memcpy(&h, w + k * stride + in + 2 * b, 2);
      __m512 p = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
      acc[k] = _mm512_fmadd_ps(p, _mm512_set1_ps(_cvtsh_ss(h)), acc[k]);
    }
  }
  for (int k = 0; k < N; ++k) y[k] = _mm512_reduce_add_ps(acc[k]);
}
#endif

int best_isa() {
#ifdef Q8_X86
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return AVX512VNNI;
  if (avx2 && __builtin_cpu_supports("avxvnni")) return AVXVNNI;
  if (avx2) return AVX2;
#endif
  return GENERIC;
}

int g_isa = -1;  // the instructions in use; -1: not chosen yet (the best this CPU has)

// kernels for 1..4 weight rows at a time
void kernels(int isa, Dot* out) {
  Dot table[6][4] = {
      {dot_generic<1>, dot_generic<2>, dot_generic<3>, dot_generic<4>},
#ifdef Q8_X86
      {dot_avx2<1>, dot_avx2<2>, dot_avx2<3>, dot_avx2<4>},
      {dot_avxvnni<1>, dot_avxvnni<2>, dot_avxvnni<3>, dot_avxvnni<4>},
      {dot_avx512<1, true>, dot_avx512<2, true>, dot_avx512<3, true>, dot_avx512<4, true>},
      {dot_avx512<1, false>, dot_avx512<2, false>, dot_avx512<3, false>, dot_avx512<4, false>},
      {dot_avx512f32<1>, dot_avx512f32<2>, dot_avx512f32<3>, dot_avx512f32<4>},
#endif
  };
  std::copy(table[isa], table[isa] + 4, out);
}

// The input rows quantized for the kernels (thread_local in q8_run: the buffers are reused call after call)
struct Quantized {
  std::vector<int16_t> v;
  std::vector<uint8_t> hi, lo, a;
  std::vector<int8_t> sg, q;
  std::vector<float> d;

  Act row(const float* x, int64_t r, int64_t in) const {
    int64_t o = r * in;
    return {x + o, v.data() + o, hi.data() + o, lo.data() + o, sg.data() + o, q.data() + o, a.data() + o,
            d.data() + o / BLOCK};
  }
};

// x (rows, in) fp32 -> blocks of 32 integers with one fp32 scale each (round to nearest): 16 bits (X, H, L and the
// sign), or with `wide` false 8 bits (q and |q|)
void quantize_rows(const float* x, int64_t rows, int64_t in, bool wide, Quantized& z) {
  int64_t n = rows * in;
  for (auto* u : {&z.hi, &z.lo, &z.a}) u->resize(n);
  z.sg.resize(n);
  z.q.resize(n);
  z.v.resize(n);
  z.d.resize(n / BLOCK + 2);  // +2: the AVX512 kernel reads a pair of scales, one past a lone last block
  // plain pointers: through the vectors, every byte stored might have changed their data pointers (char aliasing),
  // and the loops below neither vectorized nor kept the pointers in registers (10 ns a number, measured)
  int16_t* __restrict v = z.v.data();
  uint8_t* __restrict hi = z.hi.data();
  uint8_t* __restrict lo = z.lo.data();
  uint8_t* __restrict a = z.a.data();
  int8_t* __restrict sg = z.sg.data();
  int8_t* __restrict q = z.q.data();
  float* __restrict d = z.d.data();
  const float top = wide ? 32767.f : 127.f;
  for (int64_t b = 0; b < n / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float inv = amax > 0.f ? top / amax : 0.f;
    d[b] = amax / top;
    // X rounded to nearest (ties to even, as nearbyint in the default mode: |x * inv| <= top < 2^22, so adding and
    // taking away 1.5 * 2^23 rounds it), then split, in loops without branches or calls
    int32_t iv[BLOCK];
#pragma omp simd
    for (int64_t i = 0; i < BLOCK; ++i) {
      float r = (xb[i] * inv + 12582912.f) - 12582912.f;
      iv[i] = static_cast<int32_t>(std::min(top, std::max(-top, r)));
    }
    int64_t o = b * BLOCK;
    if (wide) {
#pragma omp simd
      for (int64_t i = 0; i < BLOCK; ++i) {
        uint32_t m = static_cast<uint32_t>(std::abs(iv[i]));
        v[o + i] = static_cast<int16_t>(iv[i]);
        hi[o + i] = static_cast<uint8_t>(m >> 8);  // |X| = 256 * H + L
        lo[o + i] = static_cast<uint8_t>(m & 255);
        sg[o + i] = static_cast<int8_t>(iv[i] < 0 ? -1 : 1);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < BLOCK; ++i) {
        q[o + i] = static_cast<int8_t>(iv[i]);
        a[o + i] = static_cast<uint8_t>(std::abs(iv[i]));
      }
    }
  }
}

}  // namespace

int64_t q8_in_features(const torch::Tensor& w) { return w.size(1) * 16 / 17; }

// y (rows, out) = x (rows, in) @ dequantized(w).T, w packed (out, in + in / 16); every thread one stretch of w's rows
void q8_run(const float* x, const torch::Tensor& w, float* y, int64_t rows, int64_t in, int64_t out) {
  int64_t stride = w.size(1);
  TORCH_CHECK(in % BLOCK == 0 && stride == in + in / 16 && w.size(0) == out,
              "int8: the packed weight does not match the input's width");
  if (g_isa < 0) g_isa = best_isa();
  Dot dot[4];
  kernels(g_isa, dot);
  thread_local Quantized z;
  if (g_isa != AVX512F32) quantize_rows(x, rows, in, g_isa != AVX512VNNI8, z);
  const Quantized* zp = &z;  // a pointer: inside the threads, z would name each thread's own (empty) buffers
  const uint8_t* wp = w.data_ptr<uint8_t>();
  int64_t tiles = (out + TILE - 1) / TILE, threads = at::get_num_threads();
  at::parallel_for(0, tiles, (tiles + threads - 1) / threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t o1 = std::min(out, (t + 1) * TILE);
      for (int64_t r = 0; r < rows; ++r) {
        Act act = zp->row(x, r, in);
        for (int64_t o = t * TILE; o < o1; o += 4) {
          int64_t n = std::min<int64_t>(4, o1 - o);
          dot[n - 1](act, wp + o * stride, stride, in, y + r * out + o);
        }
      }
    }
  });
}

namespace {

torch::Tensor q8_matvec(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "q8_matvec: x (rows, in) fp32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "q8_matvec: a packed weight");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  q8_run(x.data_ptr<float>(), w, y.data_ptr<float>(), x.size(0), x.size(1), w.size(0));
  return y;
}

// "auto": the best this CPU has; a name: that one (an error where the CPU lacks it). Returns the name in use.
std::string q8_isa(const std::string& name) {
  int best = best_isa();
  if (name == "auto") {
    g_isa = best;
  } else {
    auto it = std::find(std::begin(NAMES), std::end(NAMES), name);
    TORCH_CHECK(it != std::end(NAMES), "int8: unknown instruction set ", name);
    int want = static_cast<int>(it - std::begin(NAMES));
    bool ok = want == GENERIC || want == best || (want == AVX2 && best >= AVX2) ||
              ((want == AVX512VNNI8 || want == AVX512F32) && best == AVX512VNNI);
#ifdef Q8_X86
    if (want == AVXVNNI) ok = ok || (best >= AVX2 && __builtin_cpu_supports("avxvnni"));
#endif
    TORCH_CHECK(ok, "int8: this CPU cannot run ", name, " (it has ", NAMES[best], ")");
    g_isa = want;
  }
  return NAMES[g_isa];
}

}  // namespace

void register_int8(pybind11::module_& m) {
  m.def("q8_matvec", &q8_matvec, "y = x @ dequantized(w).T, w packed int8 blocks (decode)");
  m.def("q8_isa", &q8_isa,
        "choose the int8 kernels' instructions: auto, generic, avx2, avxvnni, avx512vnni, avx512vnni8, avx512f32");
}
