// The decode kernels, built by alpaca_trainml/generation/matvec.py:
// - matvec: y = x @ w.T for a few rows of x, every thread streaming its own block of w's rows once; fp32 or bf16
//   weights, fp32 input and output, fp32 accumulation, each output summed in one order whatever the rows (fp32:
//   f32.cpp, AVX-512 or AVX2 picked at run time).
// - LlamaDecoder: a whole decode step through a Llama-family layer stack in fp32 or bf16 (norms, fused projections
//   and their biases, Qwen3's per-head q/k norms, rotary embedding, cache write, attention within a layer's sliding
//   window, SwiGLU), one call per token instead of some 30 tensor operations per layer; its rows may be several
//   positions of one cache row (a speculative verify). An fp32 model's projections may be int8 blocks instead
//   (uint8 tensors packed by generation/int8.py; int8.cpp multiplies them).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// f32.cpp: fp32 w's rows [o0, o1) for every row of x (instructions picked at run time), and its module function
void f32_rows(const float* x, const float* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
              int64_t o1);
void register_f32(pybind11::module_& m);

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
  if constexpr (std::is_same<W, float>::value) {
    return f32_rows(x, w, y, rows, in, out, o0, o1);
  } else {
    int64_t r = 0;
    for (; r + ROWS <= rows; r += ROWS) dot_rows<ROWS>(x + r * in, w, y + r * out, in, out, o0, o1);
    switch (rows - r) {
      case 3: dot_rows<3>(x + r * in, w, y + r * out, in, out, o0, o1); break;
      case 2: dot_rows<2>(x + r * in, w, y + r * out, in, out, o0, o1); break;
      case 1: dot_rows<1>(x + r * in, w, y + r * out, in, out, o0, o1); break;
      default: break;
    }
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

// int8.cpp: y = x @ w.T for a packed int8 weight, its in_features, and its functions for the module
void q8_run(const float* x, const torch::Tensor& w, float* y, int64_t rows, int64_t in, int64_t out);
int64_t q8_in_features(const torch::Tensor& w);
void register_int8(pybind11::module_& m);

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


namespace {

template <typename W>
const W* ptr(const torch::Tensor& t);
template <>
const float* ptr<float>(const torch::Tensor& t) { return t.data_ptr<float>(); }
template <>
const uint16_t* ptr<uint16_t>(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// A value as the model's dtype holds it: fp32 as it is; bf16 rounded to nearest even, as torch converts
template <typename W>
inline float held(float f) {
  if (std::is_same<W, float>::value) return f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;  // NaN stays NaN
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  *p = static_cast<uint16_t>(u >> 16);  // v is already held<uint16_t>: exact
}

// sum of a[i] * b[i], 16 at a time where the CPU has AVX2
template <typename W>
inline float dot(const float* a, const W* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
  }
  s = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; i < n; ++i) s += a[i] * load1(b + i);
  return s;
}

// transformers' LlamaRMSNorm: h * rsqrt(mean(h^2) + eps) in fp32, in the model's dtype, then * weight
template <typename W>
void rms_norm(const float* h, const W* w, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = h + r * n;
    float* y = out + r * n;
    float ss = dot(x, x, n);
    float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = held<W>(held<W>(x[i] * inv) * load1(w + i));
  }
}

// transformers' apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
template <typename W>
void rotate(float* x, const float* cos, const float* sin, int64_t dim) {
  int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    float a = x[d], b = x[d + half];
    x[d] = held<W>(held<W>(a * cos[d]) + held<W>((-b) * sin[d]));
    x[d + half] = held<W>(held<W>(b * cos[d + half]) + held<W>(a * sin[d + half]));
  }
}

// y (rows, n) += bias, where the layer has one (an empty tensor: none)
template <typename W>
void add_bias(float* y, const torch::Tensor& bias, int64_t rows, int64_t n) {
  if (bias.numel() == 0) return;
  const W* b = ptr<W>(bias);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) y[r * n + j] += load1(b + j);
}

// y = x @ w.T where w is in the model's dtype or (an fp32 model's projections) packed int8
template <typename W>
void project(const float* x, const torch::Tensor& w, float* y, int64_t rows, int64_t in, int64_t out) {
  if (w.scalar_type() == torch::kUInt8) return q8_run(x, w, y, rows, in, out);
  run(x, ptr<W>(w), y, rows, in, out);
}

template <typename W>
void round_all(float* x, int64_t n) {
  if (!std::is_same<W, float>::value)
    for (int64_t i = 0; i < n; ++i) x[i] = held<W>(x[i]);
}

}  // namespace

// A whole decode step through a Llama-family layer stack. Weights and cache in fp32 or bf16 (all the same); activations
// are fp32 numbers rounded to the model's dtype wherever transformers' forward rounds them (a bf16 model's every
// operation), so that a bf16 step gives transformers' bf16 numbers up to the order of the sums.
struct LlamaDecoder {
  struct Layer {
    torch::Tensor ln1, wqkv, wo, ln2, wgu, wd;
    torch::Tensor bqkv, bo, bgu, bd, qn, kn;  // biases and Qwen3's q/k norms; empty where the model has none
    int64_t window;                           // sliding window in positions; 0: none
  };
  std::vector<Layer> layers;
  torch::ScalarType dtype;
  int64_t heads, kv_heads, dim, hidden, inter;
  float eps, scale;

  // weights: per layer (ln1, wqkv, wo, ln2, wgu, wd) and optionally (bqkv, bo, bgu, bd, q_norm, k_norm) after them,
  // empty tensors for those a model lacks; windows: per layer (or none at all), 0 for no sliding window.
  LlamaDecoder(std::vector<std::vector<torch::Tensor>> weights, int64_t heads, int64_t kv_heads, int64_t dim,
               double eps, double scale, std::vector<int64_t> windows)
      : heads(heads), kv_heads(kv_heads), dim(dim), eps(static_cast<float>(eps)), scale(static_cast<float>(scale)) {
    TORCH_CHECK(!weights.empty() && !weights[0].empty(), "LlamaDecoder: no layers");
    TORCH_CHECK(windows.empty() || windows.size() == weights.size(), "LlamaDecoder: one window per layer");
    dtype = weights[0][0].scalar_type();
    TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "LlamaDecoder: fp32 or bf16 weights");
    for (size_t i = 0; i < weights.size(); ++i) {
      auto w = weights[i];
      TORCH_CHECK(w.size() == 6 || w.size() == 12,
                  "LlamaDecoder: each layer is (ln1, wqkv, wo, ln2, wgu, wd[, bqkv, bo, bgu, bd, q_norm, k_norm])");
      for (size_t j = 0; j < w.size(); ++j) {
        bool int8 = (j == 1 || j == 2 || j == 4 || j == 5) && dtype == torch::kFloat32 &&
                    w[j].scalar_type() == torch::kUInt8;  // an fp32 model's projection in int8 blocks
        TORCH_CHECK((w[j].scalar_type() == dtype || int8) && w[j].is_contiguous() && w[j].device().is_cpu(),
                    "LlamaDecoder: contiguous CPU weights, all of one dtype");
      }
      auto none = torch::empty({0}, w[0].options());
      while (w.size() < 12) w.push_back(none);
      int64_t window = windows.empty() ? 0 : windows[i];
      TORCH_CHECK(window >= 0, "LlamaDecoder: a window is 0 (none) or a number of positions");
      layers.push_back({w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11], window});
    }
    hidden = layers[0].ln1.size(0);
    inter = layers[0].wd.scalar_type() == torch::kUInt8 ? q8_in_features(layers[0].wd) : layers[0].wd.size(1);
    int64_t qkv_n = (heads + 2 * kv_heads) * dim;
    TORCH_CHECK(layers[0].wqkv.size(0) == qkv_n && heads % kv_heads == 0,
                "LlamaDecoder: the fused q/k/v weight does not match the heads");
    for (auto& L : layers)
      TORCH_CHECK((L.bqkv.numel() == 0 || L.bqkv.numel() == qkv_n) && (L.bo.numel() == 0 || L.bo.numel() == hidden) &&
                      (L.bgu.numel() == 0 || L.bgu.numel() == 2 * inter) &&
                      (L.bd.numel() == 0 || L.bd.numel() == hidden) && L.qn.numel() == L.kn.numel() &&
                      (L.qn.numel() == 0 || L.qn.numel() == dim),
                  "LlamaDecoder: a bias or q/k norm does not match the layer's shapes");
  }
  LlamaDecoder(std::vector<std::vector<torch::Tensor>> weights, int64_t heads, int64_t kv_heads, int64_t dim,
               double eps, double scale)
      : LlamaDecoder(std::move(weights), heads, kv_heads, dim, eps, scale, {}) {}

  // h (rows, hidden) fp32: the new tokens' embeddings, changed in place into the last layer's output.
  // cos, sin (rows, dim) fp32: each row's rotary at its position. keys[i], values[i] (rows_cap, kv_heads, pos_cap,
  // dim) in the weights' dtype: row r's token goes to position pos[r] of cache row slots[r] (r itself when slots is
  // empty) and attends to positions 0..pos[r] there. Several rows may share a slot at different positions (a
  // speculative verify: a draft's positions): every row's key and value are written before any row attends, so each
  // position sees the draft up to itself, causal as one token at a time would be.
  torch::Tensor step(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> keys,
                     std::vector<torch::Tensor> values, std::vector<int64_t> pos, std::vector<int64_t> slots) {
    int64_t rows = h.size(0);
    TORCH_CHECK(h.dim() == 2 && h.size(1) == hidden && h.is_contiguous() && h.scalar_type() == torch::kFloat32,
                "LlamaDecoder.step: h (rows, hidden) fp32");
    TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.size(1) == dim && sin.size(1) == dim,
                "LlamaDecoder.step: cos, sin (rows, dim) fp32");
    TORCH_CHECK(static_cast<int64_t>(pos.size()) == rows && cos.size(0) == rows && sin.size(0) == rows,
                "LlamaDecoder.step: one position per row");
    TORCH_CHECK(keys.size() == layers.size() && values.size() == layers.size(), "LlamaDecoder.step: one cache per layer");
    for (size_t i = 0; i < keys.size(); ++i)
      TORCH_CHECK(keys[i].scalar_type() == dtype && values[i].scalar_type() == dtype && keys[i].is_contiguous() &&
                      values[i].is_contiguous() && keys[i].sizes() == values[i].sizes() && keys[i].dim() == 4 &&
                      keys[i].size(0) == keys[0].size(0) && keys[i].size(1) == kv_heads && keys[i].size(3) == dim &&
                      keys[i].size(2) == keys[0].size(2),
                  "LlamaDecoder.step: caches (rows, kv_heads, positions, dim) in the weights' dtype");
    for (auto p : pos) TORCH_CHECK(p >= 0 && p < keys[0].size(2), "LlamaDecoder.step: position outside the cache");
    if (slots.empty())
      for (int64_t r = 0; r < rows; ++r) slots.push_back(r);
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == rows, "LlamaDecoder.step: one cache slot per row");
    for (auto r : slots) TORCH_CHECK(r >= 0 && r < keys[0].size(0), "LlamaDecoder.step: a slot outside the cache");
    if (dtype == torch::kFloat32) {
      run_step<float>(h, cos, sin, keys, values, pos, slots);
    } else {
      run_step<uint16_t>(h, cos, sin, keys, values, pos, slots);
    }
    return h;
  }

  template <typename W>
  void run_step(torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin, std::vector<torch::Tensor>& keys,
                std::vector<torch::Tensor>& values, const std::vector<int64_t>& pos, const std::vector<int64_t>& slot) {
    int64_t rows = h.size(0), qkv_n = (heads + 2 * kv_heads) * dim, group = heads / kv_heads;
    int64_t pos_cap = keys[0].size(2), width = *std::max_element(pos.begin(), pos.end()) + 1;
    auto opts = h.options();
    auto xn = torch::empty({rows, hidden}, opts), qkv = torch::empty({rows, qkv_n}, opts);
    auto att = torch::empty({rows, heads * dim}, opts), out = torch::empty({rows, hidden}, opts);
    auto gu = torch::empty({rows, 2 * inter}, opts), act = torch::empty({rows, inter}, opts);
    auto scores = torch::empty({rows * heads, width}, opts);
    float *hp = h.data_ptr<float>(), *xp = xn.data_ptr<float>(), *qp = qkv.data_ptr<float>();
    float *ap = att.data_ptr<float>(), *op = out.data_ptr<float>(), *gp = gu.data_ptr<float>();
    float *actp = act.data_ptr<float>(), *sp = scores.data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      W* kc = const_cast<W*>(ptr<W>(keys[i]));
      W* vc = const_cast<W*>(ptr<W>(values[i]));
      rms_norm(hp, ptr<W>(L.ln1), xp, rows, hidden, eps);
      project<W>(xp, L.wqkv, qp, rows, hidden, qkv_n);
      add_bias<W>(qp, L.bqkv, rows, qkv_n);
      round_all<W>(qp, rows * qkv_n);
      for (int64_t r = 0; r < rows; ++r) {
        float* q = qp + r * qkv_n;
        if (L.qn.numel()) {  // Qwen3: every query head, then every key head, RMS-normed over dim (in place)
          rms_norm(q, ptr<W>(L.qn), q, heads, dim, eps);
          rms_norm(q + heads * dim, ptr<W>(L.kn), q + heads * dim, kv_heads, dim, eps);
        }
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) rotate<W>(q + hd * dim, cp + r * dim, snp + r * dim, dim);
        for (int64_t g = 0; g < kv_heads; ++g) {
          int64_t at = ((slot[r] * kv_heads + g) * pos_cap + pos[r]) * dim;
          for (int64_t d = 0; d < dim; ++d) {
            store(kc + at + d, q[(heads + g) * dim + d]);
            store(vc + at + d, q[(heads + kv_heads + g) * dim + d]);
          }
        }
      }
      at::parallel_for(0, rows * heads, 1, [&](int64_t b, int64_t e) {
        for (int64_t rh = b; rh < e; ++rh) {
          int64_t r = rh / heads, hd = rh % heads, n = pos[r] + 1;
          int64_t t0 = L.window > 0 ? std::max<int64_t>(0, n - L.window) : 0;  // the window's first position
          const float* q = qp + r * qkv_n + hd * dim;
          const W* K = kc + (slot[r] * kv_heads + hd / group) * pos_cap * dim;
          const W* V = vc + (slot[r] * kv_heads + hd / group) * pos_cap * dim;
          float* s = sp + rh * width;
          float top = -INFINITY;
          for (int64_t t = t0; t < n; ++t) {
            s[t] = dot(q, K + t * dim, dim) * scale;
            top = std::max(top, s[t]);
          }
          float total = 0.f;
          for (int64_t t = t0; t < n; ++t) total += (s[t] = std::exp(s[t] - top));
          float* o = ap + r * heads * dim + hd * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] = 0.f;
          for (int64_t t = t0; t < n; ++t) {
            float p = s[t] / total;
            for (int64_t d = 0; d < dim; ++d) o[d] += p * load1(V + t * dim + d);
          }
          for (int64_t d = 0; d < dim; ++d) o[d] = held<W>(o[d]);
        }
      });
      project<W>(ap, L.wo, op, rows, heads * dim, hidden);
      add_bias<W>(op, L.bo, rows, hidden);
      for (int64_t j = 0; j < rows * hidden; ++j) hp[j] = held<W>(hp[j] + held<W>(op[j]));
      rms_norm(hp, ptr<W>(L.ln2), xp, rows, hidden, eps);
      project<W>(xp, L.wgu, gp, rows, hidden, 2 * inter);
      add_bias<W>(gp, L.bgu, rows, 2 * inter);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < inter; ++j) {
          float g = held<W>(gp[r * 2 * inter + j]), u = held<W>(gp[r * 2 * inter + inter + j]);
          actp[r * inter + j] = held<W>(held<W>(g / (1.f + std::exp(-g))) * u);
        }
      project<W>(actp, L.wd, op, rows, inter, hidden);
      add_bias<W>(op, L.bd, rows, hidden);
      for (int64_t j = 0; j < rows * hidden; ++j) hp[j] = held<W>(hp[j] + held<W>(op[j]));
    }
  }
};

// Both release the GIL while they run (they touch no Python object): serve.py's HTTP thread answers meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("matvec", &matvec, "y = x @ w.T for a few rows (decode)", release());
  pybind11::class_<LlamaDecoder>(m, "LlamaDecoder", pybind11::module_local())
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, int64_t, int64_t, int64_t, double, double,
                          std::vector<int64_t>>())
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, int64_t, int64_t, int64_t, double, double>())
      .def("step", &LlamaDecoder::step, release(), pybind11::arg("h"), pybind11::arg("cos"), pybind11::arg("sin"),
           pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("pos"),
           pybind11::arg("slots") = std::vector<int64_t>());
  register_int8(m);
  register_f32(m);
}
