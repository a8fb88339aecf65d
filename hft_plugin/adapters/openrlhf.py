"""OpenRLHF: Half Fine-Tuning in its SFT, DPO, RM trainers and the PPO actor and critic.

    hft-run --round 1 -- deepspeed --module openrlhf.cli.train_sft ...
    # Ray (PPO): ray job submit --runtime-env-json='{"env_vars": {"HFT_ENABLE": "1", "HFT_ROUND": "1"}}' ...

Since v0.10.2 OpenRLHF has no ``create_optimizer``: every trained model goes through
``DeepspeedStrategy._ds_init_train_model(model, cfg)``, which collects the parameters with
``requires_grad`` and lets DeepSpeed build the optimizer from its config. That method is wrapped:
the half is chosen and frozen before it runs. Reference, reward and EMA models go through
``_ds_init_eval_model`` and are never touched. ``save_model`` and ``save_ckpt`` are wrapped to
write ``hft_selection.json`` beside the weights (rank 0).

DeepSpeed owns the gradients here (flat ZeRO buffers), so a per-element mask cannot be applied:
a selection that trains part of a fused tensor (qkv_proj, gate_up_proj, ...) is refused before
DeepSpeed starts, with the advice to use ``HFT_STRATEGY=layer`` (whole tensors only).

OpenRLHF's argparse accepts no extra flags: configure HFT through the ``HFT_*`` variables.

    >>> from hft_plugin.adapters.openrlhf import OpenRLHFAdapter
    >>> OpenRLHFAdapter.instruments
    ('openrlhf >= 0.10.2, < 0.12',)
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import IntegrationError
from .base import Adapter, patch, unpatch

logger = logging.getLogger("hft_plugin")

STRATEGY_MODULE = "openrlhf.utils.deepspeed.deepspeed"
PATCHED = ("DeepspeedStrategy._ds_init_train_model", "DeepspeedStrategy.save_model", "DeepspeedStrategy.save_ckpt")


def _inner_model(model):
    """The transformers model inside OpenRLHF's Actor (``.model``); a critic/reward model is itself."""
    from openrlhf.models import Actor

    return model.model if isinstance(model, Actor) else model


class OpenRLHFAdapter(Adapter):
    """Patches ``DeepspeedStrategy`` so every trained model (actor, critic, SFT/DPO/RM model)
    trains one half. ``config``: an HFTConfig or dict; by default the ``HFT_*`` variables."""

    name = "openrlhf"
    instruments = ("openrlhf >= 0.10.2, < 0.12",)

    def _instrument(self, **options: Any) -> None:
        if "config" in options:
            self.config = options["config"]
        import os

        if os.environ.get("HFT_REPLAY", "").strip():  # its loops build their own batches (docs/replay.md)
            logger.warning("hft_plugin: HFT_REPLAY cannot apply to OpenRLHF (its trainers build their batches in "
                           "their own loops); it trains without replay. Mix earlier data into its dataset instead.")
        patch(STRATEGY_MODULE, PATCHED[0], self._init_train_model)
        patch(STRATEGY_MODULE, PATCHED[1], self._save)
        patch(STRATEGY_MODULE, PATCHED[2], self._save)

    def _uninstrument(self) -> None:
        for path in PATCHED:
            unpatch(STRATEGY_MODULE, path)

    def _init_train_model(self, wrapped, instance, args, kwargs):
        from ..freeze import apply_selection
        from ..selection import select_half

        model = args[0] if args else kwargs["model"]
        inner = _inner_model(model)
        config = self.resolve_config()
        selection = select_half(inner, config=config)
        partial = selection.plan().partial
        if partial:
            raise IntegrationError(
                f"HFT would train part of {len(partial)} fused tensors (e.g. {next(iter(partial))}), which "
                "DeepSpeed's flat gradient buffers cannot mask in OpenRLHF. Set HFT_STRATEGY=layer "
                "(whole tensors only) for this model."
            )
        handle = apply_selection(inner, selection)
        self.handles.append(handle)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            handle.remove()  # nothing is lost: the model's flags are as they were
            self.handles.remove(handle)
            raise
        if getattr(instance, "is_rank_0", lambda: True)():
            from ..report import train_start_summary

            logger.warning("hft_plugin: OpenRLHF %s, round %d, trains with Half Fine-Tuning\n%s", type(model).__name__,
                           selection.config.round, train_start_summary(selection, handle))
        return result

    def _save(self, wrapped, instance, args, kwargs):
        from ..freeze import active_handle

        result = wrapped(*args, **kwargs)
        # save_model(model, tokenizer, output_dir, ...); save_ckpt(model, save_dir, ...)
        model = args[0] if args else kwargs.get("model")
        if wrapped.__name__ == "save_model":
            directory = args[2] if len(args) > 2 else kwargs.get("output_dir")
        else:
            directory = args[1] if len(args) > 1 else kwargs.get("save_dir")
        if model is None or directory is None or not getattr(instance, "is_rank_0", lambda: True)():
            return result
        handle = None
        for module in model.modules():
            handle = active_handle(module)
            if handle is not None:
                break
        if handle is not None:
            handle.selection.save(directory)
        return result
