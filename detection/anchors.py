"""Anchor defaults, stated once (importable without torch: the CLI and the family planner read them).

Sizes are in input pixels (the square root of the anchor's area); aspect ratios are height / width.
"""

from __future__ import annotations

DEFAULT_ANCHOR_SIZES: tuple[int, ...] = (16, 32, 64, 128)  # suits 192-512 px inputs with 12-120 px objects
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
# Pedestrians stand: height:width 2:1 and 3:1 (Caltech boxes average about 2.4:1).
PEDESTRIAN_ASPECT_RATIOS: tuple[float, ...] = (2.0, 3.0)

# train-teacher --anchor-preset: name -> (sizes, aspect ratios).
ANCHOR_PRESETS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "default": (DEFAULT_ANCHOR_SIZES, DEFAULT_ASPECT_RATIOS),
    # Upright pedestrians are about 0.41 wide per unit of height (h/w ~ 2.4): two tall ratios, and finer
    # sqrt(2) size steps since only two shapes cover each scale.
    "pedestrian": ((16, 23, 32, 45, 64, 91, 128), PEDESTRIAN_ASPECT_RATIOS),
}
