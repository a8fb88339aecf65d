"""select_half and Selection: which half of a model trains, and what that amounts to.

The neighbours it builds on, each with its own job: :mod:`hft_plugin.rounds` (which round a model
trains next, from the manifest of the folder it was loaded from), :mod:`hft_plugin.checks` (can a
model be half fine-tuned as it is, does a selection fit it, what actually trains once applied) and
:mod:`hft_plugin.manifest` (``hft_selection.json``, written and read). Their public functions are
also named here, where they always were (``hft_plugin.selection.resolve_round``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from torch import nn

from .boxes import Box
from .checks import applied_counts, check_fits, check_model, check_trains_something  # noqa: F401
from .config import HFTConfig
from .errors import ConfigError, LayoutError
from .layouts.base import ROLES, Layout, Part, Unit, gc_paused
from .manifest import MANIFEST_NAME, read_manifest, selection_from_json, selection_to_dict  # noqa: F401
from .rounds import folder_manifest, model_folder, resolve_round, rounds_run  # noqa: F401

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
        trainable params: 90,432 || all params: 164,416 || trainable%: 55.0019
        50.00% of the transformer layers' parameters train (the HFT ratio counts only the layers); the 16,448 parameters outside them (embeddings, lm_head, final norm) all train, so 55.00% of all parameters do.
        part                        trainable          total    share
        all parameters                 90,432        164,416   55.00%
        layers (HFT ratio)             73,984        147,968   50.00%
          attention                    24,576         49,152   50.00%
          mlp                          49,152         98,304   50.00%
          norm                            256            512   50.00%
        outside layers                 16,448         16,448  100.00%
    """

    config: HFTConfig
    layout: Layout
    trainable_units: frozenset[str]
    history: tuple[dict[str, Any], ...] = ()
    """The earlier rounds these weights went through, oldest first, as recorded in the manifest
    of the folder the model was loaded from (see :func:`resolve_round`)."""
    scores_sha256: str | None = None
    """The content hash of the importance scores file (``config.scores``) this half was chosen from."""

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
        """What trains, in parameters (elements): overall first, then the layers, then per role.

        ``overall_ratio`` (``trainable_params / total_params``) is the figure PEFT calls
        ``trainable%``; ``trainable_ratio`` is the HFT ratio, counted over the transformer layers
        only (``layer_trainable_params / layer_params``); the parameters outside the layers
        (embeddings, lm_head, final norm) train whole unless ``train_embeddings=False``. ``roles``
        counts each role of the layers (attention, mlp, norm, router, other); ``groups`` is the same
        mapping under its former name, deprecated, kept for code and dashboards that read it.
        """
        per_role: dict[str, list[int]] = {}
        for unit, trains in self.units():
            counts = per_role.setdefault(unit.role, [0, 0])
            counts[0] += unit.numel if trains else 0
            counts[1] += unit.numel
        layer_trainable = sum(c[0] for c in per_role.values())
        layer_total = self.layout.layer_numel
        outside_total = self.layout.outside_numel
        outside_trainable = outside_total if self.config.train_embeddings else 0
        total = layer_total + outside_total
        roles = {r: {"trainable": c[0], "total": c[1], "ratio": c[0] / c[1] if c[1] else 0.0}
                 for r, c in sorted(per_role.items(), key=lambda kv: _role_order(kv[0]))}
        return {
            "overall_ratio": (layer_trainable + outside_trainable) / total if total else 0.0,
            "trainable_params": layer_trainable + outside_trainable,
            "total_params": total,
            "trainable_ratio": layer_trainable / layer_total if layer_total else 0.0,
            "layer_trainable_params": layer_trainable,
            "layer_params": layer_total,
            "roles": roles,
            "groups": roles,  # deprecated: the former name of "roles", the same object
            "outside_trainable_params": outside_trainable,
            "outside_params": outside_total,
            "num_layers": len(self.layout.layers),
        }

    def summary(self, stats: dict[str, Any] | None = None) -> str:
        """What trains, as text: the overall share first, in PEFT's ``print_trainable_parameters``
        form (the figure to compare with LoRA's ``trainable%``), one line on how it relates to the
        layers' share (the HFT ratio), then a table: all parameters, the layers, each role, and
        the parameters outside the layers.

        Args:
            stats: the numbers to show, with the keys of :meth:`stats` (default: ``self.stats()``,
                the plan); e.g. counts taken after applying, where tensors frozen by hand stay frozen.
        """
        s = self.stats() if stats is None else stats
        c = self.config
        outside = s["outside_params"]
        outside_trains = s["outside_trainable_params"]
        if not outside:
            why = "no parameters lie outside the layers"
        else:
            state = ("all train" if outside_trains == outside else "are frozen" if not outside_trains
                     else f"train in part ({outside_trains:,})")
            why = f"the {outside:,} parameters outside them (embeddings, lm_head, final norm) {state}"
        lines = [
            f"HFT selection: strategy={c.strategy} ratio={c.ratio:g} round={c.round} seed={c.seed} "
            f"layout={self.layout.name} layers={s['num_layers']} fingerprint={self.fingerprint}",
            f"trainable params: {s['trainable_params']:,} || all params: {s['total_params']:,} || "
            f"trainable%: {100 * s['overall_ratio']:.4f}",
            f"{s['trainable_ratio']:.2%} of the transformer layers' parameters train (the HFT ratio counts only "
            f"the layers); {why}, so {s['overall_ratio']:.2%} of all parameters do.",
        ]
        # 15 columns keep a space before counts up to 99 billion; a larger model (LongCat-Flash has
        # 560,664,958,976 parameters) widens the columns rather than running two counts together
        w = max(15, len(f"{s['total_params']:,}") + 2)
        rows = [("all parameters", s["trainable_params"], s["total_params"], s["overall_ratio"]),
                ("layers (HFT ratio)", s["layer_trainable_params"], s["layer_params"], s["trainable_ratio"])]
        rows += [("  " + role, r["trainable"], r["total"], r["ratio"]) for role, r in s["roles"].items()]
        rows.append(("outside layers", outside_trains, outside, outside_trains / outside if outside else 0))
        lines.append(f"{'part':<22}{'trainable':>{w}}{'total':>{w}}{'share':>9}")
        lines += [f"{name:<22}{trains:>{w},}{total:>{w},}{share:>9.2%}" for name, trains, total, share in rows]
        if c.scores is not None:
            lines.append(f"importance scores: {c.scores} (sha256 {(self.scores_sha256 or '?')[:16]}); the most important "
                         "units of each layer and role are frozen")
        frozen_by_user = s.get("frozen_by_user") or ()
        if frozen_by_user:
            n = len(frozen_by_user)
            lines.append(f"{n} tensor{'s' if n > 1 else ''} this round would train {'were' if n > 1 else 'was'} frozen "
                         f"before HFT and {'stay' if n > 1 else 'stays'} frozen (e.g. {frozen_by_user[0]}).")
        return "\n".join(lines)

    # -- saving --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest (``hft_selection.json``) as data; :mod:`hft_plugin.manifest` writes the format."""
        return selection_to_dict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def record(self, folder: str | None = None) -> dict[str, Any]:
        """This round as one entry of a later round's :attr:`history`."""
        entry: dict[str, Any] = {**self.config.to_dict(), "fingerprint": self.fingerprint}
        if folder:
            entry["folder"] = os.path.abspath(folder)
        return entry

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "the selection") -> "Selection":
        """Read a selection written by :meth:`to_json`. ``source`` (a file name) goes into errors.

        Raises:
            ManifestError: not JSON, truncated, a key missing or of the wrong type, a format this
                version does not read, or contents that do not match their own fingerprint.
        """
        return selection_from_json(cls, text, source)

    def save(self, directory: str) -> str:
        """Write ``directory/hft_selection.json`` (atomically: a reader never sees half a file)."""
        from .files import write_atomic

        return write_atomic(os.path.join(directory, MANIFEST_NAME), self.to_json())

    @classmethod
    def load(cls, path: str) -> "Selection":
        """Read ``path`` (a manifest file, or a folder holding ``hft_selection.json``).

        Raises:
            ManifestError: the file cannot be read or is not a valid manifest (the message names it).
        """
        return read_manifest(cls, path)


def _role_order(role: str) -> tuple[int, str]:
    return (ROLES.index(role) if role in ROLES else len(ROLES), role)


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
    round: int | str = 0,
    *,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int | None = None,
    train_embeddings: bool | None = None,
    scores: str | None = None,
    config: HFTConfig | None = None,
) -> Selection:
    """Choose the half of ``model`` that trains in ``round``; touch nothing.

    The result depends only on the model's structure, ``strategy``, ``ratio``, ``seed`` and
    ``round``: every process of a distributed job gets the same half, and the global random state
    is never used. Round r + 1 always differs from round r. Sizes are read without touching weights,
    so meta-device and ZeRO-3 partitioned models work.

    The manifest of the folder the model was loaded from (``model.name_or_path``), if it has one,
    is read for ``round="next"`` and for the history of rounds (see :func:`resolve_round`).

    Args:
        model: a transformers causal LM (or any model a layout plugin reads).
        round: the fine-tuning round (0, 1, 2, ...): each round draws a new half. ``"next"``: the
            round after the one recorded in the model folder's manifest.
        strategy: "category" (the paper's default), "layer", "model", "shielded" (needs
            ``scores``), or a plugin's.
        ratio: the trainable share of the transformer layers' parameters, in (0, 1). Default 0.5.
        seed: seeds the draw. Default 0.
        train_embeddings: train embeddings, lm_head and final norm (the paper's default, True).
        scores: the importance scores file ``strategy="shielded"`` reads (written by
            :func:`hft_plugin.importance.compute_scores`).
        config: an HFTConfig instead of the keyword arguments (its ``round`` is used).
        Options left out (None) are the defaults, or with ``round="next"`` the previous round's.

    Raises:
        ConfigError: a bad option or an unknown strategy. UnsupportedModelError: a model HFT
        cannot train as it is (:func:`check_model`). LayoutError: a model no layout reads.
        ManifestError: the model folder's manifest is damaged.

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
        options = dict(ratio=ratio, strategy=strategy, round=round, seed=seed, train_embeddings=train_embeddings,
                       scores=scores)
        config = HFTConfig.from_dict({k: v for k, v in options.items() if v is not None})
    check_model(model)  # before any file is read: a PEFT or quantized model is refused first
    config, history = resolve_round(model, config)
    return _select(model, config, history)


def _select(model: nn.Module, config: HFTConfig, history: tuple[dict[str, Any], ...] = ()) -> Selection:
    """select_half with a resolved round and no look at the model's folder."""
    known = strategy_names()
    if config.strategy not in known:
        raise ConfigError(f"Unknown strategy {config.strategy!r}; known strategies: {', '.join(known)}.")
    with gc_paused():
        layout = read_layout(model)
        trainable = frozenset(_draw(layout, config))
        scores_sha256 = None
        if config.scores is not None:
            from .importance import file_sha256

            scores_sha256 = file_sha256(config.scores)  # checked again: the manifest names what was read
        return Selection(config, layout, trainable, tuple(history), scores_sha256)


def _draw(layout: Layout, config: HFTConfig) -> set[str]:
    """Round r's trainable units: the first draw that differs from round r - 1's."""
    from .plugins import get_manager

    hook = get_manager().hook.hft_select_half
    if config.scores is not None:
        # A strategy that reads scores chooses from the model as it enters this round; earlier rounds
        # chose from other scores, which cannot be replayed here. It keeps "round r differs from
        # round r - 1" itself, from the previous half its scores file records.
        chosen = hook(layout=layout, config=config, round=config.round, attempt=0)
        if chosen is None:
            raise ConfigError(f"No plugin implements strategy {config.strategy!r}.")
        return set(chosen)
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
