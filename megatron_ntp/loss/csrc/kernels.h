// The CPU kernels of the shaped loss, bound to Python in bindings.cpp
// (megatron_ntp/loss/cpu_kernels.py builds and loads them as one extension).
#pragma once

#include <torch/extension.h>

#include <vector>

// first_k.cpp: the top-k scan
std::vector<torch::Tensor> first_k(torch::Tensor values, int64_t k);
std::vector<torch::Tensor> first_k_by_block_max(torch::Tensor values, torch::Tensor block_max,
                                                int64_t block, int64_t k);

// passes.cpp: stage 1 (the exp-sums pass and the shard's top k) and the gradient pass
// (stage 4), float32 (simd = false: the plain loops, as on CPUs without AVX2 + FMA)
std::vector<torch::Tensor> shard_stage(torch::Tensor logits, int64_t select_block, int64_t k,
                                       bool simd);
void gradient(torch::Tensor logits, torch::Tensor log_normalizer, torch::Tensor coef,
              torch::Tensor out, torch::Tensor candidate_columns, torch::Tensor candidate_values,
              torch::Tensor candidate_coefs, torch::Tensor target_column,
              torch::Tensor target_value, bool simd);
