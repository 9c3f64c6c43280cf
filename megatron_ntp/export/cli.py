"""The `megatron-ntp export` subcommand (added by megatron_ntp.cli): a checkpoint of any layout
to a Hugging Face Qwen3 / Qwen3-MoE folder, in one process."""

import argparse


def add_commands(commands) -> None:
    _add_export(commands)


def _add_export(commands):
    p = commands.add_parser(
        "export", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="convert a checkpoint to a Hugging Face Qwen3 / Qwen3-MoE folder",
        description="Load a checkpoint of any TP/PP/EP layout into one process (resharded) "
                    "and write config.json, generation_config.json, safetensors shards with "
                    "model.safetensors.index.json and the tokenizer files. The folder is "
                    "written beside --output and renamed into place when complete. Run as one "
                    "process (not under torchrun); it needs the whole model in memory.")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    p.add_argument("--vocab", default="model", choices=["model", "tokenizer", "padded"],
                   help="embedding rows to export: model.vocab_size (default), the "
                        "tokenizer's vocabulary, or megatron-core's padded rows")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 for a bf16 run, else float32")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer to copy instead of the run's data.tokenizer_model")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="largest safetensors shard in GiB")
    p.set_defaults(run=_run_export)


def _run_export(args):
    import json

    from megatron_ntp.export.hf import ExportOptions, export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.output, ExportOptions(
        vocab=args.vocab, dtype=args.dtype, max_shard_bytes=int(args.max_shard_size * 2**30),
        force=args.force, tokenizer=args.tokenizer))
    print(json.dumps(summary, indent=2))
