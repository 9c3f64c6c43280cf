#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("first_k", &first_k, "first k entries per row under (value desc, position asc)");
  m.def("first_k_by_block_max", &first_k_by_block_max,
        "first_k scanning only the blocks whose given max reaches the k-th largest block max");
  m.def("shard_stage", &shard_stage,
        "per row: select-block maxima, max m, sum e^(z-m), sum e^(z-m)(z-m), the first k");
  m.def("gradient", &gradient,
        "out = exp(logits - log_normalizer) * coef, row-wise; then the candidates, the target");
}
