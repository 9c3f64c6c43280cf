// first_k(values [N, C], k) -> (values [N, k], positions [N, k] ascending, ok [N] bool)
//
// Per row, the first k entries under the total order (value descending, position ascending):
// the same set K as megatron_ntp/loss/topk.py's torch path, without sorting or a partial sort
// of the row (torch.topk on CPU costs ~16 ns per entry; this scan ~1.5 ns):
//   1. a lower bound thr of the k-th largest value: the k-th largest of the maxima of nb >= k
//      disjoint strided blocks {b, b + nb, b + 2 nb, ...} (k of those maxima are entries, so at
//      least k entries are >= thr); one vectorised pass;
//   2. one scan that appends (branch-free) every entry >= thr to a buffer, skipping blocks of 16
//      entries that are all below thr; if ties make the buffer fill up, the best k are kept and
//      later entries must then beat the k-th strictly (an equal later entry has a higher position);
//   3. nth_element on the buffer (~k + a few entries) and a sort of the k survivors by position.
// Rows with a NaN get ok = false (K is undefined). Rows run in parallel (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // entries per skip test in the scan

template <typename T>
struct Entry {
  T value;
  int64_t pos;
};

template <typename T>
inline bool better(const Entry<T>& a, const Entry<T>& b) {
  return a.value > b.value || (a.value == b.value && a.pos < b.pos);
}

template <typename T>
inline bool by_position(const Entry<T>& a, const Entry<T>& b) {
  return a.pos < b.pos;
}

// Number of strided blocks for the bound: >= k; ~2.5 k measured fastest (fewer blocks give a
// looser bound and more appended entries, more blocks a slower selection among their maxima).
int64_t num_blocks(int64_t c, int64_t k) {
  return std::max<int64_t>(k, std::min<int64_t>(c, std::max<int64_t>(64, 5 * k / 2)));
}

template <typename T>
T lower_bound_of_kth(const T* x, int64_t c, int64_t k, T* maxima, int64_t nb) {
  std::fill(maxima, maxima + nb, -std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + nb <= c; j += nb)
    for (int64_t i = 0; i < nb; ++i) maxima[i] = std::max(maxima[i], x[j + i]);
  for (int64_t i = 0; j + i < c; ++i) maxima[i] = std::max(maxima[i], x[j + i]);
  std::nth_element(maxima, maxima + (k - 1), maxima + nb, std::greater<T>());
  return maxima[k - 1];
}

// buf: capacity 4k + kBlock; maxima: nb entries.
template <typename T>
bool row_first_k(const T* x, int64_t c, int64_t k, Entry<T>* buf, T* maxima, int64_t nb,
                 T* out_values, int64_t* out_positions) {
  const int64_t cap = 4 * k;
  T thr = c <= cap ? -std::numeric_limits<T>::infinity() : lower_bound_of_kth(x, c, k, maxima, nb);
  bool inclusive = true;  // entries equal to thr may belong to K (until the first compaction)
  bool nan = false;
  int64_t n = 0;
  auto keep_best_k = [&]() {
    std::nth_element(buf, buf + (k - 1), buf + n, better<T>);
    n = k;
    thr = buf[k - 1].value;
    inclusive = false;
  };
  auto append = [&](int64_t j) {
    const T v = x[j];
    nan |= v != v;
    buf[n] = {v, j};
    n += (v > thr) | (inclusive & (v == thr));
  };
  int64_t j = 0;
  for (; j + kBlock <= c; j += kBlock) {
    bool hit = false;
    for (int64_t i = 0; i < kBlock; ++i) hit |= !(x[j + i] < thr);  // >= thr, or NaN
    if (!hit) continue;
    for (int64_t i = 0; i < kBlock; ++i) append(j + i);
    if (n >= cap) keep_best_k();
  }
  for (; j < c; ++j) append(j);
  if (nan || n < k) return false;  // n >= k always holds without NaN
  if (n > k) std::nth_element(buf, buf + (k - 1), buf + n, better<T>);
  std::sort(buf, buf + k, by_position<T>);
  for (int64_t i = 0; i < k; ++i) {
    out_values[i] = buf[i].value;
    out_positions[i] = buf[i].pos;
  }
  return true;
}

// The outputs of both entry points for n rows: values [n, k], positions [n, k], ok [n].
std::vector<torch::Tensor> empty_outputs(const torch::Tensor& values, int64_t n, int64_t k) {
  return {torch::empty({n, k}, values.options()),
          torch::empty({n, k}, values.options().dtype(torch::kLong)),
          torch::empty({n}, values.options().dtype(torch::kBool))};
}

}  // namespace

std::vector<torch::Tensor> first_k(torch::Tensor values, int64_t k) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "first_k: values must be a contiguous [N, C] CPU tensor");
  const int64_t n = values.size(0), c = values.size(1);
  TORCH_CHECK(k >= 1 && k <= c, "first_k: need 1 <= k <= C, got k=", k, ", C=", c);
  auto outputs = empty_outputs(values, n, k);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "first_k", [&] {
    const scalar_t* x = values.data_ptr<scalar_t>();
    scalar_t* ov = outputs[0].data_ptr<scalar_t>();
    int64_t* op = outputs[1].data_ptr<int64_t>();
    bool* row_ok = outputs[2].data_ptr<bool>();
    const int64_t nb = num_blocks(c, k);
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> buf(4 * k + kBlock);
      std::vector<scalar_t> maxima(nb);
      for (int64_t r = begin; r < end; ++r)
        row_ok[r] = row_first_k(x + r * c, c, k, buf.data(), maxima.data(), nb, ov + r * k, op + r * k);
    });
  });
  return outputs;
}

// first_k_in_blocks(values [N, C], blocks [N, nb] ascending, block, k): first_k over only the
// listed blocks of `block` consecutive entries of each row (their concatenation, which keeps
// position order); positions are those of the row. Each row's blocks are copied into a
// thread-local buffer (nb * block entries, cache-resident) and scanned there.
std::vector<torch::Tensor> first_k_in_blocks(torch::Tensor values, torch::Tensor blocks,
                                             int64_t block, int64_t k) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "first_k_in_blocks: values must be a contiguous [N, C] CPU tensor");
  TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == torch::kLong
              && blocks.size(0) == values.size(0),
              "first_k_in_blocks: blocks must be a contiguous int64 [N, nb] tensor");
  const int64_t n = values.size(0), c = values.size(1), nb = blocks.size(1);
  const int64_t width = nb * block;
  TORCH_CHECK(block >= 1 && c % block == 0, "first_k_in_blocks: block must divide C");
  TORCH_CHECK(k >= 1 && k <= width, "first_k_in_blocks: need 1 <= k <= nb * block");
  auto outputs = empty_outputs(values, n, k);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "first_k_in_blocks", [&] {
    const scalar_t* x = values.data_ptr<scalar_t>();
    const int64_t* bl = blocks.data_ptr<int64_t>();
    scalar_t* ov = outputs[0].data_ptr<scalar_t>();
    int64_t* op = outputs[1].data_ptr<int64_t>();
    bool* row_ok = outputs[2].data_ptr<bool>();
    const int64_t num = num_blocks(width, k);
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> buf(4 * k + kBlock);
      std::vector<scalar_t> maxima(num);
      std::vector<scalar_t> row(width);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t* row_blocks = bl + r * nb;
        bool valid = true;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t start = row_blocks[b] * block;
          valid &= start >= 0 && start + block <= c;
          if (valid) std::copy(x + r * c + start, x + r * c + start + block, row.data() + b * block);
        }
        row_ok[r] = valid && row_first_k(row.data(), width, k, buf.data(), maxima.data(), num,
                                         ov + r * k, op + r * k);
        if (!row_ok[r]) continue;
        for (int64_t i = 0; i < k; ++i) {  // buffer position -> row position
          const int64_t p = op[r * k + i];
          op[r * k + i] = row_blocks[p / block] * block + p % block;
        }
      }
    });
  });
  return outputs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("first_k", &first_k, "first k entries per row under (value desc, position asc)");
  m.def("first_k_in_blocks", &first_k_in_blocks,
        "first_k over the listed blocks of each row, positions in the row");
}
