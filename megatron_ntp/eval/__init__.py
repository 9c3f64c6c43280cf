"""Evaluation: per-token statistics and calibration (metrics, evaluate), sampling (generate),
Pass@k / Avg@k / Cons@k (passk) over task files (tasks), checkpoint loading for inference
(loading) and the eval/generate/passk/export subcommands (cli)."""
