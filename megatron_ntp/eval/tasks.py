"""`megatron-ntp passk` and `megatron-ntp generate`: sampling programs over prompt files.

Task file (JSONL, one task per line): {"prompt": "...", "answer": "..."} ("reference" is
accepted for "answer"; an optional "id" names the task, default its line number).

Checkers (`--checker`) turn a completion into an answer and judge it against the reference:
  exact     answer = the completion's first non-empty line, stripped; equal strings
  numeric   answer = the last number in the completion (as a fraction: 0.5 == 1/2); equal numbers
  module:function   a function(answer, reference) -> bool of your own, importable from
            PYTHONPATH; the answer is the completion stripped, or function.extract(completion)
            when the function has an `extract` attribute. Answers must be hashable (Cons@k votes).
Completions are cut at the first of the `--stop` strings (and end at end-of-document).

Per task with m samples of which c are correct: Pass@k = 1 - C(m - c, k) / C(m, k) (unbiased),
Avg@m = c / m, Cons@m = whether the majority answer (ties: the one seen first; no answer never
votes) is correct. Reported: means over tasks, and every sample with its answer and verdict.
"""

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from megatron_ntp.config import ConfigError
from megatron_ntp.eval.generate import SamplingParams, generate
from megatron_ntp.eval.passk import (
    avg_at_k,
    cons_at_k,
    exact_match,
    extract_last_number,
    numeric_match,
    pass_at_k,
)


@dataclass(frozen=True)
class Checker:
    name: str
    extract: Callable  # completion text -> answer (hashable) or None
    check: Callable  # (answer, reference) -> bool


def _first_line(text: str):
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


BUILTIN_CHECKERS = {
    "exact": Checker("exact", _first_line, exact_match),
    "numeric": Checker("numeric", extract_last_number, numeric_match),
}


def resolve_checker(spec: str) -> Checker:
    """A built-in checker by name, or `module:function`."""
    if spec in BUILTIN_CHECKERS:
        return BUILTIN_CHECKERS[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"--checker {spec!r}: use exact, numeric or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--checker {spec!r}: cannot import {module_name!r} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--checker {spec!r}: {module_name} has no function "
                          f"{function_name!r}")
    extract = getattr(function, "extract", None) or (lambda text: text.strip() or None)
    return Checker(spec, extract, lambda answer, reference: bool(function(answer, reference)))


def load_tasks(path: str) -> list[dict]:
    """[{"id", "prompt", "answer"}] from a JSONL file; errors name the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"--tasks {path!r}: no such file")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ConfigError(f"{path}:{number}: needs a string field 'prompt'")
            answer = item.get("answer", item.get("reference"))
            if answer is None:
                raise ConfigError(f"{path}:{number}: needs a field 'answer' (or 'reference')")
            tasks.append({"id": item.get("id", number), "prompt": item["prompt"],
                          "answer": str(answer)})
    if not tasks:
        raise ConfigError(f"--tasks {path!r} holds no tasks")
    return tasks


def cut_at_stop(text: str, stop) -> str:
    """The text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at >= 0:
                cut = min(cut, at)
    return text[:cut]


def default_ks(m: int) -> list[int]:
    ks, k = [], 1
    while k < m:
        ks.append(k)
        k *= 2
    return ks + [m]


def score_tasks(tasks: list[dict], completions: list[list[str]], checker: Checker,
                ks: list[int]) -> dict:
    """Pass@k / Avg@m / Cons@m over tasks, each with m completion texts (already cut)."""
    m = len(completions[0])
    if any(len(c) != m for c in completions):
        raise ValueError("every task needs the same number of samples")
    bad = [k for k in ks if not 1 <= k <= m]
    if bad:
        raise ConfigError(f"--k {bad}: every k must be between 1 and the samples per task {m}")
    per_task = []
    for task, texts in zip(tasks, completions):
        answers = [checker.extract(t) for t in texts]
        correct = [a is not None and bool(checker.check(a, task["answer"])) for a in answers]
        c = sum(correct)
        per_task.append({
            "id": task["id"], "prompt": task["prompt"], "reference": task["answer"],
            "correct": c, "samples": m,
            "pass_at_k": {str(k): pass_at_k(m, c, k) for k in ks},
            "avg": avg_at_k(correct),
            "cons": bool(cons_at_k(answers, task["answer"], checker.check)),
            "completions": [{"text": t, "answer": None if a is None else str(a), "correct": ok}
                            for t, a, ok in zip(texts, answers, correct)],
        })
    n = len(per_task)
    return {
        "checker": checker.name, "tasks": n, "samples_per_task": m,
        f"avg@{m}": sum(t["avg"] for t in per_task) / n,
        f"cons@{m}": sum(t["cons"] for t in per_task) / n,
        "pass@k": {str(k): sum(t["pass_at_k"][str(k)] for t in per_task) / n for k in ks},
        "per_task": per_task,
    }


@dataclass(frozen=True)
class SamplingRun:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple = ()
    batch_size: int = 32


def sample_completions(config, checkpoint_dir, prompts: list[str], run: SamplingRun):
    """(texts [prompt][sample], samples, step) on every rank of this launch."""
    from megatron_ntp.data import build_tokenizer_from_config
    from megatron_ntp.eval.loading import build_inference_model
    from megatron_ntp.training.data import resolve_data_config

    if config.parallel.virtual_pipeline > 1:
        raise ConfigError(f"parallel.virtual_pipeline={config.parallel.virtual_pipeline}: "
                          f"sampling runs one micro-batch per token, which the interleaved "
                          f"schedule does not take; use parallel.virtual_pipeline=1 (the "
                          f"checkpoint is resharded on load)")
    data = resolve_data_config(config)
    try:
        tokenizer = build_tokenizer_from_config(data)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data: {err}") from err
    encoded = [tokenizer.tokenize(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"prompt {i} encodes to no tokens: {prompts[i]!r}")
    chunks, step = build_inference_model(config, checkpoint_dir)
    samples = generate(chunks, encoded, run.sampling, eod_id=tokenizer.eod,
                       max_length=config.data.seq_length, vocab_limit=tokenizer.vocab_size,
                       batch_size=run.batch_size)
    texts = [[cut_at_stop(completion_text(tokenizer, ids, s.tokens), run.stop) for s in row]
             for ids, row in zip(encoded, samples)]
    return texts, samples, step


def completion_text(tokenizer, prompt_ids: list, ids: list) -> str:
    """The text the sampled ids add to the prompt: decode(prompt + ids) minus decode(prompt),
    which keeps a leading space that decoding the ids alone would drop (sentencepiece), or
    decode(ids) when the decoded prompt is not a prefix of the whole."""
    whole = tokenizer.detokenize(list(prompt_ids) + list(ids))
    head = tokenizer.detokenize(list(prompt_ids))
    return whole[len(head):] if whole.startswith(head) else tokenizer.detokenize(list(ids))


def _launch(config, body):
    import torch.distributed as dist

    from megatron_ntp.config import check_environment
    from megatron_ntp.eval.loading import start_parallel
    from megatron_ntp.parallel import destroy_parallel

    check_environment(config)
    start_parallel(config)
    try:
        return body(not dist.is_initialized() or dist.get_rank() == 0)
    finally:
        destroy_parallel()


def run_passk(config, checkpoint_dir, tasks_file: str, checker_spec: str, run: SamplingRun,
              ks: list[int] | None = None, output: str | None = None, stream=None) -> dict:
    """Sample m completions per task, score them; rank 0 prints and writes `output`."""
    stream = stream or sys.stdout
    tasks = load_tasks(tasks_file)
    checker = resolve_checker(checker_spec)
    m = run.sampling.num_samples
    ks = ks or default_ks(m)

    def body(rank0):
        texts, samples, step = sample_completions(config, checkpoint_dir,
                                                  [t["prompt"] for t in tasks], run)
        results = score_tasks(tasks, texts, checker, ks)
        for task, row in zip(results["per_task"], samples):
            for entry, sample in zip(task["completions"], row):
                entry["tokens"], entry["finish"] = len(sample.tokens), sample.finish
        results = {"checkpoint": os.path.abspath(checkpoint_dir) if checkpoint_dir else None,
                   "step": step, "tasks_file": os.path.abspath(tasks_file),
                   "sampling": {**run.sampling.__dict__, "stop": list(run.stop)}, **results}
        if rank0:
            stream.write(format_passk(results))
            stream.flush()
            if output:
                write_json(output, results)
        return results

    return _launch(config, body)


def format_passk(results: dict) -> str:
    m = results["samples_per_task"]
    lines = [f"passk: {results['tasks']} tasks x {m} samples, checker {results['checker']} "
             f"(step {results['step']})"]
    lines.append("  " + "  ".join(f"pass@{k} {v:.4f}" for k, v in results["pass@k"].items()))
    lines.append(f"  avg@{m} {results[f'avg@{m}']:.4f}  cons@{m} {results[f'cons@{m}']:.4f}")
    return "\n".join(lines) + "\n"


def run_generate(config, checkpoint_dir, prompts: list[str], run: SamplingRun,
                 output: str | None = None, stream=None) -> list:
    """Sample completions of `prompts`; rank 0 prints them (or writes JSONL to `output`)."""
    stream = stream or sys.stdout

    def body(rank0):
        texts, samples, _ = sample_completions(config, checkpoint_dir, prompts, run)
        records = [{"prompt": p, "sample": j, "text": t, "tokens": len(s.tokens),
                    "finish": s.finish}
                   for p, row_t, row_s in zip(prompts, texts, samples)
                   for j, (t, s) in enumerate(zip(row_t, row_s))]
        if rank0:
            if output:
                tmp = f"{output}.tmp-{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    for r in records:
                        f.write(json.dumps(r) + "\n")
                os.replace(tmp, output)
            else:
                for r in records:
                    stream.write(f"--- prompt {r['prompt']!r} sample {r['sample']} "
                                 f"({r['finish']})\n{r['text']}\n")
            stream.flush()
        return records

    return _launch(config, body)


def write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
