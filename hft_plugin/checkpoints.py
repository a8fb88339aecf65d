"""What a half fine-tuning run leaves behind, and how a resumed run is checked against it.

Every HFT run writes ``hft_selection.json`` (the :class:`~hft_plugin.Selection`: options, round,
per-tensor decisions, the model's fingerprint) into its output directory and every checkpoint.
A run that resumes from a checkpoint must train the same half of the same model with the same
options, or the optimizer state it loads belongs to other tensors; :func:`check_checkpoint` says
which selection to resume with, or refuses with a message that says what to do. Adapters call it
before the checkpoint's weights are loaded, so a refusal changes nothing.

    >>> from hft_plugin import select_half
    >>> from hft_plugin.testing import tiny_model
    >>> selection = select_half(tiny_model("llama"), round=0)
    >>> len(selection_digest(selection))
    16
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

from .errors import SelectionMismatchError
from .selection import MANIFEST_NAME, Selection

logger = logging.getLogger("hft_plugin")


def selection_digest(selection: Selection) -> str:
    """A short hash of what trains: the model's fingerprint, the options, the trainable units and
    the trainable regions of partly trained tensors, and the content hash of the importance scores
    a ``shielded`` half was chosen from. Equal digests mean the same half."""
    items = [selection.fingerprint, selection.config.to_dict(), sorted(selection.trainable_units),
             {k: [list(map(list, b)) for b in v] for k, v in sorted(selection.plan().partial.items())}]
    if selection.scores_sha256 is not None:  # ranks must read the same scores, not only the same path
        items.append(selection.scores_sha256)
    payload = json.dumps(items)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_checkpoint(checkpoint: str, selection: Selection) -> Selection:
    """The selection a run resuming from ``checkpoint`` must train with.

    That is ``selection`` when the checkpoint trained the same half; the checkpoint's own selection
    when it was made for the same model with the same options but drew another half (another
    installation's draw: its optimizer state belongs to that half); otherwise an error.

    Raises:
        SelectionMismatchError: the checkpoint has no manifest, or was trained on another model, in
            another round, or with other options. The message says how to resume or restart.
    """
    path = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise SelectionMismatchError(
            f"{checkpoint} has no {MANIFEST_NAME}: it was not written by an HFT run, so its optimizer "
            "state covers other parameters. To start HFT from its weights, load them as the model "
            "(from_pretrained) and train without resume_from_checkpoint."
        )
    saved = Selection.load(path)
    config = selection.config
    if saved.fingerprint != selection.fingerprint:
        raise SelectionMismatchError(
            f"{checkpoint} was trained on another model (fingerprint {saved.fingerprint}, this model "
            f"{selection.fingerprint}). Resume with the model it was trained on."
        )
    if saved.config.round != config.round:
        raise SelectionMismatchError(
            f"{checkpoint} was trained in HFT round {saved.config.round}, but this run is round "
            f"{config.round}. To continue that round pass round={saved.config.round}; to start round "
            f"{config.round} from its weights, load them as the model and train without resume_from_checkpoint."
        )
    if saved.config != config:
        diff = {k: (v, getattr(config, k)) for k, v in saved.config.to_dict().items() if getattr(config, k) != v}
        raise SelectionMismatchError(
            f"{checkpoint} was trained with other HFT options: "
            + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
            + ". Resume with the checkpoint's options."
        )
    return selection if saved.trainable_units == selection.trainable_units else saved


def load_renamed(model, checkpoint: str, before_write: Callable[[], None] | None = None) -> list[str]:
    """Load into ``model`` the tensors that ``checkpoint`` stores under other names than the model
    holds in memory, which a plain ``load_state_dict`` of its files misses: transformers 5.25 saves
    Mixtral's and Qwen3-MoE's experts one key per expert (and renames their routers), and
    ``Trainer``'s resume loads the file as it is, so it loads neither (with a "missing keys" line
    only). They are read through transformers' own conversion mapping
    (:class:`~hft_plugin.weights.ConvertedCheckpoint`, as ``from_pretrained`` reads them), one
    tensor at a time, and copied in place (same objects, same dtype as the model's).

    Returns the names of the tensors whose values changed; ``before_write`` is called once before
    the first change (to unshare a reference model that shares tensors with ``model``).

    Raises:
        SelectionMismatchError: a tensor of the model that the checkpoint holds under no name at all:
            resuming would train on with values that are not the checkpoint's.

    Example:
        >>> import tempfile, torch
        >>> from hft_plugin.testing import tiny_model
        >>> folder = tempfile.mkdtemp()
        >>> tiny_model("mixtral", seed=1).save_pretrained(folder)   # experts stored one key per expert
        >>> model = tiny_model("mixtral", seed=2)
        >>> changed = load_renamed(model, folder)
        >>> "model.layers.0.mlp.experts.gate_up_proj" in changed
        True
    """
    import torch

    from .weights import SAFE_INDEX, SAFE_WEIGHTS, CheckpointWeights, ConvertedCheckpoint, meta_model

    if not any(os.path.isfile(os.path.join(checkpoint, f)) for f in (SAFE_WEIGHTS, SAFE_INDEX)):
        return []  # pickled weights: stored under the in-memory names
    tensors = dict(model.state_dict(keep_vars=True))
    with CheckpointWeights(checkpoint) as weights:
        renamed = [n for n in tensors if n not in weights]
        if not renamed:
            return []
        converted = ConvertedCheckpoint(weights, meta_model(checkpoint))
        # A tied tensor (lm_head.weight and the embeddings) is stored once, under one of its names.
        stored_storage = {tensors[n].data_ptr() for n in tensors if n in weights or n in converted}
        absent = [n for n in renamed if n not in converted and tensors[n].data_ptr() not in stored_storage]
        if absent:
            raise SelectionMismatchError(
                f"{checkpoint} holds no value for {len(absent)} tensors of the model (e.g. {absent[0]!r}), under "
                "any name transformers' loading knows; resuming would train on with values that are not the "
                "checkpoint's. Resume from a checkpoint of this model, or load it with from_pretrained and train "
                "without resume_from_checkpoint."
            )
        changed: list[str] = []
        done: set[str] = set()
        for name in renamed:
            if name in done or name not in converted:
                continue
            group = converted.group(name)
            for target, value in converted.load(group).items():
                done.add(target)
                if target not in tensors:
                    continue
                tensor = tensors[target]
                value = value.to(dtype=tensor.dtype)
                if torch.equal(tensor.detach().cpu(), value):
                    continue
                if not changed and before_write is not None:
                    before_write()
                with torch.no_grad():
                    tensor.copy_(value.to(tensor.device))
                changed.append(target)
    if changed:
        logger.warning("hft_plugin: %s stores %d tensors under other names than the model holds (e.g. %s; transformers "
                       "saves MoE experts one key per expert), which the Trainer's resume does not load; they were "
                       "loaded through transformers' conversion, so the model is the checkpoint's.",
                       checkpoint, len(changed), changed[0])
    return changed

