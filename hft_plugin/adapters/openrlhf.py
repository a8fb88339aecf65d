"""OpenRLHF: Half Fine-Tuning in its SFT, DPO, RM trainers and the PPO actor and critic.

    hft-run --round 1 -- deepspeed --module openrlhf.cli.train_sft ...
    # Ray (PPO): ray job submit --runtime-env-json='{"env_vars": {"HFT_ENABLE": "1", "HFT_ROUND": "1"}}' ...

Since v0.10.2 OpenRLHF has no ``create_optimizer``: every trained model goes through
``DeepspeedStrategy._ds_init_train_model(model, cfg)``, which collects the parameters with
``requires_grad`` and lets DeepSpeed build the optimizer from its config. That method is wrapped:
the half is chosen and frozen before it runs. Reference, reward and EMA models go through
``_ds_init_eval_model`` and are never touched. Each trained model gets its
:class:`~hft_plugin.run.HFTRun`: the ranks compare their selections before DeepSpeed starts;
``save_model`` and ``save_ckpt`` are wrapped to write ``hft_selection.json`` beside the weights
(rank 0), and ``load_ckpt`` to refuse a checkpoint of another model, round or half before its
weights are loaded.

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
PATCHED = ("DeepspeedStrategy._ds_init_train_model", "DeepspeedStrategy.save_model", "DeepspeedStrategy.save_ckpt",
           "DeepspeedStrategy.load_ckpt")


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
        patch(STRATEGY_MODULE, PATCHED[3], self._load_ckpt)

    def _uninstrument(self) -> None:
        for path in PATCHED:
            unpatch(STRATEGY_MODULE, path)

    def _init_train_model(self, wrapped, instance, args, kwargs):
        from ..run import HFTRun
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
        run = HFTRun(inner, config, selection)
        run.check_ranks_agree()  # every rank prepares its trained models in the same order: collective here
        run.start()
        self.handles.append(run.handle)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException:
            run.stop()  # nothing is lost: the model's flags are as they were
            self.handles.remove(run.handle)
            raise
        run.claimed = True
        if getattr(instance, "is_rank_0", lambda: True)():
            logger.warning("hft_plugin: OpenRLHF %s, round %d, trains with Half Fine-Tuning\n%s", type(model).__name__,
                           selection.config.round, run.summary())
        return result

    def _save(self, wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        # save_model(model, tokenizer, output_dir, ...); save_ckpt(model, save_dir, ...)
        model = args[0] if args else kwargs.get("model")
        if wrapped.__name__ == "save_model":
            directory = args[2] if len(args) > 2 else kwargs.get("output_dir")
        else:
            directory = args[1] if len(args) > 1 else kwargs.get("save_dir")
        if model is None or directory is None or not getattr(instance, "is_rank_0", lambda: True)():
            return result
        run = _run_of(model)
        if run is not None:
            run.save_manifest(directory)
        else:  # a selection applied by hand (apply_selection), with no run
            from ..freeze import active_handle

            handle = next((h for h in map(active_handle, model.modules()) if h is not None), None)
            if handle is not None:
                handle.selection.save(directory)
        return result

    def _load_ckpt(self, wrapped, instance, args, kwargs):
        # load_ckpt(model, load_dir, ...): DeepSpeed built the optimizer for this run's half before
        # this, so a checkpoint of another half is refused, not switched to
        model = args[0] if args else kwargs.get("model")
        directory = args[1] if len(args) > 1 else kwargs.get("load_dir")
        run = _run_of(model) if model is not None else None
        if run is not None and directory is not None:
            run.check_resume(directory, optimizer_exists=True)
        return wrapped(*args, **kwargs)


def _run_of(model):
    """The run of the model inside ``model`` (a DeepSpeed engine, an Actor, or the model itself)."""
    from ..run import HFTRun

    for module in model.modules():
        run = HFTRun.of(module)
        if run is not None and run.handle is not None and not run.handle.removed:
            return run
    return None
