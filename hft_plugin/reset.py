"""Half-Reset (the HFT paper's pilot): put the frozen half of a fine-tuned model back to its base.

Take a fully fine-tuned model, choose a half with the same machinery HFT trains with
(:func:`~hft_plugin.select_half`, so ``hft plan`` shows exactly what a reset would touch), and reset
the half that HFT would have frozen to the base model's values. The paper finds this restores much
of the base model's knowledge while keeping much of the new ability.

Two forms:

- :func:`half_reset` on models in memory (in place);
- :func:`half_reset_checkpoint` (and ``hft half-reset``) on checkpoint directories, streaming
  tensor by tensor over safetensors files, so memory stays near the largest tensor.

    hft half-reset --base BASE_DIR --tuned TUNED_DIR --out OUT_DIR [--strategy category] [--round 0]
    python -m hft_plugin.reset --base BASE_DIR --tuned TUNED_DIR --out OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Sequence

from .errors import ConfigError, SelectionMismatchError
from .files import Interrupted, SignalGuard
# The one checkpoint reader, shared with hft verify and the reference model's sharing, and its writer.
from .weights import SAFE_INDEX, safetensors_name, write_safetensors
from .weights import CheckpointWeights as _Weights, meta_model as _meta_model

__all__ = ["half_reset", "half_reset_checkpoint", "register_cli", "main", "Interrupted", "RESET_MANIFEST_NAME"]

RESET_MANIFEST_NAME = "hft_half_reset.json"


# Files that travel with the weights: the config and everything a tokenizer or processor needs.
_COPIED_NAMES = frozenset({
    "config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "preprocessor_config.json", "processor_config.json",
})
_COPIED_PREFIXES = ("tokenizer", "chat_template", "spiece", "sentencepiece")


# -- on models in memory ----------------------------------------------------------------------------

def half_reset(
    tuned_model,
    base_model,
    *,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int | None = None,
    round: int | None = None,
    train_embeddings: bool | None = None,
):
    """Reset the half of ``tuned_model`` that HFT would freeze to ``base_model``'s values, in place.

    The half is ``select_half(tuned_model, round, strategy=..., ratio=..., seed=...)``: tensors it
    freezes are copied from the base, slices of fused tensors it freezes are copied slice by
    slice, and everything it trains (embeddings and lm_head too, unless ``train_embeddings=False``)
    keeps its tuned values. Options left out are the defaults (category, 0.5, seed 0, round 0,
    embeddings kept), or, if the folder ``tuned_model`` was loaded from has an
    ``hft_selection.json``, that run's options; a given option that contradicts it is an error.

    Args:
        tuned_model: the fine-tuned model, changed in place.
        base_model: the model it was tuned from: an ``nn.Module`` of the same structure, or a
            mapping of parameter name to tensor (a state dict).
        strategy, ratio, seed, round, train_embeddings: as in :func:`~hft_plugin.select_half`.

    Returns:
        The :class:`~hft_plugin.Selection`; its frozen half is what was reset.

    Raises:
        SelectionMismatchError: the base lacks a parameter the reset needs, or its shape differs
            (the message names the first such parameter). Nothing is changed then.
        ConfigError: an option contradicts the tuned model's manifest.

    Example:
        >>> import torch
        >>> from hft_plugin.testing import tiny_model
        >>> base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
        >>> selection = half_reset(tuned, base, round=0)
        >>> frozen = selection.plan().frozen[0]
        >>> torch.equal(dict(tuned.named_parameters())[frozen], dict(base.named_parameters())[frozen])
        True
    """
    import torch

    from .layouts.base import unwrap_model
    from .boxes import to_mask
    from .selection import _select, folder_manifest

    given = dict(strategy=strategy, ratio=ratio, seed=seed, round=round, train_embeddings=train_embeddings)
    folder, saved = folder_manifest(tuned_model)
    config = _reset_config(saved, given, folder, flags=False)
    selection = _select(tuned_model, config, saved.history if saved is not None else ())
    if saved is not None:
        _check_same_model(saved, selection, folder)
        selection = saved.__class__(saved.config, selection.layout, saved.trainable_units, saved.history)
    tuned_params = dict(unwrap_model(tuned_model).named_parameters())
    if isinstance(base_model, torch.nn.Module):
        base_params: Mapping[str, Any] = dict(unwrap_model(base_model).named_parameters())
    elif isinstance(base_model, Mapping):
        base_params = base_model
    else:
        raise ConfigError(f"base_model must be a torch.nn.Module or a state dict, got {type(base_model).__name__}.")

    plan = selection.plan()
    # Check everything before touching anything: a failed reset leaves the tuned model as it was.
    for name in (*plan.frozen, *plan.partial):
        if name not in base_params:
            raise SelectionMismatchError(
                f"The base model has no parameter {name!r}, which the reset needs; pass the model "
                "the tuned model was fine-tuned from."
            )
        if tuple(base_params[name].shape) != tuple(tuned_params[name].shape):
            raise SelectionMismatchError(
                f"Parameter {name!r} has shape {tuple(base_params[name].shape)} in the base model but "
                f"{tuple(tuned_params[name].shape)} in the tuned model; they are not the same architecture."
            )
    with torch.no_grad():
        for name in plan.frozen:
            tuned_params[name].copy_(base_params[name])
        for name, boxes in plan.partial.items():
            param = tuned_params[name]
            keep = to_mask(tuple(param.shape), boxes, device=param.device)
            base = base_params[name].to(device=param.device, dtype=param.dtype)
            param.copy_(torch.where(keep, param, base))
    return selection


# -- the options: given, or the tuned run's manifest -----------------------------------------------

_FLAGS = {"strategy": "--strategy", "ratio": "--ratio", "seed": "--seed", "round": "--round",
          "train_embeddings": "--reset-embeddings"}


def _reset_config(saved, given: Mapping[str, Any], where: str | None, flags: bool):
    """The HFTConfig of a reset: the given options over the tuned run's manifest (``saved``) or,
    without one, over the defaults. A given option that contradicts the manifest is refused:
    the manifest records which half trained, so any other half is the wrong one."""
    from .config import HFTConfig

    chosen = {k: v for k, v in given.items() if v is not None}
    if saved is None:
        return HFTConfig.from_dict(chosen)
    from .selection import MANIFEST_NAME

    manifest = os.path.join(where or ".", MANIFEST_NAME)
    clashes = [(k, v, getattr(saved.config, k)) for k, v in chosen.items() if getattr(saved.config, k) != v]
    if clashes:
        def shown(key, value):
            if flags and key == "train_embeddings":
                return "--reset-embeddings" if value is False else "no --reset-embeddings"
            return f"{_FLAGS[key]} {value}" if flags else f"{key}={value!r}"

        said = ", ".join(f"{shown(k, v)} but the tuned run used {shown(k, m)}" for k, v, m in clashes)
        raise ConfigError(
            f"{manifest} records the HFT run that produced the tuned model, and the options given contradict it: "
            f"{said}. Leave these options out to reset the half that run froze (its options are the default "
            "when the tuned folder has a manifest)."
        )
    return saved.config


def _check_same_model(saved, selection, where: str | None) -> None:
    if saved.fingerprint != selection.fingerprint:
        raise SelectionMismatchError(
            f"{os.path.join(where or '.', 'hft_selection.json')} was written for another model (fingerprint "
            f"{saved.fingerprint}) than the tuned model ({selection.fingerprint}); the tuned folder's weights or "
            "config were replaced after that run. Remove the stale manifest, or pass the folder that run wrote."
        )


# -- on checkpoints, streaming --------------------------------------------------------------------

def _first_difference(base: _Weights, tuned: _Weights) -> str | None:
    base_names, tuned_names = set(base.names()), set(tuned.names())
    for name in sorted(base_names ^ tuned_names):
        where = "base" if name in base_names else "tuned"
        other = "tuned" if where == "base" else "base"
        return f"tensor {name!r} is in the {where} checkpoint but not in the {other} one"
    for name in tuned.names():
        if base.meta(name)[0] != tuned.meta(name)[0]:
            return f"tensor {name!r} has shape {list(base.meta(name)[0])} in the base checkpoint but {list(tuned.meta(name)[0])} in the tuned one"
    return None


def _plan_for_checkpoint(tuned: _Weights, selection) -> tuple[dict[str, Any], list[str]]:
    """Tensor name -> what to do ("keep", "reset" or the boxes that keep their tuned values)."""
    plan = selection.plan()
    names = set(tuned.names())
    actions: dict[str, Any] = {name: "keep" for name in names}
    for name in plan.frozen:
        if name not in names:
            raise SelectionMismatchError(
                f"Parameter {name!r} of the model its config describes is not in the checkpoint under that "
                "name (the checkpoint stores it converted or under another name); load both models and "
                "use hft_plugin.half_reset(tuned_model, base_model) instead."
            )
        actions[name] = "reset"
    for name, boxes in plan.partial.items():
        if name not in names:
            raise SelectionMismatchError(
                f"Parameter {name!r} is not in the checkpoint under that name; load both models and use "
                "hft_plugin.half_reset(tuned_model, base_model) instead."
            )
        actions[name] = boxes
    for name, shape in selection.layout.shapes.items():
        if name in names and tuple(tuned.meta(name)[0]) != tuple(shape):
            raise SelectionMismatchError(
                f"Tensor {name!r} has shape {list(tuned.meta(name)[0])} in the checkpoint but {list(shape)} in "
                "the model its config.json describes; the config does not match the weights."
            )
    return actions, sorted(names - set(selection.layout.shapes))


def _copied_files(directory: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(directory)):
        if not os.path.isfile(os.path.join(directory, name)):
            continue
        if name in _COPIED_NAMES or name.startswith(_COPIED_PREFIXES):
            out.append(name)
    return out


def half_reset_checkpoint(
    base_dir: str,
    tuned_dir: str,
    out_dir: str,
    *,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int | None = None,
    round: int | None = None,
    train_embeddings: bool | None = None,
    allow_pickle: bool = False,
    _flags: bool = False,
):
    """Half-Reset on checkpoint directories: write ``out_dir`` = ``tuned_dir`` with its frozen half
    taken from ``base_dir``.

    Reads and writes one tensor at a time (safetensors, single file or sharded with an index), so
    memory stays near the largest tensor. The half is chosen on the model ``tuned_dir/config.json``
    describes, built on the meta device. ``out_dir`` gets the weights (same shard names and index;
    pickled inputs are written as safetensors), the config and tokenizer files, ``hft_selection.json``
    (the selection: its frozen half is what was reset) and ``hft_half_reset.json`` (what was done).

    Pickled ``.bin`` checkpoints are refused unless ``allow_pickle=True``; even then they are
    loaded with ``torch.load(weights_only=True)``.

    The options left out are the defaults (category, 0.5, seed 0, round 0, embeddings kept) or,
    if ``tuned_dir`` has an ``hft_selection.json`` (it was trained with HFT), that run's options;
    a given option that contradicts that manifest raises :class:`ConfigError`.

    Everything is checked before anything is written: mismatched base and tuned checkpoints (a
    tensor in one but not the other, or a different shape) raise :class:`SelectionMismatchError`
    naming the first difference. ``out_dir`` must not exist or be an empty directory (a symlink to
    one is followed); it is written in a temporary directory beside it and renamed at the end, so
    a failure, or SIGTERM/SIGINT/SIGHUP during the write, leaves nothing behind (the signal then
    raises :class:`Interrupted`).

    Returns:
        The :class:`~hft_plugin.Selection` used.

    Example:
        >>> import tempfile, os
        >>> from hft_plugin.testing import tiny_model
        >>> root = tempfile.mkdtemp()
        >>> from safetensors.torch import save_file
        >>> for name, seed in (("base", 0), ("tuned", 1)):
        ...     model = tiny_model("llama", seed=seed)
        ...     model.config.save_pretrained(os.path.join(root, name))
        ...     save_file(model.state_dict(), os.path.join(root, name, "model.safetensors"))
        >>> sel = half_reset_checkpoint(os.path.join(root, "base"), os.path.join(root, "tuned"), os.path.join(root, "out"))
        >>> sorted(os.listdir(os.path.join(root, "out")))  # doctest: +NORMALIZE_WHITESPACE
        ['config.json', 'hft_half_reset.json', 'hft_selection.json', 'model.safetensors']
    """
    import torch

    from .boxes import to_mask
    from .selection import MANIFEST_NAME, Selection, _select

    out_dir = _output_directory(out_dir, base_dir, tuned_dir)
    given = dict(strategy=strategy, ratio=ratio, seed=seed, round=round, train_embeddings=train_embeddings)
    saved = Selection.load(tuned_dir) if os.path.isfile(os.path.join(tuned_dir, MANIFEST_NAME)) else None
    config = _reset_config(saved, given, tuned_dir, flags=_flags)

    tuned = _Weights(tuned_dir, allow_pickle, label=f"--tuned {tuned_dir}")
    base = _Weights(base_dir, allow_pickle, label=f"--base {base_dir}")
    difference = _first_difference(base, tuned)
    if difference is not None:
        raise SelectionMismatchError(f"The base and tuned checkpoints differ: {difference}. Nothing was written.")
    model = _meta_model(tuned_dir)
    selection = _select(model, config, saved.history if saved is not None else ())
    if saved is not None:  # the half that run froze, as it recorded it
        _check_same_model(saved, selection, tuned_dir)
        selection = Selection(saved.config, selection.layout, saved.trainable_units, saved.history)
    actions, unplaced = _plan_for_checkpoint(tuned, selection)

    def produce(name: str):
        action = actions[name]
        value = tuned.get(name)
        if action == "keep":
            return value
        base_value = base.get(name).to(value.dtype)
        if action == "reset":
            return base_value
        keep = to_mask(tuple(value.shape), action, device=value.device)
        return torch.where(keep, value, base_value)

    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    counts = {"reset": 0, "partly_reset": 0, "kept": 0}
    with SignalGuard() as signals:
        work = None
        try:
            with signals.held():  # the directory exists only once `work` names it, for the clean-up
                work = tempfile.mkdtemp(prefix=".hft-half-reset-", dir=parent)
            _write_output(work, out_dir, tuned_dir, base_dir, tuned, base, actions, unplaced, produce, selection,
                          counts, signals)
        except BaseException:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
    return selection


def _write_output(work, out_dir, tuned_dir, base_dir, tuned, base, actions, unplaced, produce, selection, counts,
                  signals) -> None:
    from .selection import MANIFEST_NAME

    file_names: dict[str, str] = {}
    for file, names in tuned.files.items():
        out_name = safetensors_name(file) if tuned.pickled else file
        file_names[file] = out_name
        write_safetensors(os.path.join(work, out_name), names, tuned.meta, produce, tuned.metadata(file) or {"format": "pt"})
        for name in names:
            action = actions[name]
            counts["kept" if action == "keep" else "reset" if action == "reset" else "partly_reset"] += 1
    if tuned.index_name is not None:
        with open(os.path.join(tuned_dir, tuned.index_name), encoding="utf-8") as f:
            index = json.load(f)
        index["weight_map"] = {n: file_names[f] for n, f in index["weight_map"].items()}
        index_name = SAFE_INDEX if tuned.pickled else tuned.index_name
        with open(os.path.join(work, index_name), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    for name in _copied_files(tuned_dir):
        shutil.copy2(os.path.join(tuned_dir, name), os.path.join(work, name))
    selection.save(work)
    record = {
        "base": os.path.abspath(base_dir), "tuned": os.path.abspath(tuned_dir),
        "selection": MANIFEST_NAME, "config": selection.config.to_dict(),
        "tensors": counts, "not_in_layout_kept": unplaced,
        "note": "tensors that the selection freezes were reset to the base; the rest keep their tuned values",
    }
    with open(os.path.join(work, RESET_MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    tuned.close()
    base.close()
    with signals.held():  # both steps or neither: a signal waits until the result is in place
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # checked empty above
        os.replace(work, out_dir)


def _output_directory(out_dir: str, base_dir: str, tuned_dir: str) -> str:
    """Where the result goes: ``out_dir``, or the directory a symlink ``out_dir`` points to (the
    link then shows the result). Refused up front: an existing non-empty directory or a file, or
    the base or tuned directory itself."""
    given = out_dir
    out_dir = os.path.realpath(out_dir)  # a symlink's target: the rename must replace the directory, not the link
    shown = given if os.path.abspath(given) == out_dir else f"{given} (-> {out_dir})"
    for role, path in (("base", base_dir), ("tuned", tuned_dir)):
        if os.path.realpath(path) == out_dir:
            raise ConfigError(f"--out {shown} is the {role} directory; write the result to a new directory.")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError(f"--out {shown} exists and is not empty; pass a new directory (nothing is overwritten).")
    return out_dir


# -- the command: ``hft half-reset`` lives in hft_plugin.cli --------------------------------------------

def register_cli(subparsers):
    """Add ``half-reset`` to an argparse subparsers object. These three names are kept for callers
    of earlier versions; the command is :mod:`hft_plugin.cli`'s (``hft half-reset``)."""
    from .cli import add_half_reset

    return add_half_reset(subparsers)


def run_cli(args) -> int:
    """Run ``hft half-reset`` with parsed arguments (see :func:`hft_plugin.cli.run_half_reset`)."""
    from .cli import run_half_reset

    return run_half_reset(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hft_plugin.reset``: the same as ``hft half-reset`` (see :func:`hft_plugin.cli.half_reset_main`)."""
    from .cli import half_reset_main

    return half_reset_main(argv)


if __name__ == "__main__":
    sys.exit(main())
