"""The `megatron-ntp generate` and `megatron-ntp passk` programs: sample completions of prompts
from a checkpoint on every rank of a launch (megatron_ntp.eval.generate), and for passk score them
against a task file (megatron_ntp.eval.tasks). Rank 0 prints and writes the results.
"""

import json
import os
import sys
from dataclasses import dataclass, field

from megatron_ntp.config import ConfigError, check_environment
from megatron_ntp.eval.evaluate import write_json
from megatron_ntp.eval.generate import SamplingParams, generate
from megatron_ntp.eval.tasks import cut_at_stop, default_ks, load_tasks, resolve_checker, score_tasks
from megatron_ntp.files import write_atomic
from megatron_ntp.session import is_rank0, parallel_session


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
    """body(rank0) on every rank of this launch, inside the config's process groups."""
    check_environment(config)
    with parallel_session(config):
        return body(is_rank0())


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
    """Sample completions of `prompts`; rank 0 prints them (or writes JSONL to `output` and
    says where, and how many samples)."""
    stream = stream or sys.stdout

    def body(rank0):
        texts, samples, _ = sample_completions(config, checkpoint_dir, prompts, run)
        records = [{"prompt": p, "sample": j, "text": t, "tokens": len(s.tokens),
                    "finish": s.finish}
                   for p, row_t, row_s in zip(prompts, texts, samples)
                   for j, (t, s) in enumerate(zip(row_t, row_s))]
        if rank0:
            if output:
                write_atomic(output, "".join(json.dumps(r) + "\n" for r in records))
                stream.write(f"generate: {len(records)} samples ({len(prompts)} prompts x "
                             f"{run.sampling.num_samples}) written to {output}\n")
            else:
                for r in records:
                    stream.write(f"--- prompt {r['prompt']!r} sample {r['sample']} "
                                 f"({r['finish']})\n{r['text']}\n")
            stream.flush()
        return records

    return _launch(config, body)
