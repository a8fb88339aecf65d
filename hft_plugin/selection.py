"""select_half and Selection: which half of a model trains, and what that amounts to."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

from torch import nn

from .config import HFTConfig
from .errors import ConfigError, LayoutError, SelectionMismatchError, UnsupportedModelError
from .layouts.base import GROUPS, Box, Layout, Part, Unit, gc_paused, unwrap_model

MANIFEST_NAME = "hft_selection.json"
_FORMAT_VERSION = 1
_MAX_ATTEMPTS = 16


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """What happens to each parameter: trains whole, is frozen whole, or trains in regions."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    partial: dict[str, tuple[Box, ...]]  # parameter -> the boxes that train


@dataclasses.dataclass
class Selection:
    """The half of a model that trains in one round.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> selection = select_half(model, round=0)
        >>> selection.trainable_ratio
        0.5
        >>> print(selection.summary())  # doctest: +ELLIPSIS
        HFT selection: strategy=category ratio=0.5 round=0 seed=0 layout=llama (named) ...
    """

    config: HFTConfig
    layout: Layout
    trainable_units: frozenset[str]

    # -- what trains ------------------------------------------------------------------------------
    def is_trainable(self, unit_key: str) -> bool:
        return unit_key in self.trainable_units

    def units(self) -> Iterator[tuple[Unit, bool]]:
        for unit in self.layout.units():
            yield unit, unit.key in self.trainable_units

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint()

    @property
    def layout_name(self) -> str:
        return self.layout.name

    def plan(self) -> ParamPlan:
        """Per parameter: trainable whole, frozen whole, or the boxes that train."""
        regions: dict[str, list[tuple[Part, bool]]] = {}
        for unit, trains in self.units():
            for part in unit.parts:
                regions.setdefault(part.param, []).append((part, trains))
        trainable, frozen, partial = [], [], {}
        for name in self.layout.shapes:
            if name in regions:
                parts = regions[name]
                if all(t for _, t in parts):
                    trainable.append(name)
                elif not any(t for _, t in parts):
                    frozen.append(name)
                else:
                    partial[name] = tuple(b for p, t in parts if t for b in (p.boxes or ()))
            else:
                (trainable if self.config.train_embeddings else frozen).append(name)
        return ParamPlan(tuple(trainable), tuple(frozen), partial)

    # -- how much trains -----------------------------------------------------------------------------
    @property
    def trainable_ratio(self) -> float:
        """The trainable share of the transformer layers' parameters."""
        total = self.layout.layer_numel
        return sum(u.numel for u, t in self.units() if t) / total if total else 0.0

    def stats(self) -> dict[str, Any]:
        """Shares per role, over the layers, and overall (outside-layer parameters included)."""
        per_group: dict[str, list[int]] = {}
        for unit, trains in self.units():
            counts = per_group.setdefault(unit.group, [0, 0])
            counts[0] += unit.numel if trains else 0
            counts[1] += unit.numel
        layer_trainable = sum(c[0] for c in per_group.values())
        layer_total = self.layout.layer_numel
        outside_total = self.layout.outside_numel
        outside_trainable = outside_total if self.config.train_embeddings else 0
        total = layer_total + outside_total
        return {
            "trainable_ratio": layer_trainable / layer_total if layer_total else 0.0,
            "layer_params": layer_total,
            "layer_trainable_params": layer_trainable,
            "outside_params": outside_total,
            "outside_trainable_params": outside_trainable,
            "total_params": total,
            "trainable_params": layer_trainable + outside_trainable,
            "overall_ratio": (layer_trainable + outside_trainable) / total if total else 0.0,
            "groups": {g: {"trainable": c[0], "total": c[1], "ratio": c[0] / c[1] if c[1] else 0.0}
                       for g, c in sorted(per_group.items(), key=lambda kv: _group_order(kv[0]))},
            "num_layers": len(self.layout.layers),
        }

    def summary(self) -> str:
        """A table like PEFT's ``print_trainable_parameters``, per role."""
        s = self.stats()
        c = self.config
        lines = [
            f"HFT selection: strategy={c.strategy} ratio={c.ratio:g} round={c.round} seed={c.seed} "
            f"layout={self.layout.name} layers={s['num_layers']} fingerprint={self.fingerprint}",
            f"{'part':<22}{'trainable':>15}{'total':>15}{'share':>9}",
        ]
        for group, g in s["groups"].items():
            lines.append(f"{group:<22}{g['trainable']:>15,}{g['total']:>15,}{g['ratio']:>9.2%}")
        lines.append(f"{'layers (HFT ratio)':<22}{s['layer_trainable_params']:>15,}{s['layer_params']:>15,}{s['trainable_ratio']:>9.2%}")
        outside = "outside layers" + ("" if c.train_embeddings else " (frozen)")
        lines.append(f"{outside:<22}{s['outside_trainable_params']:>15,}{s['outside_params']:>15,}"
                     f"{(s['outside_trainable_params'] / s['outside_params'] if s['outside_params'] else 0):>9.2%}")
        lines.append(f"{'all parameters':<22}{s['trainable_params']:>15,}{s['total_params']:>15,}{s['overall_ratio']:>9.2%}")
        return "\n".join(lines)

    # -- saving --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layout": self.layout.name,
            "fingerprint": self.fingerprint,
            "shapes": {n: list(s) for n, s in self.layout.shapes.items()},
            "outside": list(self.layout.outside),
            "layers": [
                [{"key": u.key, "group": u.group, "trainable": u.key in self.trainable_units,
                  "parts": [{"param": p.param, "numel": p.numel,
                             "boxes": None if p.boxes is None else [[list(r) for r in b] for b in p.boxes]}
                            for p in u.parts]}
                 for u in layer]
                for layer in self.layout.layers
            ],
            "stats": self.stats(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Selection":
        data = json.loads(text)
        if data.get("format") != _FORMAT_VERSION:
            raise SelectionMismatchError(f"Unsupported selection format {data.get('format')!r}; expected {_FORMAT_VERSION}.")
        layers, trainable = [], set()
        for index, layer in enumerate(data["layers"]):
            units = []
            for u in layer:
                parts = tuple(
                    Part(p["param"], p["numel"], None if p["boxes"] is None else tuple(tuple(tuple(r) for r in b) for b in p["boxes"]))
                    for p in u["parts"]
                )
                units.append(Unit(u["key"], u["group"], index, parts))
                if u["trainable"]:
                    trainable.add(u["key"])
            layers.append(units)
        layout = Layout(data["layout"], layers, list(data["outside"]), {n: tuple(s) for n, s in data["shapes"].items()})
        selection = cls(HFTConfig(**data["config"]), layout, frozenset(trainable))
        if selection.fingerprint != data["fingerprint"]:
            raise SelectionMismatchError("The selection file is corrupt: its fingerprint does not match its shapes.")
        return selection

    def save(self, directory: str) -> str:
        import os

        path = os.path.join(directory, MANIFEST_NAME)
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, path: str) -> "Selection":
        import os

        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        with open(path) as f:
            return cls.from_json(f.read())


def _group_order(group: str) -> tuple[int, str]:
    return (GROUPS.index(group) if group in GROUPS else len(GROUPS), group)


def check_model(model: Any) -> nn.Module:
    """Refuse, with a clear message, a model HFT cannot train as it is. Changes nothing."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"select_half needs a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_model(model)
    if hasattr(model, "peft_config") or type(model).__name__.startswith("Peft"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is PEFT-wrapped. HFT trains half of the original weights, not "
            "adapters: pass the base model, or merge the adapters first (model.merge_and_unload())."
        )
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is quantized; HFT updates the original weights in place. "
            "Load it in a floating-point dtype (bf16/fp16/fp32)."
        )
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise UnsupportedModelError(
                f"Parameter {name!r} has dtype {param.dtype}, which cannot be trained. HFT needs "
                "floating-point weights: load the model unquantized (bf16/fp16/fp32)."
            )
    return model


def read_layout(model: nn.Module) -> Layout:
    """Read ``model`` into layers and roles with the first layout plugin that recognises it."""
    from .plugins import get_manager

    model = check_model(model)
    layout = get_manager().hook.hft_read_layout(model=model)
    if layout is None:
        raise LayoutError(f"No layout reader recognised {type(model).__name__}; register one with the hft_read_layout hook.")
    if not layout.layers or not any(layout.layers):
        raise LayoutError(f"{type(model).__name__}: found no transformer layers to select from.")
    return layout


def strategy_names() -> list[str]:
    from .plugins import get_manager

    return sorted({n for names in get_manager().hook.hft_strategy_names() for n in names})


def select_half(
    model: nn.Module,
    round: int = 0,
    *,
    strategy: str = "category",
    ratio: float = 0.5,
    seed: int = 0,
    train_embeddings: bool = True,
    config: HFTConfig | None = None,
) -> Selection:
    """Choose the half of ``model`` that trains in ``round``; touch nothing.

    The result depends only on the model's structure, ``strategy``, ``ratio``, ``seed`` and
    ``round``: every process of a distributed job gets the same half, and the global random state
    is never used. Round r + 1 always differs from round r. Sizes are read without touching weights,
    so meta-device and ZeRO-3 partitioned models work.

    Args:
        model: a transformers causal LM (or any model a layout plugin reads).
        round: the fine-tuning round (0, 1, 2, ...): each round draws a new half.
        strategy: "category" (the paper's default), "layer", "model", or a plugin's.
        ratio: the trainable share of the transformer layers' parameters, in (0, 1).
        seed: seeds the draw.
        train_embeddings: train embeddings, lm_head and final norm (the paper's default).
        config: an HFTConfig instead of the keyword arguments (its ``round`` is used).

    Example:
        >>> import torch
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> with torch.device("meta"):
        ...     model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama"))
        >>> round0, round1 = select_half(model, 0), select_half(model, 1)
        >>> round0.trainable_ratio, round0.trainable_units != round1.trainable_units
        (0.5, True)
    """
    if config is None:
        config = HFTConfig(ratio=ratio, strategy=strategy, round=round, seed=seed, train_embeddings=train_embeddings)
    known = strategy_names()
    if config.strategy not in known:
        raise ConfigError(f"Unknown strategy {config.strategy!r}; known strategies: {', '.join(known)}.")
    from .regions import hidden

    with gc_paused(), hidden(unwrap_model(model)):  # an applied selection's region parameters are not weights
        layout = read_layout(model)
        return Selection(config, layout, frozenset(_draw(layout, config)))


def _draw(layout: Layout, config: HFTConfig) -> set[str]:
    """Round r's trainable units: the first draw that differs from round r - 1's."""
    from .plugins import get_manager

    hook = get_manager().hook.hft_select_half
    previous: set[str] | None = None
    for round in range(config.round + 1):
        for attempt in range(_MAX_ATTEMPTS):
            chosen = hook(layout=layout, config=config, round=round, attempt=attempt)
            if chosen is None:
                raise ConfigError(f"No plugin implements strategy {config.strategy!r}.")
            chosen = set(chosen)
            if chosen != previous:
                break
        previous = chosen
    return previous
