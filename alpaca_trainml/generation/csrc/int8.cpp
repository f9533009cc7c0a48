// int8 weights for the decode kernel (compiled into the same extension as decode.cpp; generation/int8.py packs them).
//
// A packed weight is a uint8 tensor (out, in + in / 16): each output row holds its `in` int8 weights, then one fp16
// scale per block of 32 of them (llama.cpp's q8_0 numbers: w ~= q * d, d = max|w| / 127 over the block, stored as
// fp16), so a row streams as two contiguous runs and the whole weight is 1.0625 bytes per number.
// A product quantizes each input row the same way (blocks of 32, int8 with an fp32 scale) and sums int8 x int8 in
// int32 per block (exact), then adds block sum * d_w * d_x in fp32: llama.cpp's q8_0 x q8_0 dot product.
// The instructions are picked at run time from the CPU's flags (q8_isa): AVX512-VNNI (vpdpbusd on 64 bytes),
// AVX-VNNI (on 32), AVX2 (vpmaddubsw + vpmaddwd), or plain C++; each is compiled with its own target attribute, so one
// build serves every x86 CPU and a CPU without the flags never runs them.
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
enum Isa { GENERIC = 0, AVX2 = 1, AVXVNNI = 2, AVX512VNNI = 3, AVX512F32 = 4 };
// avx512f32: the other way, measured against the rest (docs/decode-kernel.md): fp32 input rows, each int8 weight
// converted to fp32 on the fly; never chosen by auto
const char* const NAMES[] = {"generic", "avx2", "avxvnni", "avx512vnni", "avx512f32"};

// One input row quantized: q int8 (in,), a = |q| as uint8 (vpdpbusd multiplies unsigned by signed), d (in / 32,).
struct Act {
  const float* x;  // the row itself (avx512f32)
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
      for (int64_t i = b * BLOCK; i < (b + 1) * BLOCK; ++i) s += static_cast<int32_t>(wq[i]) * x.q[i];
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

// The body of the 256-bit kernels: one block of 32 per step; PRODUCT(a, sw) gives 8 int32 sums of a * sw
#define Q8_DOT256(PRODUCT)                                                                     \
  __m256 acc[N];                                                                               \
  for (int k = 0; k < N; ++k) acc[k] = _mm256_setzero_ps();                                    \
  for (int64_t b = 0; b < in / BLOCK; ++b) {                                                   \
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.a + b * BLOCK));         \
    __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * BLOCK));         \
    for (int k = 0; k < N; ++k) {                                                              \
      const uint8_t* wk = w + k * stride;                                                      \
      __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + b * BLOCK)), s); \
      uint16_t h;                                                                              \
      std::memcpy(&h, wk + in + 2 * b, 2);                                                     \
      __m256 scale = _mm256_set1_ps(_cvtsh_ss(h) * x.d[b]);                                    \
      acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PRODUCT(a, sw)), scale, acc[k]);             \
    }                                                                                          \
  }                                                                                            \
  for (int k = 0; k < N; ++k) y[k] = hsum256(acc[k]);

__attribute__((target("avx2,fma,f16c"))) inline __m256i product_avx2(__m256i a, __m256i sw) {
  // |x| * sign-applied w in pairs (at most 2 * 127 * 127: no saturation), then pairs of pairs into int32
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, sw), _mm256_set1_epi16(1));
}

template <int N>
__attribute__((target("avx2,fma,f16c"))) void dot_avx2(const Act& x, const uint8_t* w, int64_t stride, int64_t in,
                                                        float* y) {
  Q8_DOT256(product_avx2)
}

__attribute__((target("avx2,fma,f16c,avxvnni"))) inline __m256i product_vnni(__m256i a, __m256i sw) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, sw);
}

template <int N>
__attribute__((target("avx2,fma,f16c,avxvnni"))) void dot_avxvnni(const Act& x, const uint8_t* w, int64_t stride,
                                                                  int64_t in, float* y) {
  Q8_DOT256(product_vnni)
}
#undef Q8_DOT256

// 64 weights (two blocks) per step: the low 8 int32 lanes hold block 2j's sums, the high 8 block 2j+1's; a last lone
// block of 32 loads as the low half, with zeros (and zero scales) in the high one
template <int N>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) void dot_avx512(
    const Act& x, const uint8_t* w, int64_t stride, int64_t in, float* y) {
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[N];
  for (int k = 0; k < N; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 2 * BLOCK) {
    bool pair = in - i >= 2 * BLOCK;
    __mmask64 load = pair ? ~__mmask64(0) : __mmask64(0xffffffffu);
    __m512i a = _mm512_maskz_loadu_epi8(load, x.a + i);
    __mmask64 neg = _mm512_movepi8_mask(_mm512_maskz_loadu_epi8(load, x.q + i));
    __m128 d2 = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x.d + i / BLOCK)));
    __m512 d = _mm512_maskz_permutexvar_ps(pair ? 0xffff : 0x00ff, halves, _mm512_castps128_ps512(d2));
    for (int k = 0; k < N; ++k) {
      const uint8_t* wk = w + k * stride;
      __m512i wv = _mm512_maskz_loadu_epi8(load, wk + i);
      __m512i sw = _mm512_mask_sub_epi8(wv, neg, zero, wv);  // w where x >= 0, -w where x < 0
      __m512i p = _mm512_dpbusd_epi32(zero, a, sw);
      int32_t h2;  // the blocks' two fp16 scales (a lone block's neighbour: its row's first weights, times d = 0)
      std::memcpy(&h2, wk + in + i / 16 - (pair ? 0 : 2), 4);
      __m128i h = pair ? _mm_cvtsi32_si128(h2) : _mm_srli_epi32(_mm_cvtsi32_si128(h2), 16);
      __m512 s = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
      acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(s, d), acc[k]);
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
  Dot table[5][4] = {
      {dot_generic<1>, dot_generic<2>, dot_generic<3>, dot_generic<4>},
#ifdef Q8_X86
      {dot_avx2<1>, dot_avx2<2>, dot_avx2<3>, dot_avx2<4>},
      {dot_avxvnni<1>, dot_avxvnni<2>, dot_avxvnni<3>, dot_avxvnni<4>},
      {dot_avx512<1>, dot_avx512<2>, dot_avx512<3>, dot_avx512<4>},
      {dot_avx512f32<1>, dot_avx512f32<2>, dot_avx512f32<3>, dot_avx512f32<4>},
#endif
  };
  std::copy(table[isa], table[isa] + 4, out);
}

// x (rows, in) fp32 -> blocks of 32 int8 with one fp32 scale each (round to nearest), into q, a, d
void quantize_rows(const float* x, int64_t rows, int64_t in, std::vector<int8_t>& q, std::vector<uint8_t>& a,
                   std::vector<float>& d) {
  q.resize(rows * in);
  a.resize(rows * in);
  d.resize(rows * in / BLOCK + 2);  // +2: the AVX512 kernel reads a pair of scales, one past a lone last block
  for (int64_t b = 0; b < rows * in / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
    for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = scale;
    for (int64_t i = 0; i < BLOCK; ++i) {
      float v = std::nearbyint(xb[i] * inv);
      int8_t iv = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
      q[b * BLOCK + i] = iv;
      a[b * BLOCK + i] = static_cast<uint8_t>(iv < 0 ? -iv : iv);
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
  thread_local std::vector<int8_t> q;
  thread_local std::vector<uint8_t> a;
  thread_local std::vector<float> d;
  quantize_rows(x, rows, in, q, a, d);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int8_t* qp = q.data();  // pointers: inside the threads, q/a/d would name each thread's own (empty) buffers
  const uint8_t* ap = a.data();
  const float* dp = d.data();
  int64_t tiles = (out + TILE - 1) / TILE, threads = at::get_num_threads();
  at::parallel_for(0, tiles, (tiles + threads - 1) / threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t o1 = std::min(out, (t + 1) * TILE);
      for (int64_t r = 0; r < rows; ++r) {
        Act act{x + r * in, qp + r * in, ap + r * in, dp + r * in / BLOCK};
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
              (want == AVX512F32 && best == AVX512VNNI);
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
  m.def("q8_isa", &q8_isa, "choose the int8 kernels' instructions: auto, generic, avx2, avxvnni, avx512vnni, avx512f32");
}
