"""Evaluation: benchmark loaders, metric modules and the granularity breakdown (cvlm eval)."""
