"""The student recipe's defaults, stated once (importable without torch: the CLI, the demo and the family
planner read them)."""

from __future__ import annotations

# Stage-2 logits-match weight for "roi"/"logits" students, chosen on held-out images in three settings
# (docs/experiments/logits-weight.md): a weight of 1 pulls a 1/4 student's backbone off its proposals.
DEFAULT_LOGITS_WEIGHT = 0.3


def stage2_iters(stage1_iters: int) -> int:
    """Stage 2 (the detector head on the stage-1 backbone) gets half of stage 1's iterations."""
    return max(1, stage1_iters // 2)
