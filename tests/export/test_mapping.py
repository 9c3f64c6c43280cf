"""The megatron-core -> Qwen3 tensor mapping on a labelled synthetic state dict, and the output
folder rules (no megatron-core, no model)."""

import json
import os

import pytest
import torch

from megatron_ntp.config import ConfigError, load_config
from megatron_ntp.export.hf import check_exportable, check_output_dir, hf_state_dict, publish

GROUPS, HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB, PADDED = 2, 4, 2, 3, 5, 10, 16


def _config(**model):
    fields = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  num_query_groups=GROUPS, kv_channels=HEAD_DIM, ffn_hidden_size=FFN,
                  vocab_size=VOCAB)
    fields.update(model)
    # a dataset prefix and no tokenizer model: the export has no tokenizer to copy
    return load_config(None, [f"model.{k}={v}" for k, v in fields.items()] + ["data.blend=x"])


def _state(moe_experts=0):
    per_group = HEADS // GROUPS
    qkv = torch.zeros(GROUPS, per_group + 2, HEAD_DIM, HIDDEN)
    for g in range(GROUPS):
        for j in range(per_group + 2):
            for d in range(HEAD_DIM):
                qkv[g, j, d] = 100 * g + 10 * j + d  # label: group, slot in the group, channel
    p = "decoder.layers.0."
    state = {
        "embedding.word_embeddings.weight": torch.arange(PADDED)[:, None].float().expand(
            PADDED, HIDDEN),
        p + "input_layernorm.weight": torch.full((HIDDEN,), 1.0),
        p + "self_attention.linear_qkv.weight": qkv.reshape(-1, HIDDEN),
        p + "self_attention.linear_qkv._extra_state": None,
        p + "self_attention.q_layernorm.weight": torch.full((HEAD_DIM,), 2.0),
        p + "self_attention.k_layernorm.weight": torch.full((HEAD_DIM,), 3.0),
        p + "self_attention.linear_proj.weight": torch.full((HIDDEN, HEADS * HEAD_DIM), 4.0),
        p + "pre_mlp_layernorm.weight": torch.full((HIDDEN,), 5.0),
        "decoder.final_layernorm.weight": torch.full((HIDDEN,), 6.0),
        "output_layer.weight": torch.arange(PADDED)[:, None].float().expand(PADDED, HIDDEN),
    }
    fc1 = torch.cat([torch.full((FFN, HIDDEN), 7.0), torch.full((FFN, HIDDEN), 8.0)])
    if moe_experts:
        state[p + "mlp.router.weight"] = torch.full((moe_experts, HIDDEN), 9.0)
        for e in range(moe_experts):
            state[f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1 + e
            state[f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"] = torch.full(
                (HIDDEN, FFN), 10.0 + e)
    else:
        state[p + "mlp.linear_fc1.weight"] = fc1
        state[p + "mlp.linear_fc2.weight"] = torch.full((HIDDEN, FFN), 10.0)
    return state


def test_fused_qkv_is_split_per_query_group():
    out = hf_state_dict(_state(), _config(), VOCAB)
    q = out["model.layers.0.self_attn.q_proj.weight"].view(HEADS, HEAD_DIM, HIDDEN)[..., 0]
    k = out["model.layers.0.self_attn.k_proj.weight"].view(GROUPS, HEAD_DIM, HIDDEN)[..., 0]
    v = out["model.layers.0.self_attn.v_proj.weight"].view(GROUPS, HEAD_DIM, HIDDEN)[..., 0]
    per_group = HEADS // GROUPS
    for head in range(HEADS):  # query head h belongs to group h // per_group (GQA's repeat_kv)
        g, j = divmod(head, per_group)
        assert q[head].tolist() == [100 * g + 10 * j + d for d in range(HEAD_DIM)]
    for g in range(GROUPS):
        assert k[g].tolist() == [100 * g + 10 * per_group + d for d in range(HEAD_DIM)]
        assert v[g].tolist() == [100 * g + 10 * (per_group + 1) + d for d in range(HEAD_DIM)]


def test_swiglu_norms_vocabulary_and_untied_head():
    out = hf_state_dict(_state(), _config(), VOCAB)
    layer = "model.layers.0."
    assert (out[layer + "mlp.gate_proj.weight"] == 7).all()
    assert (out[layer + "mlp.up_proj.weight"] == 8).all()
    assert (out[layer + "mlp.down_proj.weight"] == 10).all()
    assert (out[layer + "post_attention_layernorm.weight"] == 5).all()
    assert (out[layer + "self_attn.q_norm.weight"] == 2).all()
    assert (out[layer + "self_attn.k_norm.weight"] == 3).all()
    assert (out["model.norm.weight"] == 6).all()
    # padding rows 10..15 are cut; the kept rows are the first ones, in order
    assert out["model.embed_tokens.weight"][:, 0].tolist() == list(range(VOCAB))
    assert out["lm_head.weight"].shape == (VOCAB, HIDDEN)


def test_experts_router_and_tied_embeddings():
    state = _state(moe_experts=3)
    del state["output_layer.weight"]
    config = _config(num_experts=3, moe_ffn_hidden_size=FFN, moe_router_topk=2,
                     ffn_hidden_size=0, tie_embeddings=True)
    out = hf_state_dict(state, config, VOCAB)
    assert "lm_head.weight" not in out
    assert (out["model.layers.0.mlp.gate.weight"] == 9).all()
    for e in range(3):
        expert = f"model.layers.0.mlp.experts.{e}."
        assert (out[expert + "gate_proj.weight"] == 7 + e).all()
        assert (out[expert + "up_proj.weight"] == 8 + e).all()
        assert (out[expert + "down_proj.weight"] == 10 + e).all()


def test_unmapped_or_missing_tensors_are_errors():
    state = _state()
    state["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no Qwen3 equivalent.*linear_qkv.bias"):
        hf_state_dict(state, _config(), VOCAB)
    state = _state()
    del state["decoder.final_layernorm.weight"]
    with pytest.raises(KeyError, match="final_layernorm"):
        hf_state_dict(state, _config(), VOCAB)


def test_models_without_a_qwen3_equivalent_are_refused():
    with pytest.raises(ConfigError, match="qk_layernorm"):
        check_exportable(_config(qk_layernorm=False))


def test_output_folder_is_replaced_only_with_force(tmp_path):
    target = tmp_path / "hf"
    check_output_dir(str(target), force=False)  # absent: fine
    target.mkdir()
    check_output_dir(str(target), force=False)  # empty: fine
    (target / "old.txt").write_text("old")
    with pytest.raises(ConfigError, match="--force"):
        check_output_dir(str(target), force=False)
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text("{}")
    publish(str(new), str(target), force=True)
    assert os.listdir(target) == ["config.json"] and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # the old folder is gone


def test_folder_with_shards_padded_vocabulary_and_bf16_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_ntp.export.hf import ExportOptions, write_hf_folder

    config = _config()
    state = _state()
    target = tmp_path / "hf"
    options = ExportOptions(vocab="padded", dtype="bfloat16", max_shard_bytes=200)
    summary = write_hf_folder(str(target), state, config, padded_vocab=PADDED, options=options)
    assert summary["vocab"]["exported"] == PADDED and summary["shards"] > 1
    assert summary["tokenizer"]["written"] is False  # the config names no tokenizer
    with open(target / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) == summary["shards"] and shards <= set(os.listdir(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True,
                                                 dtype="auto")  # config.json: bfloat16
    assert model.dtype == torch.bfloat16
    loaded = model.state_dict()
    for name, tensor in hf_state_dict(state, config, PADDED).items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name
    assert not any(name.startswith(".hf") for name in os.listdir(tmp_path))  # no temporaries


def test_tokenizer_of_the_built_in_sample(sample_data, monkeypatch):
    from megatron_ntp.export.tokenizer import resolve_tokenizer

    monkeypatch.setenv("MEGATRON_NTP_SAMPLE_DIR", os.path.dirname(sample_data[1]))
    source = resolve_tokenizer(load_config(None, []))  # data.blend unset: the sample's
    assert source.kind == "sentencepiece" and source.path == sample_data[1]
    assert source.vocab_size == 1000 and source.ids["eos"] == 3 and source.ids["pad"] == 0


def test_hugging_face_tokenizer_files_are_copied(tmp_path):
    import tokenizers

    from megatron_ntp.export.tokenizer import resolve_tokenizer, write_tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    config = load_config(None, ["data.tokenizer_type=HuggingFaceTokenizer",
                                f"data.tokenizer_model={folder}", "data.blend=x"])
    source = resolve_tokenizer(config)
    assert source.kind == "huggingface" and source.ids["eos"] == 1 and source.vocab_size == 4
    out = tmp_path / "out"
    out.mkdir()
    report = write_tokenizer(source, str(out))
    assert report["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
    written = json.loads((out / "tokenizer_config.json").read_text())
    # completed where the source is silent; no token_type_ids for a model that takes none
    assert written == {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
                       "model_input_names": ["input_ids", "attention_mask"]}


def test_hugging_face_tokenizer_without_or_with_a_broken_config(tmp_path):
    import tokenizers
    from transformers import AutoTokenizer

    from megatron_ntp.export.tokenizer import resolve_tokenizer, write_tokenizer

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "my-tokenizer.json"))  # a bare tokenizer.json, no config beside it
    config = load_config(None, ["data.tokenizer_type=HuggingFaceTokenizer",
                                f"data.tokenizer_model={tmp_path / 'my-tokenizer.json'}",
                                "data.blend=x"])
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(resolve_tokenizer(config), str(out))
    loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert loaded("hello world") == {"input_ids": [2, 3], "attention_mask": [1, 1]}
    assert loaded.eos_token == "<|endoftext|>" and len(loaded) == 4

    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    config = load_config(None, ["data.tokenizer_type=HuggingFaceTokenizer",
                                f"data.tokenizer_model={tmp_path / 'tok'}", "data.blend=x"])
    with pytest.raises(ConfigError, match="tok'.*tokenizer_config.json is not valid JSON"):
        resolve_tokenizer(config)
