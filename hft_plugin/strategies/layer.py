"""Layer-level selection: whole layers, spread evenly; at ratio 0.5, every other layer.

Layer i trains when ``floor((i + 1 + round) * ratio) > floor((i + round) * ratio)``: the trained
layers are spread as evenly as the ratio allows, and each round shifts the pattern by one layer, so
at ratio 0.5 round r + 1 trains exactly the layers round r froze. The share is exact to one layer.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ..layouts.base import Layout


def select(layout: Layout, config, round: int, attempt: int) -> set[str]:
    ratio = Fraction(config.ratio).limit_denominator(10_000)
    shift = round + attempt
    return {
        unit.key
        for i, layer in enumerate(layout.layers)
        if math.floor((i + 1 + shift) * ratio) > math.floor((i + shift) * ratio)
        for unit in layer
    }
