"""Strategies: which units of a layout train in a round.

A strategy is a function ``(layout, config, round, attempt) -> set of trainable unit keys`` exposed
through the ``hft_select_half`` hook. It draws randomness only from :func:`rng`.
"""

from __future__ import annotations

import random

from ..config import HFTConfig


def rng(config: HFTConfig, round: int, attempt: int = 0) -> random.Random:
    """A private random generator for one draw. Seeding with a string hashes it with SHA-512, so the
    stream is the same in every process and never touches the global random state."""
    return random.Random(f"hft:{config.strategy}:{config.ratio!r}:{config.seed}:{round}:{attempt}")
