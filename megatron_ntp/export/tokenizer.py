"""Tokenizer files for an exported Hugging Face folder.

- A Hugging Face tokenizer (data.tokenizer_type=HuggingFaceTokenizer): its folder's files are
  copied (tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json,
  merges.txt, added_tokens.json, chat_template.jinja, where present); tokenizer_config.json is
  completed where it is silent (tokenizer class, special tokens) and gets MODEL_INPUT_NAMES,
  its chat template kept.
- A sentencepiece model: transformers cannot load a bare .model file through AutoTokenizer, so
  the export writes
    tokenizer.model        the sentencepiece model itself (for sentencepiece users),
    tokenizer.json         the same tokenizer in the `tokenizers` format, converted by
                           transformers' sentencepiece converter (normaliser from the model's
                           precompiled character map, BPE with byte fallback),
    tokenizer_config.json  PreTrainedTokenizerFast, the special tokens, MODEL_INPUT_NAMES, no
                           BOS added (the training data has none: preprocessing appends only
                           the EOD token),
  and then checks the conversion: PROBE_TEXTS are encoded by sentencepiece and by the written
  tokenizer.json, and the result (equal or the first difference) goes into the export summary.
"""

import json
import os
import shutil
from dataclasses import dataclass

from megatron_ntp.config import ConfigError

PROBE_TEXTS = (
    "Hello world",
    "  leading spaces and trailing  ",
    "def f(x):\n    return x * 2  # doubled\n",
    "12+7=19, 3.50 and 7/2; 1,234,567.",
    "Unicode: naïve café, Straße, 東京, emoji \U0001F600, tab\tend",
    "line one\n\nline three\r\nwindows",
    "The quick brown fox jumps over the lazy dog.",
)
# What the tokenizer returns for the model. Qwen3 models take no token_type_ids, which
# PreTrainedTokenizerFast returns by default: `model.generate(**tok(text, return_tensors="pt"))`
# would raise "model_kwargs are not used by the model: ['token_type_ids']".
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
             "merges.txt", "added_tokens.json", "chat_template.jinja")


@dataclass(frozen=True)
class TokenizerSource:
    kind: str  # "sentencepiece" or "huggingface"
    path: str  # .model file, or the folder/file of tokenizer.json
    vocab_size: int
    ids: dict  # bos/eos/pad/unk id (None where absent)
    tokens: dict  # bos/eos/pad/unk piece (None where absent)

    def special_ids(self) -> dict:
        return {k: v for k, v in self.ids.items() if v is not None}


def resolve_tokenizer(config, override: str | None = None) -> TokenizerSource | None:
    """The run's tokenizer (or `override`), or None when the run names none.

    A run on the built-in sample (data.blend unset) used the sample's tokenizer; it is looked up
    where training put it (megatron_ntp.training.data.sample_data_dir).
    """
    data = config.data
    kind_name, path = data.tokenizer_type, override or data.tokenizer_model
    if path is None and data.blend is None:
        from megatron_ntp.training.data import SAMPLE_READY, sample_data_dir

        folder = sample_data_dir(config)
        candidates = sorted(f for f in os.listdir(folder) if f.endswith(".model")) \
            if os.path.isfile(os.path.join(folder, SAMPLE_READY)) else []
        if not candidates:
            return None
        path, kind_name = os.path.join(folder, candidates[0]), "SentencePieceTokenizer"
    if path is None:
        return None
    from megatron_ntp.data.tokenizer_types import canonical_tokenizer_type

    if override:  # the file tells its kind
        kind = "sentencepiece" if override.endswith(".model") else "huggingface"
    else:
        kind = canonical_tokenizer_type(kind_name)
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer {path!r} does not exist (data.tokenizer_model or "
                          f"--tokenizer)")
    if kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
        ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
        tokens = {k: (sp.id_to_piece(v) if v is not None else None) for k, v in ids.items()}
        return TokenizerSource("sentencepiece", path, sp.get_piece_size(), ids, tokens)
    from megatron_ntp.data.tokenizer import TokenizerJsonLibrary

    try:
        lib = TokenizerJsonLibrary(path)
    except json.JSONDecodeError as err:  # the tokenizer_config.json beside tokenizer.json
        raise ConfigError(f"tokenizer {path!r}: its tokenizer_config.json is not valid JSON "
                          f"({err})") from None
    ids = {"bos": lib.bos_id, "eos": lib.eos_id, "pad": None if lib.pad_id < 0 else lib.pad_id,
           "unk": None}
    tokens = {k: (lib.tokenizer.id_to_token(v) if v is not None else None)
              for k, v in ids.items()}
    return TokenizerSource("huggingface", path, lib.vocab_size, ids, tokens)


def write_tokenizer(source: TokenizerSource, folder: str) -> dict:
    """Write the tokenizer files into `folder`; a report for the export summary."""
    if source.kind == "huggingface":
        base = source.path if os.path.isdir(source.path) else os.path.dirname(source.path)
        copied = []
        for name in _HF_FILES:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copy2(os.path.join(base, name), os.path.join(folder, name))
                copied.append(name)
        if not os.path.isdir(source.path):  # a tokenizer.json file under another name
            shutil.copy2(source.path, os.path.join(folder, "tokenizer.json"))
        _complete_tokenizer_config(source, folder)
        copied = sorted(set(copied) | {"tokenizer.json", "tokenizer_config.json"})
        return {"written": True, "kind": "huggingface", "source": source.path, "files": copied}
    return _write_sentencepiece(source, folder)


def _complete_tokenizer_config(source: TokenizerSource, folder: str) -> None:
    """The copied tokenizer_config.json (or a new one) with what AutoTokenizer needs to build
    this tokenizer as trained: its class and special tokens where the file is silent (otherwise
    the class comes from config.json's model type, whose default special tokens may not be in
    this vocabulary), and MODEL_INPUT_NAMES."""
    path = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):  # parsed before by resolve_tokenizer
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for name in ("bos", "eos", "pad", "unk"):
        if source.tokens[name] is not None:
            config.setdefault(f"{name}_token", source.tokens[name])
    config["model_input_names"] = MODEL_INPUT_NAMES
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def _write_sentencepiece(source: TokenizerSource, folder: str) -> dict:
    import sentencepiece
    import tokenizers

    shutil.copy2(source.path, os.path.join(folder, "tokenizer.model"))
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    sentencepiece_to_tokenizer_json(source.path).save(tokenizer_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "model_input_names": MODEL_INPUT_NAMES,
    }
    for name in ("bos", "eos", "pad", "unk"):
        if source.tokens[name] is not None:
            config[f"{name}_token"] = source.tokens[name]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({f"{k}_token": v for k, v in source.tokens.items() if v is not None}, f,
                  indent=2)

    sp = sentencepiece.SentencePieceProcessor(model_file=source.path)
    converted = tokenizers.Tokenizer.from_file(tokenizer_json)
    mismatch = None
    for text in PROBE_TEXTS:
        want = sp.encode(text)
        got = converted.encode(text, add_special_tokens=False).ids
        if want != got:
            mismatch = {"text": text, "sentencepiece": want, "tokenizer.json": got}
            break
    return {"written": True, "kind": "sentencepiece", "source": source.path,
            "files": ["tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json"],
            "probe_texts_equal": mismatch is None, "first_mismatch": mismatch}


def sentencepiece_to_tokenizer_json(model_file: str):
    """A `tokenizers.Tokenizer` equal to the sentencepiece model.

    transformers' SpmConverter with what it leaves to subclasses set from the model itself:
    the dummy prefix (add_dummy_prefix), BPE byte fallback and its decoding, and
    remove_extra_whitespaces (strip both ends, collapse runs of spaces, after the model's
    precompiled normalisation map, as sentencepiece does).
    """
    from tokenizers import Regex, decoders, normalizers
    from transformers.convert_slow_tokenizer import SpmConverter

    class Converter(SpmConverter):
        handle_byte_fallback = True

        def normalizer(self, proto):
            spec = proto.normalizer_spec
            steps = []
            if spec.precompiled_charsmap:
                steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
            if spec.remove_extra_whitespaces:
                steps += [normalizers.Strip(left=True, right=True),
                          normalizers.Replace(Regex(" {2,}"), " ")]
            return normalizers.Sequence(steps)

        def decoder(self, replacement, add_prefix_space):
            steps = [decoders.Replace(replacement, " ")]
            if self.proto.trainer_spec.byte_fallback:
                steps += [decoders.ByteFallback(), decoders.Fuse()]
            if add_prefix_space:
                steps.append(decoders.Strip(content=" ", left=1, right=0))
            return decoders.Sequence(steps)

    class Slow:  # what SpmConverter reads from a slow tokenizer
        vocab_file = model_file
        legacy = True  # prepend the dummy prefix to every text ("always"), as sentencepiece does

    slow = Slow()
    converter = Converter(slow)
    slow.add_prefix_space = converter.proto.normalizer_spec.add_dummy_prefix
    return converter.converted()
