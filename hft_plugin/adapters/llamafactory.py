"""LLaMA-Factory: Half Fine-Tuning in every stage (pt, sft, rm, dpo, kto, ppo) without code.

    HFT_ENABLE=1 HFT_ROUND=1 llamafactory-cli train sft.yaml      # finetuning_type: full

LLaMA-Factory loads every model through ``init_adapter``; the trainable one (``is_trainable=True``)
goes through ``_setup_full_tuning``, which ``init_adapter`` looks up in its module at call time.
That function is wrapped: the half is chosen and frozen there, and only then are the trainable
parameters upcast to fp32 (LLaMA-Factory's own step upcasts every parameter, frozen or not).
Reference and reward models are loaded with ``is_trainable=False`` and are left alone; the PPO
value head is added after this step and trains in full.

``finetuning_type`` must be ``full``: HFT with ``lora``, ``oft`` or ``freeze`` is an error, raised
when the trainable model is set up (before any training), since HFT chooses the trained half itself.

This set-up starts the model's :class:`~hft_plugin.run.HFTRun`; for the Trainer-based stages the
transformers adapter finds that run when the stage's Trainer starts (HFT is applied once) and does
the optimizer side (checking the optimizer against the trainable half, ``hft_selection.json`` in
the output and in every checkpoint); the PPO stage builds its optimizer itself, so ``CustomPPOTrainer.create_optimizer`` is
wrapped here to attach it to the handle (which checks it, and masks tensors of the mask mechanism).

Configure HFT through the ``HFT_*`` variables (LLaMA-Factory rejects unknown YAML keys).

    >>> from hft_plugin.adapters.llamafactory import LlamaFactoryAdapter
    >>> LlamaFactoryAdapter.instruments
    ('llamafactory >= 0.9.5, < 0.10',)
"""

from __future__ import annotations

import logging
from typing import Any

import wrapt

from ..errors import IntegrationError
from .base import Adapter, patch, unpatch

logger = logging.getLogger("hft_plugin")

ADAPTER_MODULE = "llamafactory.model.adapter"
PPO_TRAINER_MODULE = "llamafactory.train.ppo.trainer"
OTHER_TUNING = ("_setup_freeze_tuning", "_setup_lora_tuning")


def _trainer_shards_gradients() -> bool:
    """Whether the Trainer that will train this model keeps gradients in flat partitions or shards
    (DeepSpeed ZeRO, FSDP). LLaMA-Factory parses its TrainingArguments before it loads the model,
    and their DeepSpeed config is then registered with transformers; a launcher (accelerate)
    announces DeepSpeed or FSDP by its variables. An FSDP set-up only the Trainer learns of is met
    there: the run is applied again with the gradient mask (a warning says so)."""
    import os
    import sys

    deepspeed = sys.modules.get("transformers.integrations.deepspeed")  # imported by the arguments that use it
    if deepspeed is not None and deepspeed.deepspeed_config() is not None:
        return True
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes")
               for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))


def _bind_setup(model, finetuning_args, is_trainable, cast_trainable_params_to_fp32, *rest, **kwargs):
    return model, finetuning_args, is_trainable, cast_trainable_params_to_fp32


class LlamaFactoryAdapter(Adapter):
    """Patches LLaMA-Factory's full-tuning setup so the trainable model trains one half.

    ``config``: an :class:`~hft_plugin.HFTConfig` or a dict of its fields; by default the
    ``HFT_*`` environment variables are read when a model is set up (so they are checked then).
    """

    name = "llamafactory"
    instruments = ("llamafactory >= 0.9.5, < 0.10",)

    # -- lifecycle -----------------------------------------------------------------------------------
    def _instrument(self, **options: Any) -> None:
        if "config" in options:
            self.config = options["config"]
        patch(ADAPTER_MODULE, "_setup_full_tuning", self._setup_full_tuning)
        for function in OTHER_TUNING:
            patch(ADAPTER_MODULE, function, self._refuse_other_tuning)
        # The PPO trainer module is heavy and only imported for the ppo stage: patch it when it is.
        wrapt.register_post_import_hook(self._patch_ppo, PPO_TRAINER_MODULE)

    def _uninstrument(self) -> None:
        for function in ("_setup_full_tuning", *OTHER_TUNING):
            unpatch(ADAPTER_MODULE, function)
        import sys

        import wrapt.importer as importer

        hooks = importer._post_import_hooks.get(PPO_TRAINER_MODULE)
        if hooks and self._patch_ppo in hooks:
            hooks.remove(self._patch_ppo)
        if PPO_TRAINER_MODULE in sys.modules:
            unpatch(sys.modules[PPO_TRAINER_MODULE], "CustomPPOTrainer.create_optimizer", owner=self)

    def _patch_ppo(self, module) -> None:
        # named: an import hook runs outside instrument(), where the owner would go without saying
        patch(module, "CustomPPOTrainer.create_optimizer", self._ppo_create_optimizer, owner=self)

    # -- the wrappers ----------------------------------------------------------------------------------
    def _setup_full_tuning(self, wrapped, instance, args, kwargs):
        model, finetuning_args, is_trainable, cast = _bind_setup(*args, **kwargs)
        if not is_trainable:
            return wrapped(*args, **kwargs)
        from ..run import HFTRun
        from ..selection import select_half

        config = self.resolve_config()  # a bad HFT_* value fails here, before the model changes
        selection = select_half(model, config=config)
        # LLaMA-Factory's own step (freezes the modules it forbids, e.g. a frozen vision tower),
        # without its upcast: that would turn the frozen half into fp32 as well.
        wrapped(model, finetuning_args, is_trainable, False)
        # The stage's Trainer finds this run (the transformers adapter) rather than applying again;
        # the mechanism is the one that Trainer will need, so the model is frozen once.
        run = HFTRun(model, config, selection, partial="mask" if _trainer_shards_gradients() else "auto").start()
        handle = run.handle
        self.handles.append(handle)
        if cast:
            import torch

            # trainable tensors, and partly trained ones whole with their regions (which share their storage)
            handle.cast_trainable_(torch.float32)
        logger.warning("hft_plugin: LLaMA-Factory %s stage, round %d, trains with Half Fine-Tuning\n%s",
                       getattr(finetuning_args, "stage", "?"), selection.config.round, run.summary())
        return None

    def _refuse_other_tuning(self, wrapped, instance, args, kwargs):
        # _setup_freeze_tuning(model, finetuning_args, is_trainable, cast)
        # _setup_lora_tuning(config, model, model_args, finetuning_args, is_trainable, cast)
        offset = 2 if wrapped.__name__ == "_setup_lora_tuning" else 0
        finetuning_args = args[offset + 1] if len(args) > offset + 1 else kwargs.get("finetuning_args")
        is_trainable = args[offset + 2] if len(args) > offset + 2 else kwargs.get("is_trainable")
        if is_trainable:
            kind = getattr(finetuning_args, "finetuning_type", "?")
            raise IntegrationError(
                f"HFT_ENABLE is set but LLaMA-Factory's finetuning_type is {kind!r}: Half Fine-Tuning "
                "chooses the trained half itself and needs `finetuning_type: full`. Set it in your YAML, "
                "or unset HFT_ENABLE (or set HFT_DISABLE_ADAPTERS=llamafactory) to train without HFT."
            )
        return wrapped(*args, **kwargs)

    def _ppo_create_optimizer(self, wrapped, instance, args, kwargs):
        from ..freeze import active_handle

        optimizer = wrapped(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        for module in model.modules() if model is not None else ():
            handle = active_handle(module)
            if handle is not None:
                handle.own_regions(optimizer)
                handle.attach(optimizer)
                break
        return optimizer
