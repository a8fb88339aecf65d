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
import os

from .errors import SelectionMismatchError
from .selection import MANIFEST_NAME, Selection


def selection_digest(selection: Selection) -> str:
    """A short hash of what trains: the model's fingerprint, the options, the trainable units and
    the trainable regions of partly trained tensors. Equal digests mean the same half."""
    payload = json.dumps([selection.fingerprint, selection.config.to_dict(), sorted(selection.trainable_units),
                          {k: [list(map(list, b)) for b in v] for k, v in sorted(selection.plan().partial.items())}])
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
