// first_k(values [N, C], k) -> (values [N, k], positions [N, k] ascending, ok [N] bool)
//
// Per row, the first k entries under the total order (value descending, position ascending):
// the same set K as megatron_ntp/loss/topk.py's torch path, without sorting or a partial sort
// of the row (torch.topk on CPU costs ~16 ns per entry; this scan ~1 ns):
//   1. a lower bound thr of the k-th largest value: the k-th largest of the maxima of nb >= k
//      disjoint strided blocks {b, b + nb, b + 2 nb, ...} (k of those maxima are entries, so at
//      least k entries are >= thr); one vectorised pass and a radix select among the maxima;
//   2. one scan that tests 16 entries at a time against thr and appends only those that reach
//      it, in position order; if ties make the buffer fill up, the first k are kept and later
//      entries must then beat the k-th strictly (an equal later entry has a higher position);
//   3. the k-th of the buffer (~k + a few entries) by radix select, then a filter that keeps
//      the first k in position order (no sort).
// first_k_by_block_max does the same with the bound taken from given block maxima, scanning
// only the blocks that reach it. Rows with a NaN get ok = false (K is undefined), NaN values
// and positions 0..k-1. Rows run in parallel (at::parallel_for).
#include "kernels.h"
#include "first_k.h"

#include <ATen/Parallel.h>

#include <vector>

using namespace ntp_first_k;

namespace {

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
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      RowSearch<scalar_t> search(c, 0, k);
      for (int64_t r = begin; r < end; ++r)
        row_ok[r] = search.first_k(x + r * c, ov + r * k, op + r * k);
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
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      RowSearch<scalar_t> search(c, nb, k);
      if (!search.blocks_bound()) {  // the maxima bound nothing: first_k
        for (int64_t r = begin; r < end; ++r)
          row_ok[r] = search.first_k(x + r * c, ov + r * k, op + r * k);
        return;
      }
      // the next row's blocks are picked before this row is scanned and prefetched during
      // its scan, so their cache misses overlap this row's work (the rows come from memory)
      PickedBlocks<scalar_t>& current = search.picked;
      PickedBlocks<scalar_t> next(nb);
      scalar_t* maxima = search.maxima.data();
      current.pick(x + begin * c, bm + begin * nb, block, k, maxima);
      current.prefetch(x + begin * c, block, 0, current.count);
      for (int64_t r = begin; r < end; ++r) {
        const bool more = r + 1 < end;
        if (more) next.pick(x + (r + 1) * c, bm + (r + 1) * nb, block, k, maxima);
        row_ok[r] = current.select(x + r * c, bm + r * nb, block, k, search.buf.data(),
                                   search.scratch.data(), ov + r * k, op + r * k,
                                   more ? &next : nullptr, more ? x + (r + 1) * c : nullptr);
        std::swap(current, next);
      }
    });
  });
  return outputs;
}
