"""Export a checkpoint to a Hugging Face folder: Qwen3ForCausalLM or Qwen3MoeForCausalLM.

Route: the checkpoint (any TP/PP/EP layout) is loaded into a model of ONE rank (TP=PP=EP=1);
megatron-core's dist_checkpointing reshards on load, so the single-rank state dict holds every
weight whole, in megatron-core's TP=1 layout. That layout is then renamed and split into
Qwen3's, tensor by tensor (`hf_state_dict`):

  megatron-core (TP=1)                                   Hugging Face Qwen3 / Qwen3-MoE
  embedding.word_embeddings.weight [V_pad, h]            model.embed_tokens.weight [V, h]
  decoder.layers.i.input_layernorm.weight                model.layers.i.input_layernorm.weight
  decoder.layers.i.self_attention.linear_qkv.weight      self_attn.{q,k,v}_proj.weight
      [ng * (np/ng + 2) * d, h]: per query group g, its np/ng query heads, then its key head,
      then its value head (megatron-core's Attention.get_query_key_value_tensors)
  ...self_attention.q_layernorm / k_layernorm            self_attn.q_norm / k_norm  [d]
  ...self_attention.linear_proj.weight                   self_attn.o_proj.weight
  ...pre_mlp_layernorm.weight                            post_attention_layernorm.weight
  ...mlp.linear_fc1.weight [2f, h] = [gate; up]          mlp.gate_proj / mlp.up_proj
      (at TP > 1 each rank holds [gate_r; up_r]: the weight has partition stride 2, which
      dist_checkpointing undoes on load, so the TP=1 tensor is the plain concatenation)
  ...mlp.linear_fc2.weight                               mlp.down_proj.weight
  ...mlp.router.weight [E, h]                            mlp.gate.weight
  ...mlp.experts.local_experts.e.linear_fc{1,2}.weight   mlp.experts.e.{gate,up,down}_proj.weight
  decoder.final_layernorm.weight                         model.norm.weight
  output_layer.weight [V_pad, h]                         lm_head.weight [V, h] (absent if tied)

Transformer Engine layer names (fused norm + linear: linear_qkv.layer_norm_weight,
linear_fc1.layer_norm_weight; grouped experts: experts.linear_fc1.weight<e>) are accepted too.
Every tensor of the state dict must be consumed: an unknown one is an error, not a silent drop.

Router: megatron-core with the project's settings (score function softmax, no pre-softmax, no
scaling factor, no expert bias) takes the top-k logits and softmaxes over them; that equals
Qwen3-MoE's softmax over all experts, top-k, renormalised (norm_topk_prob=True). Other router
settings have no Qwen3-MoE equivalent and are refused (`check_exportable`).

Vocabulary: megatron-core pads the embedding to a multiple of 128 * TP (padding rows exist only
in the checkpoint; they are never a target). `vocab` chooses the exported rows:
  "model"     model.vocab_size rows (default; independent of the training layout, Qwen3's
              convention of a vocabulary at least as large as the tokenizer's),
  "tokenizer" the tokenizer's vocabulary,
  "padded"    every row (the softmax is then exactly megatron-core's).
Logits over the kept ids are unchanged; the softmax changes only by the (trained-down) mass of
the dropped rows.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from megatron_ntp.config import ConfigError, Config
from megatron_ntp.files import current_umask

TRANSFORMERS_VERSION = "4.57.6"
VOCAB_CHOICES = ("model", "tokenizer", "padded")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("_extra_state", "rotary_pos_emb.inv_freq")


@dataclass(frozen=True)
class ExportOptions:
    vocab: str = "model"
    """Exported vocabulary rows: model, tokenizer or padded (see the module docstring)."""
    dtype: str = "auto"
    """Weights' dtype: auto (bfloat16 for a bf16 run, else float32), float32, bfloat16, float16."""
    max_shard_bytes: int = 5 * 2**30
    """Largest safetensors shard."""
    force: bool = False
    """Replace a non-empty output folder."""
    tokenizer: str | None = None
    """Tokenizer model to copy instead of the run's (data.tokenizer_model)."""


def check_exportable(config: Config, mcore_config=None) -> None:
    """Raise ConfigError when the model has no Qwen3 / Qwen3-MoE equivalent."""
    m = config.model
    problems = []
    if not m.qk_layernorm:
        problems.append("model.qk_layernorm=false (Qwen3 always normalises queries and keys)")
    if m.is_moe and m.moe_router_topk < 2:
        problems.append(f"model.moe_router_topk={m.moe_router_topk} (megatron-core then needs "
                        f"pre-softmax routing, which Qwen3-MoE's norm_topk_prob cannot express "
                        f"together with top-k >= 2 checkpoints; not supported)")
    if mcore_config is not None and m.is_moe:
        c = mcore_config
        if c.moe_router_score_function != "softmax" or c.moe_router_pre_softmax or \
                c.moe_router_topk_scaling_factor or c.moe_router_enable_expert_bias or \
                c.moe_shared_expert_intermediate_size or c.moe_router_num_groups:
            problems.append(
                f"router settings score_function={c.moe_router_score_function!r}, "
                f"pre_softmax={c.moe_router_pre_softmax}, "
                f"topk_scaling_factor={c.moe_router_topk_scaling_factor}, expert_bias="
                f"{c.moe_router_enable_expert_bias}, shared_expert="
                f"{c.moe_shared_expert_intermediate_size}, groups={c.moe_router_num_groups} "
                f"(Qwen3-MoE routes softmax -> top-k -> renormalise, without shared experts)")
    if problems:
        raise ConfigError("cannot export to Qwen3: " + "; ".join(problems))


def export_dtype(config: Config, name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if config.model.bf16 else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} must be auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def exported_vocab_size(config: Config, padded: int, tokenizer_vocab: int | None,
                        choice: str) -> int:
    if choice not in VOCAB_CHOICES:
        raise ConfigError(f"--vocab {choice!r} must be one of {', '.join(VOCAB_CHOICES)}")
    if choice == "padded":
        return padded
    if choice == "model":
        return config.model.vocab_size
    if tokenizer_vocab is None:
        raise ConfigError("--vocab tokenizer needs the run's tokenizer (data.tokenizer_model or "
                          "--tokenizer)")
    return tokenizer_vocab


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def hf_config(config: Config, vocab_size: int, dtype: torch.dtype, special_ids: dict):
    """The transformers Qwen3Config / Qwen3MoeConfig of the model."""
    m = config.model
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        hidden_act="silu",
        max_position_embeddings=config.data.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,
        use_cache=True,
        tie_word_embeddings=m.tie_embeddings,
        rope_theta=float(m.rotary_base),
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        dtype=dtype,
    )
    if m.is_moe:
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common,
            architectures=["Qwen3MoeForCausalLM"],
            # every layer is an MoE layer in this project's models
            intermediate_size=m.ffn_hidden_size or m.moe_ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,  # megatron-core: softmax over the top-k logits
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    from transformers import Qwen3Config

    return Qwen3Config(**common, architectures=["Qwen3ForCausalLM"],
                       intermediate_size=m.ffn_hidden_size)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
class _Source:
    """The megatron-core state dict, tracking which tensors were used."""

    def __init__(self, state: dict):
        self.state = {k: v for k, v in state.items()
                      if torch.is_tensor(v) and not k.endswith(_IGNORED_SUFFIXES)}
        self.used: set[str] = set()

    def take(self, *names: str) -> torch.Tensor:
        for name in names:
            if name in self.state:
                self.used.add(name)
                return self.state[name]
        raise KeyError(f"checkpoint state has no {' or '.join(names)}")

    def check_all_used(self):
        left = sorted(set(self.state) - self.used)
        if left:
            raise ValueError(f"megatron-core tensors with no Qwen3 equivalent: {left[:8]}"
                             f"{' ...' if len(left) > 8 else ''}")


def _split_fc1(weight: torch.Tensor, width: int, name: str):
    if weight.shape[0] != 2 * width:
        raise ValueError(f"{name}: expected [2 * {width}, h] (SwiGLU gate and up), got "
                         f"{tuple(weight.shape)}")
    return weight[:width], weight[width:]


def hf_state_dict(state: dict, config: Config, vocab_size: int) -> dict:
    """Qwen3 / Qwen3-MoE tensors from a single-rank (TP=PP=EP=1) megatron-core state dict.

    state: GPTModel.state_dict() of one rank holding the whole model (layer numbers 0..L-1,
    experts 0..E-1). vocab_size: rows of the embedding and output layer to keep.
    """
    m = config.model
    src = _Source(state)
    groups, heads, head_dim, hidden = (m.num_query_groups, m.num_attention_heads, m.kv_channels,
                                       m.hidden_size)
    per_group = heads // groups
    out = {}

    def rows(tensor, name):
        if tensor.shape[0] < vocab_size:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, fewer than the exported "
                             f"vocabulary of {vocab_size}")
        return tensor[:vocab_size]

    out["model.embed_tokens.weight"] = rows(src.take("embedding.word_embeddings.weight"),
                                            "embedding.word_embeddings.weight")
    for i in range(m.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = p + "self_attention."
        out[q + "input_layernorm.weight"] = src.take(
            p + "input_layernorm.weight", attn + "linear_qkv.layer_norm_weight")
        qkv = src.take(attn + "linear_qkv.weight")
        want = (groups * (per_group + 2) * head_dim, hidden)
        if tuple(qkv.shape) != want:
            raise ValueError(f"{attn}linear_qkv.weight: expected {want} (groups * (heads per "
                             f"group + 2) * head_dim, hidden), got {tuple(qkv.shape)}")
        qkv = qkv.view(groups, per_group + 2, head_dim, hidden)
        out[q + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(heads * head_dim, hidden)
        out[q + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(groups * head_dim, hidden)
        out[q + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(groups * head_dim,
                                                                           hidden)
        out[q + "self_attn.q_norm.weight"] = src.take(attn + "q_layernorm.weight")
        out[q + "self_attn.k_norm.weight"] = src.take(attn + "k_layernorm.weight")
        out[q + "self_attn.o_proj.weight"] = src.take(attn + "linear_proj.weight")
        mlp = p + "mlp."
        out[q + "post_attention_layernorm.weight"] = src.take(
            p + "pre_mlp_layernorm.weight", mlp + "linear_fc1.layer_norm_weight")
        if m.is_moe:
            out[q + "mlp.gate.weight"] = src.take(mlp + "router.weight")
            for e in range(m.num_experts):
                fc1 = src.take(f"{mlp}experts.local_experts.{e}.linear_fc1.weight",
                               f"{mlp}experts.linear_fc1.weight{e}")
                fc2 = src.take(f"{mlp}experts.local_experts.{e}.linear_fc2.weight",
                               f"{mlp}experts.linear_fc2.weight{e}")
                gate, up = _split_fc1(fc1, m.moe_ffn_hidden_size, f"{mlp}experts[{e}].linear_fc1")
                expert = f"{q}mlp.experts.{e}."
                out[expert + "gate_proj.weight"], out[expert + "up_proj.weight"] = gate, up
                out[expert + "down_proj.weight"] = fc2
        else:
            gate, up = _split_fc1(src.take(mlp + "linear_fc1.weight"), m.ffn_hidden_size,
                                  mlp + "linear_fc1.weight")
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
            out[q + "mlp.down_proj.weight"] = src.take(mlp + "linear_fc2.weight")
    out["model.norm.weight"] = src.take("decoder.final_layernorm.weight")
    if not m.tie_embeddings:
        out["lm_head.weight"] = rows(src.take("output_layer.weight"), "output_layer.weight")
    src.check_all_used()
    return out


def write_safetensors(tensors: dict, folder: str, dtype: torch.dtype,
                      max_shard_bytes: int) -> dict:
    """model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json; the index."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        # on the CPU, in its own storage (no views shared between tensors)
        tensor = tensor.detach().to("cpu", dtype).contiguous().clone()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


# ---------------------------------------------------------------------------------------------
# Output folder: written beside the target, renamed into place at the end
# ---------------------------------------------------------------------------------------------
def check_output_dir(output_dir: str, force: bool) -> None:
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise ConfigError(f"--output {output_dir!r} exists and is not a directory")
        if os.listdir(output_dir) and not force:
            raise ConfigError(f"--output {output_dir!r} is not empty; pass --force to replace it")


def _umask_modes(folder: str) -> None:
    """Folder and file modes as a plain mkdir/open would give them (mkdtemp makes 0700)."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def publish(tmp_dir: str, output_dir: str, force: bool) -> None:
    """Move the finished tmp_dir to output_dir (replacing an old one only with force)."""
    check_output_dir(output_dir, force)
    _umask_modes(tmp_dir)
    old = None
    if os.path.exists(output_dir):
        old = output_dir.rstrip("/") + f".old-{os.getpid()}"
        os.rename(output_dir, old)
    os.rename(tmp_dir, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_hf_folder(output_dir: str, state: dict, config: Config, *, padded_vocab: int,
                    options: ExportOptions = ExportOptions(), mcore_config=None,
                    source: dict | None = None) -> dict:
    """Write the Hugging Face folder for a single-rank megatron-core state dict; its summary.

    source: provenance recorded in megatron_ntp_export.json (checkpoint folder, step).
    """
    from megatron_ntp.export.tokenizer import resolve_tokenizer, write_tokenizer

    check_exportable(config, mcore_config)
    check_output_dir(output_dir, options.force)
    dtype = export_dtype(config, options.dtype)
    tokenizer = resolve_tokenizer(config, options.tokenizer)
    vocab_size = exported_vocab_size(config, padded_vocab,
                                     tokenizer.vocab_size if tokenizer else None, options.vocab)
    if tokenizer and tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but --vocab "
                          f"{options.vocab} exports {vocab_size} rows")
    tensors = hf_state_dict(state, config, vocab_size)

    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir.rstrip('/'))}.tmp-",
                               dir=parent)
    try:
        special = tokenizer.special_ids() if tokenizer else {}
        hf_cfg = hf_config(config, vocab_size, dtype, special)
        hf_cfg.save_pretrained(tmp_dir)
        _write_generation_config(tmp_dir, special)
        index = write_safetensors(tensors, tmp_dir, dtype, options.max_shard_bytes)
        tokenizer_report = write_tokenizer(tokenizer, tmp_dir) if tokenizer else {
            "written": False, "note": "no tokenizer: the run names none and --tokenizer is unset"}
        summary = {
            "source": source or {},
            "architecture": hf_cfg.architectures[0],
            "dtype": str(dtype).replace("torch.", ""),
            "vocab": {"choice": options.vocab, "exported": vocab_size, "padded": padded_vocab,
                      "model": config.model.vocab_size,
                      "tokenizer": tokenizer.vocab_size if tokenizer else None},
            "parameters": sum(t.numel() for t in tensors.values()),
            "shards": len(set(index["weight_map"].values())),
            "tokenizer": tokenizer_report,
            "transformers_version": TRANSFORMERS_VERSION,
        }
        with open(os.path.join(tmp_dir, "megatron_ntp_export.json"), "w") as f:
            json.dump(summary, f, indent=2)
        publish(tmp_dir, output_dir, options.force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return summary


def _write_generation_config(folder: str, special: dict) -> None:
    config = {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
              "pad_token_id": special.get("pad"), "transformers_version": TRANSFORMERS_VERSION}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2)


# ---------------------------------------------------------------------------------------------
# The program: checkpoint -> single-rank model -> folder
# ---------------------------------------------------------------------------------------------
def load_single_rank_state(checkpoint_dir: str, config: Config | None = None):
    """(config, single-rank state dict, step, mcore_config, padded vocab) of a checkpoint.

    Call inside a one-rank process group (export_checkpoint starts one).
    """
    from megatron_ntp.eval.loading import (
        build_inference_model,
        read_config,
        single_rank_config,
        trained_padded_vocab,
    )

    trained = config or read_config(checkpoint_dir)
    padded = trained_padded_vocab(trained)
    single = single_rank_config(trained)
    chunks, step = build_inference_model(single, checkpoint_dir)
    (model,) = chunks
    return trained, model.state_dict(), step, model.config, padded


def export_checkpoint(checkpoint_dir: str, output_dir: str,
                      options: ExportOptions = ExportOptions()) -> dict:
    """Convert a checkpoint of any layout into a Hugging Face folder (one process)."""
    import contextlib

    import torch.distributed as dist

    from megatron_ntp.eval.loading import read_config, single_rank_config
    from megatron_ntp.session import parallel_session

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("export runs as one process (it loads the checkpoint resharded to one "
                          "rank); launch it without torchrun")
    check_output_dir(output_dir, options.force)
    trained = read_config(checkpoint_dir)
    check_exportable(trained)
    # A caller that has its process groups already (tests, a notebook) keeps them.
    session = (contextlib.nullcontext() if dist.is_initialized()
               else parallel_session(single_rank_config(trained)))
    with session:
        config, state, step, mcore_config, padded = load_single_rank_state(checkpoint_dir,
                                                                           trained)
        return write_hf_folder(output_dir, state, config, padded_vocab=padded, options=options,
                               mcore_config=mcore_config,
                               source={"checkpoint": os.path.abspath(checkpoint_dir),
                                       "step": step})
