"""ms-swift: Half Fine-Tuning in ``swift sft`` / ``swift pt`` / ``swift rlhf`` without code, and a
refusal of its own tuners and freezing.

    HFT_ENABLE=1 HFT_ROUND=1 swift sft --tuner_type full --model ./model --dataset data.jsonl ...

ms-swift's trainers subclass ``transformers.Trainer`` (``Seq2SeqTrainer`` and TRL's), so the half
is chosen, frozen and masked by the transformers adapter, and ``hft_selection.json`` lands in the
output directory and in every checkpoint. ``swift sft`` runs the training in a child interpreter
(``python swift/cli/sft.py ...``, or ``torchrun`` with ``NPROC_PER_NODE``), which inherits
``HFT_ENABLE`` and arms itself through the start-up hook.

What this adapter adds is a guard. HFT chooses the trained half itself, so ms-swift's own ways of
choosing what trains are refused before the model is changed:

* ``--tuner_type`` other than ``full`` (ms-swift's default is ``lora``; also ``longlora``,
  ``adalora``, ``llamapro``, ``adapter``, ``vera``, ``boft``, ``fourierft``, ``reft``, ``bone`` and
  tuner plugins). ms-swift 3 called the option ``--train_type``;
* ``--freeze_parameters``, ``--freeze_parameters_regex``, ``--freeze_parameters_ratio``,
  ``--trainable_parameters``, ``--trainable_parameters_regex``, ``--freeze_llm true``;
* ``--lisa_activated_layers`` (LISA switches the trained layers during training).

For multimodal models ms-swift itself adds the vision tower, aligner and generator to
``freeze_parameters`` by default (``--freeze_vit``/``--freeze_aligner``); those entries are not
refused, as LLaMA-Factory's frozen vision tower is not (multimodal models were not tested here).

The check wraps ``TunerMixin.prepare_model``, the classmethod every ms-swift training pipeline
(sft, pt, rlhf, and the PPO value model) calls to set up the trained model, after loading it and
before a tuner or a freeze touches it; reference, reward and teacher models do not go through it.
ms-swift's callbacks and external plugins are chosen on the command line (``--callbacks``,
``--external_plugins``) and are built with the trainer, after the tuner is applied, so they can
neither reach a run started with only ``HFT_ENABLE`` nor refuse before the model changes.

Configure HFT through the ``HFT_*`` variables (ms-swift rejects unknown flags).

    >>> from hft_plugin.adapters.swift import SwiftAdapter
    >>> SwiftAdapter.instruments
    ('ms-swift >= 4.6, < 4.7',)
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import IntegrationError
from .base import Adapter, patch, unpatch

logger = logging.getLogger("hft_plugin")

TUNER_MODULE = "swift.pipelines.train.tuner"
PATCHED = "TunerMixin.prepare_model"


def _auto_parts(args, key: str) -> set[str]:
    """Module prefixes ms-swift adds by itself to ``freeze_parameters``/``trainable_parameters`` for a
    multimodal model (``TunerArguments._init_multimodal_full``)."""
    meta = getattr(args, "model_meta", None)
    arch = getattr(meta, "model_arch", None)
    if not getattr(meta, "is_multimodal", False) or arch is None:
        return set()
    parts = ("vision_tower", "aligner", "generator") if key == "freeze_parameters" else ("aligner",)
    found: set[str] = set()
    for part in parts:
        value = getattr(arch, part, None) or []
        found.update([value] if isinstance(value, str) else value)
    return found


def conflicting_options(args) -> list[str]:
    """The ms-swift options, as ``"--name value"``, that choose what trains and so conflict with HFT.

    ``args``: ms-swift's parsed arguments (``SftArguments``, ``RLHFArguments``...); read, not changed.
    """
    found = []
    tuner = getattr(args, "tuner_type", "full")
    if tuner != "full":
        found.append(f"--tuner_type {tuner}")
    for key in ("freeze_parameters", "trainable_parameters"):
        own = [p for p in (getattr(args, key, None) or []) if p not in _auto_parts(args, key)]
        if own:
            found.append(f"--{key} {' '.join(own)}")
    for key in ("freeze_parameters_regex", "trainable_parameters_regex"):
        if getattr(args, key, None):
            found.append(f"--{key} {getattr(args, key)}")
    for key in ("freeze_parameters_ratio", "lisa_activated_layers"):
        if (getattr(args, key, 0) or 0) > 0:
            found.append(f"--{key} {getattr(args, key)}")
    return found


def check_args(args) -> None:
    """Raise :class:`~hft_plugin.IntegrationError` if ms-swift's ``args`` choose what trains
    (a tuner other than ``full``, a freeze, LISA). Changes nothing."""
    found = conflicting_options(args)
    if found:
        raise IntegrationError(
            f"HFT_ENABLE is set but ms-swift was given {', '.join(found)}: Half Fine-Tuning trains half "
            "of the full model's own weights and chooses that half itself. Train with `--tuner_type full` "
            "and without the freeze, trainable-parameter and LISA options, or unset HFT_ENABLE to train "
            "without HFT."
        )


class SwiftAdapter(Adapter):
    """Wraps ms-swift's ``TunerMixin.prepare_model`` with :func:`check_args`. Applying HFT itself
    is the transformers adapter's work; ``config`` is accepted for the common lifecycle only."""

    name = "swift"
    instruments = ("ms-swift >= 4.6, < 4.7",)

    def _instrument(self, **options: Any) -> None:
        patch(TUNER_MODULE, PATCHED, self._prepare_model)

    def _uninstrument(self) -> None:
        unpatch(TUNER_MODULE, PATCHED)

    def _prepare_model(self, wrapped, instance, args, kwargs):
        # TunerMixin.prepare_model(cls, args, model, *, template=None, train_dataset=None, task_type=None)
        check_args(args[0] if args else kwargs["args"])
        return wrapped(*args, **kwargs)
