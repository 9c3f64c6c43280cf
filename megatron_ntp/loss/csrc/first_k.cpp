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
#include <cstdint>
#include <cstring>
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

// Number of strided blocks for the bound: >= k; ~2.5 k measured fastest (fewer blocks give a
// looser bound and more appended entries, more blocks a slower selection among their maxima).
int64_t num_blocks(int64_t c, int64_t k) {
  return std::max<int64_t>(k, std::min<int64_t>(c, std::max<int64_t>(64, 5 * k / 2)));
}

// An unsigned integer that orders like the float (+0 and -0 equal).
inline uint32_t order_key(float v) {
  v += 0.0f;  // -0 -> +0
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float from_order_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The k-th largest of values[0, n) (1 <= k <= n, no NaN); values is overwritten.
// float: radix select on the order keys, one byte at a time from the top, keeping only the
// keys in the k-th's bin (std::nth_element costs ~12 ns per entry on 512 floats; this ~2).
inline float kth_largest_inplace(float* values, int64_t n, int64_t k) {
  uint32_t* keys = reinterpret_cast<uint32_t*>(values);
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(values[i]);
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t count[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & 0xFF];
    uint32_t bin = 255;
    while (k > count[bin]) k -= count[bin--];  // the k-th largest lies in `bin`
    prefix |= bin << shift;
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      keys[m] = keys[i];
      m += ((keys[i] >> shift) & 0xFF) == bin;
    }
    n = m;
  }
  return from_order_key(prefix);
}

// double (tests, gradcheck): nth_element.
inline double kth_largest_inplace(double* values, int64_t n, int64_t k) {
  std::nth_element(values, values + (k - 1), values + n, std::greater<double>());
  return values[k - 1];
}

template <typename T>
T lower_bound_of_kth(const T* x, int64_t c, int64_t k, T* maxima, int64_t nb) {
  std::fill(maxima, maxima + nb, -std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + nb <= c; j += nb)
    for (int64_t i = 0; i < nb; ++i) maxima[i] = std::max(maxima[i], x[j + i]);
  for (int64_t i = 0; j + i < c; ++i) maxima[i] = std::max(maxima[i], x[j + i]);
  return kth_largest_inplace(maxima, nb, k);
}

// Collects the entries >= thr of a row (thr a lower bound of its k-th value) and keeps the
// first k of them under (value desc, position asc). Runs of entries are appended branch-free in
// ascending position, and the buffer stays in position order (compaction filters it in place),
// so the result needs no sort. buf has room for 4k + the longest run; scratch for 4k + that
// run's values. If ties fill the buffer, the best k are kept and later entries must then beat
// the k-th strictly (an equal later entry has a higher position).
template <typename T>
class Selector {
 public:
  Selector(Entry<T>* buf, T* scratch, int64_t k, T thr)
      : buf_(buf), scratch_(scratch), k_(k), thr_(thr) {}

  T threshold() const { return thr_; }

  // Appends x[begin:end) (positions begin..end-1) where >= thr; then compacts if full.
  void append_run(const T* x, int64_t begin, int64_t end) {
    // locals: the stores into buf_ could otherwise alias the members (an int64 position)
    Entry<T>* buf = buf_;
    const T thr = thr_;
    const bool inclusive = inclusive_;
    int64_t n = n_;
    bool nan = false;
    for (int64_t j = begin; j < end; ++j) {
      const T v = x[j];
      nan |= v != v;
      buf[n] = {v, j};
      n += (v > thr) | (inclusive & (v == thr));
    }
    n_ = n;
    nan_ |= nan;
    if (n_ >= 4 * k_) keep_first_k();
  }

  // Writes the k entries by ascending position; false for a row with NaN (K undefined).
  bool finish(T* out_values, int64_t* out_positions) {
    if (nan_ || n_ < k_) return false;  // n >= k always holds without NaN
    if (n_ > k_) keep_first_k();
    for (int64_t i = 0; i < k_; ++i) {
      out_values[i] = buf_[i].value;
      out_positions[i] = buf_[i].pos;
    }
    return true;
  }

 private:
  // Keeps the first k entries, in position order: the k-th value kth (selected on a copy of the
  // values), then every entry > kth and the first (k - #greater) entries == kth. A NaN in the
  // buffer makes kth meaningless, but the row is refused by finish anyway.
  void keep_first_k() {
    for (int64_t i = 0; i < n_; ++i) scratch_[i] = buf_[i].value;
    const T kth = kth_largest_inplace(scratch_, n_, k_);
    int64_t ties = k_;  // entries == kth to keep: k minus the entries > kth
    for (int64_t i = 0; i < n_; ++i) ties -= buf_[i].value > kth;
    int64_t m = 0;
    for (int64_t i = 0; i < n_; ++i) {
      const T v = buf_[i].value;
      const bool tie = v == kth;
      const bool keep = (v > kth) | (tie & (ties > 0));
      ties -= tie & keep;
      buf_[m] = buf_[i];
      m += keep;
    }
    n_ = m;
    thr_ = kth;
    inclusive_ = false;
  }

  Entry<T>* buf_;
  T* scratch_;
  int64_t k_;
  T thr_;
  bool inclusive_ = true;  // entries equal to thr may belong to K (until the first compaction)
  bool nan_ = false;
  int64_t n_ = 0;
};

// first_k of one row. buf, scratch: capacity 4k + kBlock; maxima: nb entries.
template <typename T>
bool row_first_k(const T* x, int64_t c, int64_t k, Entry<T>* buf, T* scratch, T* maxima,
                 int64_t nb, T* out_values, int64_t* out_positions) {
  const T thr = c <= 4 * k ? -std::numeric_limits<T>::infinity()
                           : lower_bound_of_kth(x, c, k, maxima, nb);
  Selector<T> select(buf, scratch, k, thr);
  int64_t j = 0;
  for (; j + kBlock <= c; j += kBlock) {
    const T t = select.threshold();
    bool hit = false;
    for (int64_t i = 0; i < kBlock; ++i) hit |= !(x[j + i] < t);  // >= thr, or NaN
    if (hit) select.append_run(x, j, j + kBlock);
  }
  select.append_run(x, j, c);
  return select.finish(out_values, out_positions);
}

// The outputs of the entry points for n rows: values [n, k], positions [n, k], ok [n].
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
      std::vector<scalar_t> scratch(4 * k + kBlock);
      std::vector<scalar_t> maxima(nb);
      for (int64_t r = begin; r < end; ++r)
        row_ok[r] = row_first_k(x + r * c, c, k, buf.data(), scratch.data(), maxima.data(), nb,
                                ov + r * k, op + r * k);
    });
  });
  return outputs;
}

// first_k_by_block_max(values [N, C], block_max [N, nb], block, k): first_k, with the
// lower bound of the k-th value taken from the given maxima of the row's nb = C / block blocks
// of `block` consecutive entries (stage 1 of the shaped loss computes them anyway): thr = the
// k-th largest block max (k of the maxima are entries, so at least k entries are >= thr), and
// only the blocks whose max is >= thr are scanned: about k * block entries, not the row. With
// k >= nb the maxima bound nothing and the row is scanned as by first_k.
std::vector<torch::Tensor> first_k_by_block_max(torch::Tensor values, torch::Tensor block_max,
                                                int64_t block, int64_t k) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "first_k_by_block_max: values must be a contiguous [N, C] CPU tensor");
  const int64_t n = values.size(0), c = values.size(1);
  TORCH_CHECK(block >= 1 && c % block == 0, "first_k_by_block_max: block must divide C");
  const int64_t nb = c / block;
  TORCH_CHECK(block_max.dim() == 2 && block_max.is_contiguous() && block_max.size(0) == n
              && block_max.size(1) == nb && block_max.scalar_type() == values.scalar_type(),
              "first_k_by_block_max: block_max must be a contiguous [N, C / block] tensor of "
              "the values' dtype");
  TORCH_CHECK(k >= 1 && k <= c, "first_k_by_block_max: need 1 <= k <= C, got k=", k, ", C=", c);
  auto outputs = empty_outputs(values, n, k);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "first_k_by_block_max", [&] {
    const scalar_t* x = values.data_ptr<scalar_t>();
    const scalar_t* bm = block_max.data_ptr<scalar_t>();
    scalar_t* ov = outputs[0].data_ptr<scalar_t>();
    int64_t* op = outputs[1].data_ptr<int64_t>();
    bool* row_ok = outputs[2].data_ptr<bool>();
    const int64_t strided = num_blocks(c, k);
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      std::vector<Entry<scalar_t>> buf(4 * k + std::max(kBlock, block));
      std::vector<scalar_t> scratch(4 * k + std::max(kBlock, block));
      std::vector<scalar_t> maxima(std::max(nb, strided));
      std::vector<int64_t> picked(nb);
      constexpr int64_t kLineEntries = 64 / sizeof(scalar_t);      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = x + r * c;
        if (k >= nb) {
          row_ok[r] = row_first_k(row, c, k, buf.data(), scratch.data(), maxima.data(), strided,
                                  ov + r * k, op + r * k);
          continue;
        }
        const scalar_t* row_max = bm + r * nb;
        bool nan = false;
        for (int64_t b = 0; b < nb; ++b) nan |= row_max[b] != row_max[b];
        if (nan) {  // K is undefined; the caller refuses the row
          row_ok[r] = false;
          continue;
        }
        std::copy(row_max, row_max + nb, maxima.data());
        const scalar_t thr = kth_largest_inplace(maxima.data(), nb, k);
        // the blocks to scan (about k), prefetched all at once: they lie apart in a row that
        // is usually no longer in cache, and one cache miss after another would dominate
        int64_t num_picked = 0;
        for (int64_t b = 0; b < nb; ++b) {
          picked[num_picked] = b;
          num_picked += !(row_max[b] < thr);
        }
        for (int64_t i = 0; i < num_picked; ++i)
          for (int64_t j = 0; j < block; j += kLineEntries)
            __builtin_prefetch(row + picked[i] * block + j);
        Selector<scalar_t> select(buf.data(), scratch.data(), k, thr);
        for (int64_t i = 0; i < num_picked; ++i) {
          const int64_t b = picked[i];
          if (row_max[b] >= select.threshold())  // compaction may have raised it
            select.append_run(row, b * block, (b + 1) * block);
        }
        row_ok[r] = select.finish(ov + r * k, op + r * k);
      }
    });
  });
  return outputs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("first_k", &first_k, "first k entries per row under (value desc, position asc)");
  m.def("first_k_by_block_max", &first_k_by_block_max,
        "first_k scanning only the blocks whose given max reaches the k-th largest block max");
}
