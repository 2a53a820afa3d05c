"""Many / medium / few grouping by training images per class (> 100, 20–100, < 20), as the LT literature reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GROUP_NAMES: tuple[str, str, str] = ("many", "medium", "few")
MANY, MEDIUM, FEW = 0, 1, 2


def many_medium_few(counts: Sequence[int] | np.ndarray, many: int = 100, few: int = 20) -> np.ndarray:
    """Group id per class: 0 many (> `many` images), 1 medium (`few`..`many` inclusive), 2 few (< `few`)."""
    counts = np.asarray(counts)
    return np.where(counts > many, MANY, np.where(counts < few, FEW, MEDIUM)).astype(np.int64)


def group_masks(counts: Sequence[int] | np.ndarray, many: int = 100, few: int = 20) -> dict[str, np.ndarray]:
    """Boolean class mask per group name (handy for per-group accuracy)."""
    ids = many_medium_few(counts, many, few)
    return {name: ids == gid for gid, name in enumerate(GROUP_NAMES)}
