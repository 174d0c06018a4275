"""Evaluation: benchmark loaders, the runner behind `cvlm eval`, metric modules, the synthetic benchmark."""

# The paper's three granularities, in report order. The granularity metric module keeps its own copy
# (evaluate loads it as a standalone script); a test holds the two equal.
GRANULARITIES = ("coarse", "fine", "reasoning")
