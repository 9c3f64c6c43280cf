"""Export to Hugging Face: the exported model's logits equal megatron-core's (float32, CPU).

The checkpoints are trained at TP = 2 (dense) and TP = 2 x EP = 2 (MoE) by tests/eval/
checkpoints.py, which also keeps the trained megatron-core model's logits on probe tokens; the
export runs as `megatron-ntp export` in its own process and transformers loads the folder
offline (local_files_only).
"""

import json
import os

import pytest
import torch

from tests.eval.checkpoints import PROBE, run_cli


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    folders = {}
    for name, case in trained.items():
        folders[name] = str(out / name)
        done = run_cli(["export", "--checkpoint", case["checkpoint"], "--output", folders[name]],
                       warnings=True)
        folders[f"{name} stderr"] = done.stderr
    return folders


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_export_prints_no_library_warnings(exported, name):
    # run with Python's warnings on: the checkpoint load's torch and megatron-core warnings are
    # filtered (megatron_ntp/console.py); the summary alone goes to stdout
    assert exported[f"{name} stderr"] == ""


def _hf_logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(PROBE).logits, model


@pytest.mark.parametrize("name, architecture", [("dense", "Qwen3ForCausalLM"),
                                                ("moe", "Qwen3MoeForCausalLM")])
def test_exported_logits_equal_megatron_core(trained, exported, name, architecture):
    folder = exported[name]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [architecture]
    assert config["vocab_size"] == 1000  # model.vocab_size: megatron-core's padding (1024) cut
    logits, model = _hf_logits(folder)
    want = trained[name]["logits"]  # [b, s, 1024] from the TP = 2 megatron-core model
    assert want.shape[-1] == 1024 and logits.shape == (*PROBE.shape, 1000)
    diff = (logits - want[..., :1000]).abs().max().item()
    assert diff < 1e-4, f"{name}: max |HF - megatron-core| = {diff}"
    if name == "moe":
        assert config["norm_topk_prob"] is True and config["num_experts"] == 4
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_folder_layout_and_tokenizer(trained, exported, sample_data):
    import sentencepiece
    from transformers import AutoTokenizer

    folder = exported["dense"]
    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "megatron_ntp_export.json"} <= files
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) <= files
    with open(os.path.join(folder, "megatron_ntp_export.json")) as f:
        summary = json.load(f)
    assert summary["source"]["step"] == 3
    assert summary["tokenizer"]["probe_texts_equal"], summary["tokenizer"]["first_mismatch"]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=sample_data[1])
    text = "Return the number of items in a container.\n    x = 12 + 7"
    assert tokenizer(text)["input_ids"] == sp.encode(text)
    assert tokenizer.eos_token_id == sp.eos_id()


def test_export_refuses_a_non_empty_output(trained, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    done = run_cli(["export", "--checkpoint", trained["dense"]["checkpoint"], "--output",
                    str(target)], check=False)
    assert done.returncode == 2 and "--force" in done.stderr
    assert os.listdir(target) == ["keep.txt"]


def _hf_tokenizer_with_a_chat_template(exported_folder, folder):
    """A Hugging Face tokenizer folder as a user brings one: the exported tokenizer.json, a
    tokenizer_config.json naming only its class and EOS token, and a chat_template.jinja."""
    import shutil

    os.makedirs(folder)
    shutil.copy(os.path.join(exported_folder, "tokenizer.json"), folder)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}, f)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")


def test_exported_folder_works_with_the_standard_transformers_calls(trained, exported,
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder = exported["dense"]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=torch.float32)
    text = "def count(items):\n    return"
    encoded = tokenizer(text, return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids
    greedy = {"max_new_tokens": 6, "do_sample": False}
    out = model.generate(**encoded, **greedy)
    assert torch.equal(out, model.generate(encoded["input_ids"], **greedy))

    generator = pipeline("text-generation", model=folder,
                         model_kwargs={"local_files_only": True, "dtype": torch.float32})
    result = generator(text, return_tensors=True, **greedy)
    assert result[0]["generated_token_ids"] == out[0].tolist()
    assert generator(text, **greedy)[0]["generated_text"].startswith(text)

    # a Hugging Face tokenizer with a chat template, exported through --tokenizer
    source = str(tmp_path / "chat_tokenizer")
    _hf_tokenizer_with_a_chat_template(folder, source)
    chat_folder = str(tmp_path / "hf_chat")
    run_cli(["export", "--checkpoint", trained["dense"]["checkpoint"], "--output", chat_folder,
             "--tokenizer", source])
    chat = AutoTokenizer.from_pretrained(chat_folder, local_files_only=True)
    messages = [{"role": "user", "content": "Add 2 and 3."}]
    rendered = chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "user: Add 2 and 3.\nassistant:"
    inputs = chat.apply_chat_template(messages, add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0].tolist() == tokenizer(rendered)["input_ids"]
    chat_model = AutoModelForCausalLM.from_pretrained(chat_folder, local_files_only=True,
                                                      dtype=torch.float32)
    reply = chat_model.generate(**inputs, **greedy)
    assert torch.equal(reply, model.generate(inputs["input_ids"], **greedy))
