// y = x @ w.T for a few rows of x (decode steps), every thread streaming its own block of w's rows once.
// fp32 or bf16 weights, fp32 input and output, fp32 accumulation. Built by alpaca_trainml/generation/matvec.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 64;  // output rows per tile: a tile of w stays in L2 while every group of x rows reads it
constexpr int ROWS = 4;       // x rows per pass over a tile

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// R rows of x (stride in) against w's rows [o0, o1): y[r * out + o]
template <int R, typename W>
void dot_rows(const float* x, const W* w, float* y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wr = w + o * in;
    int64_t i = 0;
    float sum[R];
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm256_setzero_ps();
    for (; i + 32 <= in; i += 32) {
      __m256 w0 = load8(wr + i), w1 = load8(wr + i + 8), w2 = load8(wr + i + 16), w3 = load8(wr + i + 24);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * in + i;
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r)
      sum[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
#else
    for (int r = 0; r < R; ++r) sum[r] = 0.f;
#endif
    for (; i < in; ++i) {
      float wi = load1(wr + i);
      for (int r = 0; r < R; ++r) sum[r] += wi * x[r * in + i];
    }
    for (int r = 0; r < R; ++r) y[r * out + o] = sum[r];
  }
}

template <typename W>
void tile(const float* x, const W* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  int64_t r = 0;
  for (; r + ROWS <= rows; r += ROWS) dot_rows<ROWS>(x + r * in, w, y + r * out, in, out, o0, o1);
  switch (rows - r) {
    case 3: dot_rows<3>(x + r * in, w, y + r * out, in, out, o0, o1); break;
    case 2: dot_rows<2>(x + r * in, w, y + r * out, in, out, o0, o1); break;
    case 1: dot_rows<1>(x + r * in, w, y + r * out, in, out, o0, o1); break;
    default: break;
  }
}

template <typename W>
void run(const float* x, const W* w, float* y, int64_t rows, int64_t in, int64_t out) {
  int64_t tiles = (out + TILE - 1) / TILE;
  int64_t threads = at::get_num_threads();
  int64_t grain = (tiles + threads - 1) / threads;  // one contiguous stretch of w per thread
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) tile(x, w, y, rows, in, out, t * TILE, std::min(out, (t + 1) * TILE));
  });
}

}  // namespace

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "matvec: x (rows, in), w (out, in)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && w.is_contiguous(), "matvec: layout");
  int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  auto y = torch::empty({rows, out}, x.options());
  if (w.scalar_type() == torch::kFloat32) {
    run(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, in, out);
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "matvec: fp32 or bf16 weights");
    auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    run(x.data_ptr<float>(), wp, y.data_ptr<float>(), rows, in, out);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("matvec", &matvec, "y = x @ w.T for a few rows (decode)"); }
