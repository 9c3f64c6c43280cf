// The loss's passes over a float32 [N, V_local] logits shard on CPU (megatron_ntp/loss/passes.py
// has their definitions in torch, which the GPUs run compiled):
//   shard_stage(logits, select_block, k, simd) -> (select maxima [N, V_local / select_block],
//       m [N], sums [N, 2], values [N, k], positions [N, k] ascending, topk_terms [N, 3],
//       topk_last_position [N]):
//       stage 1 per row: the max of each select block, the row max m, S = sum exp(z - m),
//       T = sum exp(z - m) (z - m), the row's first k under (value desc, position asc),
//       searched in the select blocks that can hold them (first_k.h; a NaN row gets NaN values
//       and positions 0..k-1), and the terms of that set as K (what stage 3 needs when the row
//       is the whole vocabulary): its last member's value (the smallest value; its position,
//       the largest among equal ones, in topk_last_position) and its sums S_K, T_K like S and
//       T (k = 0: +inf, 0, 0 and position -1);
//   gradient(logits, log_normalizer [N], coef [N], out [N, V_local], candidate columns, values
//       and coefs [N, c], target column and value [N], simd): out = exp(z - lz) coef, out may
//       be logits itself; then, while the row is in cache, each candidate entry (stage 4's
//       shard candidates of K) gets exp(value - lz) times its own coef and the target entry
//       its value (where its column is >= 0), in that order.
// shard_stage reads a row from memory once, for its maxima; the sums at the exact row max (so
// no block rescaling is needed) and the top-k search then find it in cache (a row of 151,936
// floats is 594 KiB; searched later, from memory, the blocks cost a cache miss each).
// Both passes are bound by exp: torch.compile's loops call Sleef's expf (1 ulp) at
// ~1.1 ns per entry on an AVX2 core; the polynomial below (Cephes' expf; <= 1.25 ulp measured
// over [-87, 1]) is ~3x cheaper. Sums run in float32 lanes over 256 entries, then in double, so
// they are more accurate than the compiled loop's blocks of 128 (measured: 1.2e-7 against
// 2.2e-7 relative, at 1024 x 75,968).
// Edge cases, as in passes.py: -inf entries add nothing (exp(-inf) = 0, never 0 * -inf); a
// row that is -inf everywhere gets m = -inf and sums 0; NaN anywhere makes its select max, m
// and S NaN; +inf makes m +inf and S NaN (stage 3 refuses both).
// The AVX2 + FMA loops are compiled for those instructions alone and chosen at run time, so
// the extension still loads on CPUs without them (a plain loop then).
#include "kernels.h"
#include "first_k.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NTP_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// exp's arguments are clamped to [kExpMin, kExpMax]: the polynomial's exp(-88) is 0 (so -inf
// gives 0 and 0 * (z - m) stays finite), and its exp(89) is +inf (so +inf gives +inf; true
// overflow is at 88.72, and z - lz <= 0 here but for rounding)
constexpr float kExpMin = -88.0f;
constexpr float kExpMax = 89.0f;
constexpr int64_t kLanesChunk = 256;  // entries summed in float32 lanes before the double sums

inline float clamp_exp_arg(float x) {  // keeps NaN
  return std::isnan(x) ? x : std::min(std::max(x, kExpMin), kExpMax);
}

// exp of a clamped argument, 0 at kExpMin as the polynomial gives (std::exp(-88) is a 6e-39)
inline float exp_plain(float x) { return x <= kExpMin ? 0.0f : std::exp(x); }

// --- plain loops (any CPU) -------------------------------------------------------------------

// Folds z[0, len) into a block's running max and NaN flag.
inline void fold_block_max(const float* z, int64_t len, float* value, bool* nan) {
  for (int64_t i = 0; i < len; ++i) {
    *nan |= std::isnan(z[i]);
    *value = std::max(*value, z[i]);
  }
}

// Stores a select block's max (NaN where it holds one) and folds it into the row's.
inline void store_block_max(float value, bool has_nan, float* select_max, float* m, bool* nan) {
  *select_max = has_nan ? kNaN : value;
  *nan |= has_nan;
  *m = std::max(*m, value);
}

float select_maxima_plain(const float* z, int64_t n, int64_t select_block, float* select_max) {
  float m = -kInf;
  bool nan = false;
  for (int64_t b = 0; b < n / select_block; ++b) {
    float value = -kInf;
    bool has_nan = false;
    fold_block_max(z + b * select_block, select_block, &value, &has_nan);
    store_block_max(value, has_nan, select_max + b, &m, &nan);
  }
  return nan ? kNaN : m;
}

void exp_sums_plain(const float* z, int64_t n, float m, double* sum_exp, double* sum_exp_logit) {
  double s = 0, t = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float d = clamp_exp_arg(z[i] - m);
    const float e = exp_plain(d);
    s += e;
    t += e * d;
  }
  *sum_exp = s;
  *sum_exp_logit = t;
}

void gradient_plain(const float* z, int64_t n, float log_normalizer, float coef, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_plain(clamp_exp_arg(z[i] - log_normalizer)) * coef;
}

// --- AVX2 + FMA loops --------------------------------------------------------------------------

#ifdef NTP_HAVE_AVX2_PATH
#define NTP_AVX2 __attribute__((target("avx2,fma")))

// exp(x) for x in [-88, 89] or NaN (NaN out): 2^n exp(r), n = round(x log2 e), r = x - n ln 2
// (ln 2 in two parts, so r is exact), exp(r) by Cephes' expf polynomial. At n = -127
// (x < -87.98) the scale's exponent field is 0: the result is 0 (exp(-88) = 6e-39 is below
// every sum's rounding, each sum holding exp(0) = 1); at n = 128 (x > 88.38) it is 255: +inf.
NTP_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// _mm256_max_ps/_min_ps return their second operand when either is NaN: x second keeps NaN
NTP_AVX2 inline __m256 clamp_exp_arg_avx2(__m256 x) {
  return _mm256_max_ps(_mm256_set1_ps(kExpMin), _mm256_min_ps(_mm256_set1_ps(kExpMax), x));
}

NTP_AVX2 inline float horizontal_max(__m256 v) {  // of non-NaN lanes
  __m256 t = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  t = _mm256_max_ps(t, _mm256_shuffle_ps(t, t, 0x4e));
  t = _mm256_max_ps(t, _mm256_shuffle_ps(t, t, 0xb1));
  return _mm_cvtss_f32(_mm256_castps256_ps128(t));
}

NTP_AVX2 inline double horizontal_sum(__m256d v) {
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

NTP_AVX2 inline __m256d widen_sum(__m256 v) {  // 8 floats -> 4 doubles, pairwise added
  return _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                       _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

NTP_AVX2 float select_maxima_avx2(const float* z, int64_t n, int64_t select_block,
                                  float* select_max) {
  const int64_t vector_end = select_block / 8 * 8;
  float m = -kInf;
  bool nan = false;
  for (int64_t b = 0; b < n / select_block; ++b) {
    const float* zb = z + b * select_block;
    __m256 block_max = _mm256_set1_ps(-kInf), block_nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < vector_end; i += 8) {
      const __m256 v = _mm256_loadu_ps(zb + i);
      block_max = _mm256_max_ps(block_max, v);
      block_nan = _mm256_or_ps(block_nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float value = horizontal_max(block_max);
    bool has_nan = _mm256_movemask_ps(block_nan) != 0;
    fold_block_max(zb + vector_end, select_block - vector_end, &value, &has_nan);
    store_block_max(value, has_nan, select_max + b, &m, &nan);
  }
  return nan ? kNaN : m;
}

NTP_AVX2 void exp_sums_avx2(const float* z, int64_t n, float m, double* sum_exp,
                            double* sum_exp_logit) {
  const __m256 shift = _mm256_set1_ps(m);
  __m256d s_wide = _mm256_setzero_pd(), t_wide = _mm256_setzero_pd();
  int64_t i = 0;
  while (i + 16 <= n) {
    // two independent chains per sum, so the adds' latency hides behind the exps
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
    for (const int64_t end = std::min(n - 15, i + kLanesChunk); i < end; i += 16) {
      const __m256 d0 = clamp_exp_arg_avx2(_mm256_sub_ps(_mm256_loadu_ps(z + i), shift));
      const __m256 d1 = clamp_exp_arg_avx2(_mm256_sub_ps(_mm256_loadu_ps(z + i + 8), shift));
      const __m256 e0 = exp_avx2(d0), e1 = exp_avx2(d1);
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
      t0 = _mm256_fmadd_ps(e0, d0, t0);
      t1 = _mm256_fmadd_ps(e1, d1, t1);
    }
    s_wide = _mm256_add_pd(s_wide, widen_sum(_mm256_add_ps(s0, s1)));
    t_wide = _mm256_add_pd(t_wide, widen_sum(_mm256_add_ps(t0, t1)));
  }
  double tail_s, tail_t;
  exp_sums_plain(z + i, n - i, m, &tail_s, &tail_t);
  *sum_exp = horizontal_sum(s_wide) + tail_s;
  *sum_exp_logit = horizontal_sum(t_wide) + tail_t;
}

NTP_AVX2 void gradient_avx2(const float* z, int64_t n, float log_normalizer, float coef,
                            float* out) {
  const __m256 shift = _mm256_set1_ps(log_normalizer), scale = _mm256_set1_ps(coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = clamp_exp_arg_avx2(_mm256_sub_ps(_mm256_loadu_ps(z + i), shift));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(exp_avx2(d), scale));
  }
  gradient_plain(z + i, n - i, log_normalizer, coef, out + i);
}
#endif  // NTP_HAVE_AVX2_PATH

// simd = false takes the plain loops (what CPUs without AVX2 + FMA run), for tests
bool use_avx2(bool simd) {
#ifdef NTP_HAVE_AVX2_PATH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return simd && supported;
#else
  return false;
#endif
}

void check_logits(const torch::Tensor& logits, const char* what) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 &&
                  logits.dim() == 2 && logits.is_contiguous(),
              what, ": logits must be a contiguous float32 [N, V_local] CPU tensor");
}

void check_per_row(const torch::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 1 &&
                  t.size(0) == rows && t.is_contiguous(),
              "gradient: ", name, " must be a contiguous float32 [N] CPU tensor, N = ", rows);
}

// The sums S, T of z[0, n) at m (m = -inf: the row is -inf everywhere, sums 0).
void exp_sums(const float* z, int64_t n, float m, bool avx2, double* s, double* t) {
  *s = *t = 0;
  if (m == -kInf) return;
#ifdef NTP_HAVE_AVX2_PATH
  if (avx2) return exp_sums_avx2(z, n, m, s, t);
#endif
  exp_sums_plain(z, n, m, s, t);
}

// topk_terms of a row's first k (k >= 1): the last member's value, S_K, T_K into out [3], and
// its position.
void topk_terms(const float* values, const int64_t* positions, int64_t k, float m, bool avx2,
                float* out, int64_t* out_position) {
  float last = values[0];
  int64_t last_position = positions[0];
  for (int64_t i = 1; i < k; ++i) {  // positions ascend: the last equal one is the largest
    const bool later = !(values[i] > last);
    last_position = later ? positions[i] : last_position;
    last = later ? values[i] : last;
  }
  double s, t;
  exp_sums(values, k, m, avx2, &s, &t);
  out[0] = last;
  out[1] = static_cast<float>(s);
  out[2] = static_cast<float>(t);
  *out_position = last_position;
}

}  // namespace

std::vector<torch::Tensor> shard_stage(torch::Tensor logits, int64_t select_block, int64_t k,
                                       bool simd) {
  check_logits(logits, "shard_stage");
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(select_block >= 1 && n % select_block == 0, "shard_stage: select_block ",
              select_block, " must divide V_local = ", n);
  TORCH_CHECK(k >= 0 && k <= n, "shard_stage: need 0 <= k <= V_local, got k=", k, ", V_local=", n);
  const int64_t blocks = n / select_block;
  auto select_max = torch::empty({rows, blocks}, logits.options());
  auto row_max = torch::empty({rows}, logits.options());
  auto sums = torch::empty({rows, 2}, logits.options());
  auto values = torch::empty({rows, k}, logits.options());
  auto positions = torch::empty({rows, k}, logits.options().dtype(torch::kLong));
  auto topk = torch::empty({rows, 3}, logits.options());
  auto topk_last = torch::empty({rows}, logits.options().dtype(torch::kLong));
  const float* z = logits.data_ptr<float>();
  float* select_out = select_max.data_ptr<float>();
  float* max_out = row_max.data_ptr<float>();
  float* sums_out = sums.data_ptr<float>();
  float* values_out = values.data_ptr<float>();
  int64_t* positions_out = positions.data_ptr<int64_t>();
  float* topk_out = topk.data_ptr<float>();
  int64_t* topk_last_out = topk_last.data_ptr<int64_t>();
  const bool avx2 = use_avx2(simd);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    ntp_first_k::RowSearch<float> search(n, blocks, k);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = z + r * n;
      float m;
#ifdef NTP_HAVE_AVX2_PATH
      if (avx2) {
        m = select_maxima_avx2(row, n, select_block, select_out + r * blocks);
      } else
#endif
        m = select_maxima_plain(row, n, select_block, select_out + r * blocks);
      max_out[r] = m;
      double s, t;
      exp_sums(row, n, m, avx2, &s, &t);
      sums_out[2 * r] = static_cast<float>(s);
      sums_out[2 * r + 1] = static_cast<float>(t);
      float* terms = topk_out + 3 * r;
      if (k > 0) {  // the row is still in cache
        search.by_block_max(row, select_out + r * blocks, select_block, values_out + r * k,
                            positions_out + r * k);
        topk_terms(values_out + r * k, positions_out + r * k, k, m, avx2, terms,
                   topk_last_out + r);
      } else {
        terms[0] = kInf;
        terms[1] = terms[2] = 0;
        topk_last_out[r] = -1;
      }
    }
  });
  return {select_max, row_max, sums, values, positions, topk, topk_last};
}

void gradient(torch::Tensor logits, torch::Tensor log_normalizer, torch::Tensor coef,
              torch::Tensor out, torch::Tensor candidate_columns, torch::Tensor candidate_values,
              torch::Tensor candidate_coefs, torch::Tensor target_column,
              torch::Tensor target_value, bool simd) {
  check_logits(logits, "gradient");
  check_logits(out, "gradient (out)");
  TORCH_CHECK(out.sizes() == logits.sizes(), "gradient: out must have the logits' shape");
  const int64_t rows = logits.size(0), n = logits.size(1);
  check_per_row(log_normalizer, rows, "log_normalizer");
  check_per_row(coef, rows, "coef");
  check_per_row(target_value, rows, "target_value");
  TORCH_CHECK(target_column.scalar_type() == torch::kLong && target_column.dim() == 1 &&
                  target_column.size(0) == rows && target_column.is_contiguous(),
              "gradient: target_column must be a contiguous int64 [N] tensor, N = ", rows);
  const int64_t c = candidate_columns.size(-1);
  TORCH_CHECK(candidate_columns.scalar_type() == torch::kLong && candidate_columns.dim() == 2 &&
                  candidate_columns.size(0) == rows && candidate_values.sizes() ==
                  candidate_columns.sizes() && candidate_coefs.sizes() == candidate_columns.sizes(),
              "gradient: candidate columns (int64), values and coefs must be [N, c], N = ", rows);
  TORCH_CHECK(candidate_values.scalar_type() == torch::kFloat32 &&
                  candidate_coefs.scalar_type() == torch::kFloat32,
              "gradient: candidate values and coefs must be float32");
  const float* z = logits.data_ptr<float>();
  const float* lz = log_normalizer.data_ptr<float>();
  const float* row_coef = coef.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // the candidates' tensors may be strided views (coefs e.g. expanded from [N, 1])
  const int64_t* columns = candidate_columns.data_ptr<int64_t>();
  const float* values = candidate_values.data_ptr<float>();
  const float* coefs = candidate_coefs.data_ptr<float>();
  const int64_t column_stride[2] = {candidate_columns.stride(0), candidate_columns.stride(1)};
  const int64_t value_stride[2] = {candidate_values.stride(0), candidate_values.stride(1)};
  const int64_t coef_stride[2] = {candidate_coefs.stride(0), candidate_coefs.stride(1)};
  const int64_t* target_columns = target_column.data_ptr<int64_t>();
  const float* target_values = target_value.data_ptr<float>();
  const bool avx2 = use_avx2(simd);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row_out = o + r * n;
#ifdef NTP_HAVE_AVX2_PATH
      if (avx2) {
        gradient_avx2(z + r * n, n, lz[r], row_coef[r], row_out);
      } else
#endif
        gradient_plain(z + r * n, n, lz[r], row_coef[r], row_out);
      for (int64_t j = 0; j < c; ++j) {
        const int64_t column = columns[r * column_stride[0] + j * column_stride[1]];
        TORCH_CHECK(column >= 0 && column < n, "gradient: candidate column ", column,
                    " outside [0, ", n, ")");
        const float value = values[r * value_stride[0] + j * value_stride[1]];
        row_out[column] = exp_plain(clamp_exp_arg(value - lz[r])) *
                          coefs[r * coef_stride[0] + j * coef_stride[1]];
      }
      const int64_t column = target_columns[r];
      TORCH_CHECK(column < n, "gradient: target column ", column, " outside [-1, ", n, ")");
      if (column >= 0) row_out[column] = target_values[r];
    }
  });
}
