"""megatron_ntp.plots: the quickstart's plot title and final line come from the run's own
config.yaml (an override such as loss.beta=0.5 shows there), not from the script."""

import json

from megatron_ntp import plots
from megatron_ntp.config import load_config, validate_config
from megatron_ntp.config.load import dump_yaml


def _run_folder(run_dir, overrides):
    run_dir.mkdir()
    config = validate_config(load_config("examples/configs/tiny_dense.yaml", overrides),
                             world_size=2)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "ce": 5.0 / step, "entropy": 4.0}) + "\n")
    return run_dir


def test_the_title_is_the_runs_own_config(tmp_path, monkeypatch, capsys):
    run_dir = _run_folder(tmp_path / "run-1", ["loss.beta=0.5", "loss.topk=100", "loss.lambda_tail=-0.1",
                                     "parallel.tensor=2"])
    assert plots.main([str(run_dir), "--describe"]) == 0
    described = capsys.readouterr().out.strip()
    assert described == "tiny-dense, beta=0.5 k=100 lambda_tail=-0.1, TP=2 PP=1 DP=1"
    titles = []
    monkeypatch.setattr(plots, "plot_runs", lambda runs, out, labels, title: titles.append(title)
                        or out)
    assert plots.main([str(run_dir), "--out", str(run_dir / "curves.png")]) == 0
    assert titles == [described]
    plain = _run_folder(tmp_path / "run-2", [])
    assert plots.describe_run(str(plain)) == "tiny-dense, cross-entropy, TP=1 PP=1 DP=2"
