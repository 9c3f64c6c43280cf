"""Evaluation: sampling metrics (Pass@k, Avg@k, Cons@k) and answer checkers."""
