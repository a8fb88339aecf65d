"""HFTConfig: the few numbers that decide which half trains."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HFTConfig:
    """What half to train.

    Attributes:
        ratio: trainable share of the transformer layers' parameters, in (0, 1). The paper's 0.5.
        strategy: ``"category"`` (the paper's default), ``"layer"``, ``"model"``, or the name a
            plugin registers.
        round: the fine-tuning round (stage or task), 0, 1, 2, ... Each round draws a new half.
        seed: seeds the draw. The result never depends on the global random state.
        train_embeddings: train the parameters outside the transformer layers (embeddings,
            lm_head, final norm). The paper trains them; ``False`` is its ablation.

    Example:
        >>> HFTConfig(ratio=0.5, round=1).round
        1
        >>> HFTConfig.from_dict({"ratio": 0.3, "strategy": "layer"}).strategy
        'layer'
    """

    ratio: float = 0.5
    strategy: str = "category"
    round: int = 0
    seed: int = 0
    train_embeddings: bool = True

    def __post_init__(self) -> None:
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ConfigError(f"ratio={ratio!r} is not a number; pass a float in (0, 1), e.g. ratio=0.5.")
        if not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"ratio={ratio!r} is outside (0, 1): it is the trainable share of the layers' "
                "parameters; pass e.g. ratio=0.5 (the paper's half)."
            )
        object.__setattr__(self, "ratio", float(ratio))
        for name in ("round", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r} is not an integer; pass an int >= 0.")
            if value < 0:
                raise ConfigError(f"{name}={value!r} is negative; rounds and seeds count from 0.")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ConfigError(f"strategy={self.strategy!r} is not a strategy name; try 'category'.")
        if not isinstance(self.train_embeddings, bool):
            raise ConfigError(f"train_embeddings={self.train_embeddings!r} is not True or False.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "HFTConfig | None" = None) -> "HFTConfig":
        """Build a config from keys, over ``base`` (or the defaults); unknown keys are an error
        that suggests the closest known key."""
        problem = cls.unknown_key(values)
        if problem:
            raise ConfigError(f"Unknown HFT option {problem}")
        return dataclasses.replace(base or cls(), **dict(values))

    @classmethod
    def unknown_key(cls, keys) -> str | None:
        """For the first key that is not an option: the key, the closest option and the known ones."""
        known = cls.field_names()
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                return f"{key!r}.{hint} Known keys: {', '.join(known)}."
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
