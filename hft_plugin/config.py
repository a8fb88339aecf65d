"""HFTConfig: the few numbers that decide which half trains."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

from .errors import ConfigError

SCORELESS_STRATEGIES = ("category", "layer", "model")
"""The built-in strategies that choose from the model's structure alone and read no scores."""

NEXT_ROUND = "next"
"""``round=NEXT_ROUND`` continues from the manifest of the folder the model was loaded from."""


@dataclasses.dataclass(frozen=True)
class HFTConfig:
    """What half to train.

    Attributes:
        ratio: trainable share of the transformer layers' parameters, in (0, 1). The paper's 0.5.
        strategy: ``"category"`` (the paper's default), ``"layer"``, ``"model"``, or the name a
            plugin registers.
        round: the fine-tuning round (stage or task), 0, 1, 2, ... Each round draws a new half.
            ``"next"``: the round after the one recorded in the manifest (``hft_selection.json``)
            of the folder the model was loaded from, with that run's seed, strategy, ratio and
            train_embeddings unless given here; see :func:`hft_plugin.selection.resolve_round`.
        seed: seeds the draw. The result never depends on the global random state.
        train_embeddings: train the parameters outside the transformer layers (embeddings,
            lm_head, final norm). The paper trains them; ``False`` is its ablation.
        scores: the importance scores file a data-driven strategy reads (``strategy="shielded"``;
            write it with :func:`hft_plugin.importance.compute_scores`). A path; every rank, a
            resume and ``hft plan --scores FILE`` read the same file, so they choose the same half.
            Left out of :meth:`to_dict` when unset, so manifests of other strategies are unchanged.

    Example:
        >>> HFTConfig(ratio=0.5, round=1).round
        1
        >>> HFTConfig.from_dict({"ratio": 0.3, "strategy": "layer"}).strategy
        'layer'
        >>> sorted(HFTConfig.from_dict({"round": "next", "seed": 0}).given)
        ['round', 'seed']
    """

    ratio: float = 0.5
    strategy: str = "category"
    round: int | str = 0  # an int >= 0, or NEXT_ROUND until resolved against a model folder
    seed: int = 0
    train_embeddings: bool = True
    scores: str | None = None

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
        if isinstance(self.round, str) and self.round.strip().lower() == NEXT_ROUND:
            object.__setattr__(self, "round", NEXT_ROUND)
        for name in ("round", "seed"):
            value = getattr(self, name)
            if name == "round" and value == NEXT_ROUND:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                hint = " or 'next' (the round after the loaded model's manifest)" if name == "round" else ""
                raise ConfigError(f"{name}={value!r} is not an integer; pass an int >= 0{hint}.")
            if value < 0:
                raise ConfigError(f"{name}={value!r} is negative; rounds and seeds count from 0.")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ConfigError(f"strategy={self.strategy!r} is not a strategy name; try 'category'.")
        if not isinstance(self.train_embeddings, bool):
            raise ConfigError(f"train_embeddings={self.train_embeddings!r} is not True or False.")
        if self.scores is not None:
            if hasattr(self.scores, "__fspath__"):  # a pathlib.Path: stored as text, so manifests stay JSON
                object.__setattr__(self, "scores", str(self.scores.__fspath__()))
            if not isinstance(self.scores, str) or not self.scores.strip():
                raise ConfigError(f"scores={self.scores!r} is not a file path; pass the path that "
                                  "hft_plugin.importance.compute_scores(...).save(folder) returned.")
            if self.strategy in SCORELESS_STRATEGIES and self.round != NEXT_ROUND:
                # These strategies are pure functions of the structure; a scores file given to them
                # would be ignored silently, which hides a typo in the strategy name. With
                # round="next" the strategy may still come from the previous manifest: checked then.
                raise ConfigError(f"scores={self.scores!r} is read only by strategy='shielded' (or a plugin's "
                                  f"data-driven strategy); strategy={self.strategy!r} chooses without scores. "
                                  "Pass strategy='shielded', or drop scores.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "HFTConfig | None" = None) -> "HFTConfig":
        """Build a config from keys, over ``base`` (or the defaults); unknown keys are an error
        that suggests the closest known key. The keys given (and ``base``'s) are remembered in
        :attr:`given`."""
        problem = cls.unknown_key(values)
        if problem:
            raise ConfigError(f"Unknown HFT option {problem}")
        config = dataclasses.replace(base or cls(), **dict(values))
        given = frozenset(values) | (base.given if base is not None else frozenset())
        object.__setattr__(config, "_given", given)  # not a field: equality and to_dict ignore it
        return config

    @property
    def given(self) -> frozenset[str]:
        """The options set explicitly: the keys passed to :meth:`from_dict` (over its ``base``),
        or, for a config built directly, the fields that differ from the defaults. With
        ``round="next"`` the others are taken from the previous round's manifest."""
        given = self.__dict__.get("_given")
        if given is not None:
            return given
        defaults = HFTConfig()
        return frozenset(f for f in self.field_names() if getattr(self, f) != getattr(defaults, f))

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
        values = dataclasses.asdict(self)
        if values["scores"] is None:  # manifests and digests of scoreless runs stay as they were
            del values["scores"]
        return values
