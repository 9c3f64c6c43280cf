"""Task files, answer checkers and Pass@k / Avg@k / Cons@k scoring (used by the passk program,
megatron_ntp.eval.programs, and usable on completions from any sampler, e.g. vLLM).

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
from dataclasses import dataclass
from typing import Callable

from megatron_ntp.config import ConfigError
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
