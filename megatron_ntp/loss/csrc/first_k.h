// The top-k scan's row-level algorithms (first_k.cpp has the algorithm and its entry points;
// passes.cpp runs the block search inside the CPU shard stage).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ntp_first_k {

constexpr int64_t kBlock = 16;  // entries per reach test in the scan
// The selector's buffer is compacted to the first k when it holds kCompactAt * k entries,
// which raises the threshold to their k-th value: a trained model's largest logits cluster in
// a few blocks of ids (frequent tokens), so the k-th largest block max bounds the k-th value
// loosely (~360 entries reach it at k = 100, V = 8192, against ~110 on noise), and an early
// compaction lets the blocks after it be skipped (measured: 2 ~18% faster than 4 there, alike
// on noise).
constexpr int64_t kCompactAt = 2;

// Bit i set where x[i] >= t or x[i] is NaN, i < kBlock.
template <typename T>
inline uint32_t reach_mask(const T* x, T t) {
  uint32_t mask = 0;
  for (int64_t i = 0; i < kBlock; ++i) mask |= uint32_t(!(x[i] < t)) << i;
  return mask;
}

#if defined(__SSE2__)
template <>
inline uint32_t reach_mask<float>(const float* x, float t) {
  const __m128 threshold = _mm_set1_ps(t);
  uint32_t mask = 0;
  for (int q = 0; q < 4; ++q)  // "not less than": true for NaN too
    mask |= uint32_t(_mm_movemask_ps(_mm_cmpnlt_ps(_mm_loadu_ps(x + 4 * q), threshold))) << (4 * q);
  return mask;
}
#endif

template <typename T>
struct Entry {
  T value;
  int64_t pos;
};

// Number of strided blocks for the bound: >= k; ~2.5 k measured fastest (fewer blocks give a
// looser bound and more appended entries, more blocks a slower selection among their maxima).
inline int64_t num_blocks(int64_t c, int64_t k) {
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
// float: radix select on the order keys with bins fitted to the keys left: each level spreads
// [lo, hi] over at most 256 bins (the bin width a power of two), finds the bin of the k-th
// largest by counting down from the top bin, and keeps only that bin's keys, until they are
// all equal. The span shrinks ~128-fold per level, so 2-3 levels on real logits; counting
// needs a 1 KiB histogram and at most 256 bins are walked per level (fixed 11-bit digits
// measured 1.7x slower on 512 floats, std::nth_element ~3x).
inline float kth_largest_inplace(float* values, int64_t n, int64_t k) {
  uint32_t* keys = reinterpret_cast<uint32_t*>(values);
  uint32_t lo = std::numeric_limits<uint32_t>::max(), hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = order_key(values[i]);
    lo = std::min(lo, keys[i]);
    hi = std::max(hi, keys[i]);
  }
  constexpr int kBinBits = 8;
  uint32_t count[1 << kBinBits];
  while (lo != hi) {
    const int shift = std::max(0, 32 - kBinBits - __builtin_clz(hi - lo));
    uint32_t bin = (hi - lo) >> shift;  // the top bin
    std::fill(count, count + bin + 1, 0u);
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] - lo) >> shift];
    while (k > count[bin]) k -= count[bin--];  // the k-th largest lies in `bin`
    int64_t m = 0;
    uint32_t bin_lo = std::numeric_limits<uint32_t>::max(), bin_hi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = keys[i];
      const bool in_bin = ((key - lo) >> shift) == bin;
      keys[m] = key;
      m += in_bin;
      bin_lo = std::min(bin_lo, in_bin ? key : std::numeric_limits<uint32_t>::max());
      bin_hi = std::max(bin_hi, in_bin ? key : 0u);
    }
    n = m;
    lo = bin_lo;
    hi = bin_hi;
  }
  return from_order_key(hi);
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

// A row without a first k (NaN): NaN values and positions 0..k-1 (valid, ascending).
template <typename T>
void fail_row(T* out_values, int64_t* out_positions, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    out_values[i] = std::numeric_limits<T>::quiet_NaN();
    out_positions[i] = i;
  }
}

// Collects the entries >= thr of a row (thr a lower bound of its k-th value) and keeps the
// first k of them under (value desc, position asc). Runs of entries are appended branch-free in
// ascending position, and the buffer stays in position order (compaction filters it in place),
// so the result needs no sort. buf and scratch have room for kCompactAt * k + kBlock entries.
// After a compaction (the buffer full, ties included) the best k are kept and later entries
// must beat the k-th strictly (an equal later entry has a higher position).
template <typename T>
class Selector {
 public:
  Selector(Entry<T>* buf, T* scratch, int64_t k, T thr)
      : buf_(buf), scratch_(scratch), k_(k), thr_(thr) {}

  T threshold() const { return thr_; }

  // Appends the entries of x[begin:end) (positions begin..end-1) that are >= thr: each group of
  // kBlock entries is tested at once and only its entries that reach thr are visited (about one
  // per group in the blocks a search visits); compacts when full.
  void scan(const T* x, int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + kBlock <= end; j += kBlock) {
      uint32_t mask = reach_mask(x + j, thr_);
      if (mask == 0) continue;
      // locals: the stores into buf_ could otherwise alias the members (an int64 position)
      Entry<T>* buf = buf_;
      const T thr = thr_;
      const bool inclusive = inclusive_;
      int64_t n = n_;
      bool nan = false;
      while (mask) {
        const int64_t i = j + __builtin_ctz(mask);
        mask &= mask - 1;
        const T v = x[i];
        nan |= v != v;
        buf[n] = {v, i};
        n += (v > thr) | (inclusive & (v == thr));
      }
      n_ = n;
      nan_ |= nan;
      if (n_ >= kCompactAt * k_) keep_first_k();
    }
    for (; j < end; ++j) {
      const T v = x[j];
      nan_ |= v != v;
      buf_[n_] = {v, j};
      n_ += (v > thr_) | (inclusive_ & (v == thr_));
    }
    if (n_ >= kCompactAt * k_) keep_first_k();
  }

  // Writes the k entries by ascending position; false for a row with NaN (K undefined), which
  // gets NaN values and positions 0..k-1.
  bool finish(T* out_values, int64_t* out_positions) {
    if (nan_ || n_ < k_) {  // n >= k always holds without NaN
      fail_row(out_values, out_positions, k_);
      return false;
    }
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

// first_k of one row. buf, scratch: capacity kCompactAt * k + kBlock; maxima: nb entries.
template <typename T>
bool row_first_k(const T* x, int64_t c, int64_t k, Entry<T>* buf, T* scratch, T* maxima,
                 int64_t nb, T* out_values, int64_t* out_positions) {
  const T thr = c <= 4 * k ? -std::numeric_limits<T>::infinity()
                           : lower_bound_of_kth(x, c, k, maxima, nb);
  Selector<T> select(buf, scratch, k, thr);
  select.scan(x, 0, c);
  return select.finish(out_values, out_positions);
}

// The blocks of one row that can hold its first k: those whose max reaches thr, the k-th
// largest block max (k of the maxima are entries, so at least k entries are >= thr; a block
// below thr holds none of them). About k blocks; they lie apart in a row that is usually no
// longer in cache, so they are prefetched while the row before is scanned. A block whose max
// is NaN is picked whatever thr is (NaN is never below it), so the scan meets the NaN and
// refuses the row.
template <typename T>
struct PickedBlocks {
  explicit PickedBlocks(int64_t nb) : blocks(nb) {}

  void pick(const T* row, const T* row_max, int64_t block, int64_t k, T* maxima) {
    const int64_t nb = static_cast<int64_t>(blocks.size());
    std::copy(row_max, row_max + nb, maxima);
    thr = kth_largest_inplace(maxima, nb, k);
    count = 0;
    for (int64_t b = 0; b < nb; ++b) {
      blocks[count] = b;
      count += !(row_max[b] < thr);
    }
  }

  // Prefetches picked blocks [begin, end) of `row`.
  void prefetch(const T* row, int64_t block, int64_t begin, int64_t end) const {
    constexpr int64_t kLineEntries = 64 / sizeof(T);
    for (int64_t i = begin; i < std::min(end, count); ++i)
      for (int64_t j = 0; j < block; j += kLineEntries) __builtin_prefetch(row + blocks[i] * block + j);
  }

  // first_k of the row from its picked blocks; meanwhile prefetches the blocks `next` picked
  // in next_row, one per block scanned (issued all at once they stall on the cache's queue of
  // outstanding misses).
  bool select(const T* row, const T* row_max, int64_t block, int64_t k, Entry<T>* buf,
              T* scratch, T* out_values, int64_t* out_positions, const PickedBlocks* next,
              const T* next_row) const {
    Selector<T> selector(buf, scratch, k, thr);
    for (int64_t i = 0; i < count; ++i) {
      if (next != nullptr) next->prefetch(next_row, block, i, i + 1);
      const int64_t b = blocks[i];
      if (!(row_max[b] < selector.threshold()))  // compaction may have raised it
        selector.scan(row, b * block, (b + 1) * block);
    }
    if (next != nullptr) next->prefetch(next_row, block, count, next->count);
    return selector.finish(out_values, out_positions);
  }

  std::vector<int64_t> blocks;
  int64_t count = 0;
  T thr = 0;
};

// The buffers of the row searches, kept across the rows of one thread, and the searches of one
// row: the whole row (first_k), or the blocks whose given max can hold its first k
// (first_k_by_block_max, passes.cpp's shard_stage). A row holding NaN gets NaN values and
// positions 0..k-1 (the return value false).
template <typename T>
struct RowSearch {
  // c entries per row, nb blocks of given maxima (0 for first_k), k >= 1
  RowSearch(int64_t c, int64_t nb, int64_t k)
      : c(c), k(k), strided(num_blocks(c, k)), buf(kCompactAt * k + kBlock),
        scratch(kCompactAt * k + kBlock), maxima(std::max(nb, strided)), picked(nb) {}

  bool first_k(const T* row, T* values, int64_t* positions) {
    return row_first_k(row, c, k, buf.data(), scratch.data(), maxima.data(), strided, values,
                       positions);
  }

  // Whether the given maxima bound anything: with k >= nb every block is picked (the row).
  bool blocks_bound() const { return k < static_cast<int64_t>(picked.blocks.size()); }

  // row_max [nb]: the max of each block of `block` entries (NaN where the block holds one).
  bool by_block_max(const T* row, const T* row_max, int64_t block, T* values,
                    int64_t* positions) {
    if (!blocks_bound()) return first_k(row, values, positions);
    picked.pick(row, row_max, block, k, maxima.data());
    return picked.select(row, row_max, block, k, buf.data(), scratch.data(), values, positions,
                         nullptr, nullptr);
  }

  int64_t c, k, strided;
  std::vector<Entry<T>> buf;
  std::vector<T> scratch;
  std::vector<T> maxima;
  PickedBlocks<T> picked;
};

}  // namespace ntp_first_k
