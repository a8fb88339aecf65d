"""select_half and Selection: which half of a model trains, and what that amounts to.

Also the manifest (``hft_selection.json``, written here, read by :mod:`hft_plugin.manifest`), the
rounds a model's folder has been through (``round="next"``), the checks that a model can be half
fine-tuned as it is (quantization: :mod:`hft_plugin.quantized`), and the counts of what actually
trains once a selection is applied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterator, Mapping

from torch import nn

from .boxes import Box
from .config import NEXT_ROUND, HFTConfig
from .errors import (ConfigError, LayoutError, ManifestError, NothingToTrainError, SelectionMismatchError,
                     UnsupportedModelError)
from .layouts.base import (GROUPS, Layout, Part, Unit, fingerprint_shapes, gc_paused, is_peft, param_shape,
                           unwrap_model)
from .manifest import FORMAT_VERSION, selection_from_json

logger = logging.getLogger("hft_plugin")

MANIFEST_NAME = "hft_selection.json"
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
        (embeddings, lm_head, final norm) train whole unless ``train_embeddings=False``.
        """
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
            "overall_ratio": (layer_trainable + outside_trainable) / total if total else 0.0,
            "trainable_params": layer_trainable + outside_trainable,
            "total_params": total,
            "trainable_ratio": layer_trainable / layer_total if layer_total else 0.0,
            "layer_trainable_params": layer_trainable,
            "layer_params": layer_total,
            "groups": {g: {"trainable": c[0], "total": c[1], "ratio": c[0] / c[1] if c[1] else 0.0}
                       for g, c in sorted(per_group.items(), key=lambda kv: _group_order(kv[0]))},
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
        rows += [("  " + group, g["trainable"], g["total"], g["ratio"]) for group, g in s["groups"].items()]
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
        return {
            "format": FORMAT_VERSION,
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
            "history": [dict(h) for h in self.history],
            "stats": self.stats(),
            **({"scores": {"file": self.config.scores, "sha256": self.scores_sha256}}
               if self.config.scores is not None else {}),
        }

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
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}).") from None
        return cls.from_json(raw, source=path)


def _group_order(group: str) -> tuple[int, str]:
    return (GROUPS.index(group) if group in GROUPS else len(GROUPS), group)


def check_model(model: Any) -> nn.Module:
    """Refuse, with a clear message, a model HFT cannot train as it is. Changes nothing.

    Refused: a non-module, a PEFT-wrapped model, and weights an optimizer cannot update in place:
    integer or packed tensors (bitsandbytes 4/8-bit, GPTQ, AWQ, HQQ, GGUF blocks kept packed...),
    fp8 tensors, quantized tensor subclasses (torchao, quanto), and any model a quantizer other
    than GGUF's manages. Accepted: a model transformers loaded from a GGUF file and de-quantized
    to ordinary float tensors (it keeps ``hf_quantizer``, ``is_quantized`` and
    ``config.quantization_config``, but its weights are plain fp32/fp16/bf16).

    Raises:
        UnsupportedModelError: the message says which case it is and what to do.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"select_half needs a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_model(model)
    if is_peft(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is PEFT-wrapped. HFT trains half of the original weights, not "
            "adapters: pass the base model, or merge the adapters first (model.merge_and_unload())."
        )
    from .quantized import quantization_problem

    problem = quantization_problem(model)
    if problem:
        raise UnsupportedModelError(problem)
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


# -- rounds: the manifest of the folder a model was loaded from ----------------------------------------

def model_folder(model: nn.Module) -> str | None:
    """The local folder ``model`` was loaded from (``from_pretrained(folder)`` records it as
    ``name_or_path`` / ``config._name_or_path``), or None (built from a config, or a hub id)."""
    model = unwrap_model(model)
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(path, str) or not path:
        return None
    return path if os.path.isdir(path) else None


def folder_manifest(model: nn.Module) -> tuple[str | None, Selection | None]:
    """(folder, its manifest) for the folder ``model`` was loaded from; the manifest is None if
    there is no such folder or file. Raises ManifestError if the file is damaged."""
    folder = model_folder(model)
    if folder is None or not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return folder, None
    return folder, Selection.load(folder)


def resolve_round(model: nn.Module, config: HFTConfig, *,
                  warn: bool = True) -> tuple[HFTConfig, tuple[dict[str, Any], ...]]:
    """The round to train, and the history of rounds, from the manifest of the folder ``model``
    was loaded from (the ``output_dir`` of the previous round, as a trainer saves it).

    * ``round="next"``: that manifest's round + 1, with its strategy, ratio, seed and
      train_embeddings unless ``config`` sets them (:attr:`HFTConfig.given`). A folder without a
      manifest (a base model) starts at round 0, with a one-line warning.
    * A round number that the manifest says already ran on these weights (its round or one in its
      history) is trained as asked, with a warning that names the fix (``warn=False``: none, for a
      caller that only shows the selection, as ``hft plan`` does; see :func:`rounds_run`).

    The history returned is the manifest's history plus the manifest's own round; a new manifest
    keeps it, so the chain of rounds survives every save.

    Example:
        >>> from hft_plugin.testing import tiny_model
        >>> resolve_round(tiny_model("llama"), HFTConfig(round=2))[0].round  # no folder: as given
        2
    """
    folder, previous = folder_manifest(model)
    history: tuple[dict[str, Any], ...] = ()
    if previous is not None:
        history = (*previous.history, previous.record(folder))
    if config.round == NEXT_ROUND:
        if previous is None:
            where = folder or "it was not loaded from a local folder"
            logger.warning("hft_plugin: round='next' found no %s for this model (%s): starting at round 0.",
                           MANIFEST_NAME, where)
            return _replace(config, round=0), history
        inherited = {f: getattr(previous.config, f) for f in ("strategy", "ratio", "seed", "train_embeddings")
                     if f not in config.given}
        resolved = _replace(config, round=previous.config.round + 1, **inherited)
        logger.info("hft_plugin: round='next': %s ran round %d; training round %d.", folder,
                    previous.config.round, resolved.round)
        return resolved, history
    if previous is not None and warn:
        ran = rounds_run(history)
        if config.round in ran:
            logger.warning(
                "hft_plugin: %s says round %d already ran on these weights (rounds run: %s); training it again "
                "trains the same half. For the next round pass round=%d or round='next' (HFT_ROUND=next), or "
                "--round next to hft plan.",
                os.path.join(folder, MANIFEST_NAME), config.round, ", ".join(map(str, ran)), max(ran) + 1)
    return config, history


def rounds_run(history: tuple[dict[str, Any], ...]) -> list[int]:
    """The rounds a history (:attr:`Selection.history`) says already ran on the weights, sorted.

        >>> rounds_run(({"round": 1}, {"round": 0}, {"round": 1}))
        [0, 1]
    """
    return sorted({int(h["round"]) for h in history})


def _replace(config: HFTConfig, **values: Any) -> HFTConfig:
    resolved = dataclasses.replace(config, **values)
    object.__setattr__(resolved, "_given", config.given)  # what the user gave stays what they gave
    return resolved


# -- fitting a selection to a model, and what actually trains ------------------------------------------

def check_fits(model: nn.Module, selection: Selection) -> None:
    """Raise SelectionMismatchError unless ``selection`` was made for a model of ``model``'s
    structure: the same parameter names and shapes and, for fused tensors, the same split (a
    4-head GPT-NeoX selection does not fit a 2-head model with equal shapes). Changes nothing."""
    model = unwrap_model(model)
    shapes = {n: param_shape(p) for n, p in model.named_parameters()}
    if shapes != selection.layout.shapes:
        diff = sorted(set(shapes.items()) ^ set(selection.layout.shapes.items()))
        raise SelectionMismatchError(
            f"This selection was made for another model (fingerprint {selection.fingerprint}, this model "
            f"{fingerprint_shapes(shapes)}); first difference: {diff[0][0] if diff else '?'}. "
            "Call select_half on this model."
        )
    wanted = selection.layout.splits()
    if not wanted:
        return  # nothing is split: names and shapes decide everything
    with gc_paused():
        here = read_layout(model).splits()
    if here != wanted:
        name = next((n for n in sorted(set(here) | set(wanted)) if here.get(n) != wanted.get(n)), "?")
        raise SelectionMismatchError(
            f"This selection was made for another model: {name!r} has the same shape but is split into parts "
            "differently here (the config divides it otherwise, e.g. another number of attention heads, "
            "key/value heads or experts). Call select_half on this model."
        )


def applied_counts(selection: Selection, requires_grad: Mapping[str, bool] | nn.Module) -> dict[str, Any]:
    """What actually trains once ``selection`` is applied: :meth:`Selection.stats`'s numbers counted
    over the parameters whose ``requires_grad`` is True, so tensors the user had frozen, which HFT
    leaves frozen, count as frozen.

    Args:
        selection: the selection.
        requires_grad: parameter name -> flag after applying (or the model to read them from).
            Partly trained (fused) tensors keep ``requires_grad=True``; their frozen regions are
            not counted.

    Returns:
        The keys of :meth:`Selection.stats` (``trainable_params``, ``layer_trainable_params``,
        ``outside_trainable_params``, ``trainable_ratio``, ``overall_ratio``, ``groups``, ...), in
        elements, plus ``frozen_by_user``: the parameters the plan trains (whole or in part) that
        stay frozen.

    Example:
        >>> from hft_plugin.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> selection = select_half(model)
        >>> _ = model.lm_head.requires_grad_(False)  # frozen by the user: HFT keeps it frozen
        >>> counts = applied_counts(selection, model)
        >>> counts["outside_trainable_params"] < selection.stats()["outside_trainable_params"]
        True
    """
    if isinstance(requires_grad, nn.Module):
        requires_grad = _flags(requires_grad)
    stats = selection.stats()
    plan = selection.plan()
    frozen_plan = set(plan.frozen)
    per_group: dict[str, list[int]] = {g: [0, v["total"]] for g, v in stats["groups"].items()}
    for unit, trains in selection.units():
        if trains:
            per_group[unit.group][0] += sum(p.numel for p in unit.parts if requires_grad.get(p.param, False))
    layer_trainable = sum(c[0] for c in per_group.values())
    outside_trainable = sum(selection.layout.numel(n) for n in selection.layout.outside
                            if n not in frozen_plan and requires_grad.get(n, False))
    layer_total, total = stats["layer_params"], stats["total_params"]
    frozen_by_user = sorted(n for n in (*plan.trainable, *plan.partial) if not requires_grad.get(n, False))
    return {
        **stats,
        "trainable_ratio": layer_trainable / layer_total if layer_total else 0.0,
        "layer_trainable_params": layer_trainable,
        "outside_trainable_params": outside_trainable,
        "trainable_params": layer_trainable + outside_trainable,
        "overall_ratio": (layer_trainable + outside_trainable) / total if total else 0.0,
        "groups": {g: {"trainable": c[0], "total": c[1], "ratio": c[0] / c[1] if c[1] else 0.0}
                   for g, c in per_group.items()},
        "frozen_by_user": frozen_by_user,
    }


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in unwrap_model(model).named_parameters()}


def check_trains_something(selection: Selection, requires_grad: Mapping[str, bool] | nn.Module) -> None:
    """Raise NothingToTrainError if applying ``selection`` would leave nothing to train, because
    the parameters it trains are all frozen already. ``requires_grad``: the flags the user left
    (before HFT), by parameter name, or the model. Changes nothing."""
    if isinstance(requires_grad, nn.Module):
        requires_grad = _flags(requires_grad)
    plan = selection.plan()
    wanted = [*plan.trainable, *plan.partial]
    if any(requires_grad.get(n, False) for n in wanted):
        return
    c = selection.config
    if not any(requires_grad.values()):
        what = f"every one of the model's {len(requires_grad)} parameters has requires_grad=False"
    else:
        what = (f"the {len(wanted)} parameters round {c.round} trains (e.g. {wanted[0]!r}) all have requires_grad="
                f"False; only parameters HFT freezes in this round are left trainable")
    raise NothingToTrainError(
        f"Nothing would train: {what}. HFT freezes half of what you leave trainable and never unfreezes what you "
        "froze. Unfreeze the model before enabling HFT (model.requires_grad_(True)), or freeze less by hand."
    )


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
