"""Subcommands eval, generate and passk of `megatron-ntp` (added by megatron_ntp.cli).

Each is a thin wrapper: parse, build the config (the checkpoint's, with overrides), call the
package. eval/generate/passk run on every rank under torchrun (any layout: overrides such as
parallel.tensor=2 choose it; the checkpoint is resharded on load).
"""

import argparse

from megatron_ntp.cli import add_config_arguments

_LAYOUT_NOTE = ("The layout is TP=PP=EP=1 (every rank a data-parallel replica) unless overrides "
                "set it (e.g. parallel.tensor=2 under torchrun); the checkpoint is resharded "
                "to it on load, whatever layout it was trained in.")


def add_commands(commands):
    _add_eval(commands)
    _add_generate(commands)
    _add_passk(commands)


def _checkpoint_argument(parser):
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="checkpoint folder (its latest iteration) or one iter_XXXXXXX "
                             "folder; its stored config is the base for overrides")


def _config(args):
    from megatron_ntp.eval.loading import inference_config

    return inference_config(args.checkpoint, args.config, args.overrides)


# --------------------------------------------------------------------------------------------
def _add_eval(commands):
    p = commands.add_parser(
        "eval", help="perplexity, entropy, top-k/tail mass and calibration on a dataset split",
        description="Score a checkpoint on a dataset split (the run's data section, or "
                    "overrides such as data.blend=PREFIX): per-token cross-entropy, perplexity, "
                    "entropy, top-k and tail mass, top-1 accuracy and two calibration tables "
                    "(megatron_ntp/eval/metrics.py defines them). Prints and optionally writes "
                    "JSON. " + _LAYOUT_NOTE)
    _checkpoint_argument(p)
    add_config_arguments(p)
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--sequences", type=int, default=64,
                   help="sequences of data.seq_length tokens (multiple of micro-batch * DP)")
    p.add_argument("--topk", type=int, default=0,
                   help="k of the top-k/tail mass (default loss.topk, else 100)")
    p.add_argument("--top1-bins", type=int, default=10, help="bins of the top-1 table")
    p.add_argument("--output", metavar="FILE.json")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from megatron_ntp.eval.evaluate import EvalOptions, run_eval

    config, checkpoint = _config(args)
    run_eval(config, checkpoint, EvalOptions(split=args.split, sequences=args.sequences,
                                             topk=args.topk, top1_bins=args.top1_bins,
                                             output=args.output))


# --------------------------------------------------------------------------------------------
def _sampling_arguments(p, num_samples_default):
    p.add_argument("--num-samples", "-m", type=int, default=num_samples_default,
                   help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut completions at this string (repeatable; '\\n' is a newline)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")


def _sampling_run(args):
    from megatron_ntp.config import ConfigError
    from megatron_ntp.eval.generate import SamplingParams
    from megatron_ntp.eval.programs import SamplingRun

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as err:
        raise ConfigError(f"sampling: {err}") from None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    stop = tuple(s.encode().decode("unicode_escape") for s in args.stop)
    return SamplingRun(params, stop, args.batch_size)


def _add_generate(commands):
    p = commands.add_parser(
        "generate", help="sample completions (temperature, top-k, top-p) from a checkpoint",
        description="Sample m completions per prompt; stops at end-of-document or "
                    "--max-new-tokens. Deterministic for a seed (and layout). No KV cache: for "
                    "large models export to Hugging Face and use vLLM/SGLang. " + _LAYOUT_NOTE)
    _checkpoint_argument(p)
    add_config_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='JSONL of {"prompt": ...}')
    p.add_argument("--output", metavar="FILE.jsonl", help="write samples here (else print)")
    _sampling_arguments(p, 1)
    p.set_defaults(run=_run_generate)


def _run_generate(args):
    from megatron_ntp.config import ConfigError
    from megatron_ntp.eval.programs import run_generate

    prompts = list(args.prompt)
    if args.prompts:
        import json

        with open(args.prompts, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConfigError(f"{args.prompts}:{number}: needs JSON with a "
                                          f"'prompt' field") from None
    if not prompts:
        raise ConfigError("give --prompt TEXT or --prompts FILE.jsonl")
    config, checkpoint = _config(args)
    run_generate(config, checkpoint, prompts, _sampling_run(args), output=args.output)


# --------------------------------------------------------------------------------------------
def _add_passk(commands):
    p = commands.add_parser(
        "passk", help="Pass@k (unbiased), Avg@k and Cons@k over a JSONL task file",
        description="Sample m completions per task ({\"prompt\", \"answer\"} per line), "
                    "check each with --checker (exact, numeric or module:function) and report "
                    "Pass@k = 1 - C(m-c,k)/C(m,k), Avg@m and Cons@m (majority vote). "
                    "The paper's setting: -m 128 --temperature 0.7 --top-p 0.95. " + _LAYOUT_NOTE)
    _checkpoint_argument(p)
    add_config_arguments(p)
    p.add_argument("--tasks", required=True, metavar="FILE.jsonl")
    p.add_argument("--checker", default="exact", help="exact, numeric or module:function")
    p.add_argument("--k", type=_int_list, metavar="K,K,...",
                   help="k values, comma-separated (default 1,2,4,...,m)")
    p.add_argument("--output", metavar="FILE.json", help="results with every sample")
    _sampling_arguments(p, 16)
    p.set_defaults(run=_run_passk)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got "
                                         f"{text!r}") from None


def _run_passk(args):
    from megatron_ntp.eval.programs import run_passk

    config, checkpoint = _config(args)
    run_passk(config, checkpoint, args.tasks, args.checker, _sampling_run(args), ks=args.k,
              output=args.output)
