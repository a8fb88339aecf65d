"""Rounds: which round a model trains next, from the manifest of the folder it was loaded from.

A trainer saves ``hft_selection.json`` beside the weights; a model loaded from that folder carries
its path (``name_or_path``), so the next round can be found there (``round="next"``), a round that
already ran on these weights can be named in a warning, and the chain of rounds (the history)
survives every save. :func:`hft_plugin.select_half` resolves the round through this module.

    >>> rounds_run(({"round": 0}, {"round": 1}))
    [0, 1]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import NEXT_ROUND, HFTConfig
from .layouts.base import unwrap_model
from .manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from .selection import Selection

logger = logging.getLogger("hft_plugin")

__all__ = ["model_folder", "folder_manifest", "resolve_round", "rounds_run"]


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
    from .selection import Selection  # here: selection.py imports this module

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
    """The rounds a history (:attr:`~hft_plugin.Selection.history`) says already ran on the weights, sorted.

        >>> rounds_run(({"round": 1}, {"round": 0}, {"round": 1}))
        [0, 1]
    """
    return sorted({int(h["round"]) for h in history})


def _replace(config: HFTConfig, **values: Any) -> HFTConfig:
    resolved = dataclasses.replace(config, **values)
    object.__setattr__(resolved, "_given", config.given)  # what the user gave stays what they gave
    return resolved
