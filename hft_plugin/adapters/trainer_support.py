"""What the Trainer adapter (:mod:`hft_plugin.adapters.transformers`) checks and writes around
the trainer's events: the trainer can take HFT, a PEFT model is refused, the trainer's optimizer fits
the round, the reference model shares the frozen half (or why it keeps its own copy), and the model
card's HFT section."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..config import HFTConfig
from ..errors import ConfigError, IntegrationError, UnsupportedModelError
from ..freeze import HFTHandle
from ..layouts.base import unwrap_model
from ..selection import Selection, applied_counts
from ..sharing import FSDP, unshareable_reason
from . import compat
from .fsdp import is_fsdp2_module

if TYPE_CHECKING:
    from ..run import HFTRun

# Wrappers that have already split the model across processes: changing requires_grad under them
# is silently wrong (DDP does not reduce newly trainable gradients, ZeRO keeps updating newly
# frozen ones), so HFT must be enabled before they exist.
_DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


def trainer_class():
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - transformers is a hard requirement of this adapter
        raise IntegrationError("enable_hft needs transformers: pip install 'hft-plugin[trl]'.") from exc
    return Trainer


def write_model_card(trainer, selection: Selection, handle: "HFTHandle | None", original: Callable, args: tuple,
                      kwargs: dict):
    """The trainer's own ``create_model_card`` with an ``hft`` tag, then an HFT section appended to
    the README.md it wrote in the output dir (main process only, as the card itself)."""
    import inspect

    from ..export import add_model_card_section, base_model_name

    signature = inspect.signature(original)
    if "tags" in signature.parameters:  # TRL's and transformers' create_model_card both take tags
        bound = signature.bind_partial(*args, **kwargs)
        tags = bound.arguments.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        bound.arguments["tags"] = tags + ["hft"] * ("hft" not in tags)
        args, kwargs = bound.args, bound.kwargs
    result = original(*args, **kwargs)
    if trainer.is_world_process_zero():
        counts = applied_counts(selection, handle.model) if handle is not None else None
        add_model_card_section(os.path.join(trainer.args.output_dir, "README.md"), selection, counts,
                               base_model=base_model_name(unwrap_model(trainer.model)))
    return result


def refuse_peft(trainer) -> None:
    """A trainer given ``peft_config`` wraps its model in PEFT adapters: say that the two are
    alternatives, before anything changes."""
    from ..layouts.base import is_peft

    model = unwrap_model(trainer.model)
    if is_peft(model):
        raise UnsupportedModelError(
            f"{type(trainer).__name__}'s model is a {type(model).__name__} (PEFT adapters, e.g. LoRA from the "
            "trainer's peft_config). HFT and LoRA are alternatives: drop peft_config (in `trl sft`, drop --use_peft) "
            "and HFT trains half of the base model's own weights; to keep trained adapters, merge them first "
            "(model.merge_and_unload())."
        )


# -- the reference model shares the policy's frozen half (hft_plugin.sharing) ---------------------------
def sharing_declined(trainer) -> str | None:
    """Why this trainer's reference must keep its own copy, in one line, or None."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return FSDP
    if getattr(trainer, "is_deepspeed_enabled", False):
        return unshareable_reason(trainer.model, trainer.ref_model) or (
            "DeepSpeed owns the policy's tensors (it casts, moves and broadcasts them in place when training starts)")
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", ())
    if getattr(trainer.args, "sync_ref_model", False) or any(type(c).__name__ == "SyncRefModelCallback" for c in callbacks):
        return "the trainer syncs the policy into the reference (sync_ref_model), which writes into its tensors"
    return None


def share_reference(trainer, run: "HFTRun") -> None:
    """The trainer's ``ref_model`` (TRL's DPO, KTO, GRPO, ... and any trainer exposing one) shares the
    policy's frozen half, or keeps sharing it; checked each time training starts."""
    reference = getattr(trainer, "ref_model", None)
    run.share_with(reference, sharing_declined(trainer) if reference is not None else None)


def replay_lines(trainer) -> list[str]:
    """Replay's line in the train-start block (hft_plugin.adapters.trainer_replay), if it is on."""
    import sys

    module = sys.modules.get("hft_plugin.adapters.trainer_replay")  # never imported here: no replay, no line
    return module.summary_lines(trainer) if module is not None else []


def check_trainer(trainer) -> None:
    Trainer = trainer_class()
    if not isinstance(trainer, Trainer):
        raise IntegrationError(
            f"enable_hft needs a transformers.Trainer (or a TRL trainer), got {type(trainer).__name__}. For a "
            "model and your own loop use select_half and apply_selection."
        )
    problem = compat.prepare_problem(Trainer)
    if problem:
        raise IntegrationError(problem)
    if trainer.model is None:
        raise IntegrationError("The trainer has no model yet; call enable_hft after creating it with a model.")
    wrapped = getattr(trainer, "model_wrapped", None)
    if wrapped is not None and (type(wrapped).__name__ in _DISTRIBUTED_WRAPPERS or is_fsdp2_module(wrapped)):
        raise IntegrationError(
            f"The trainer already wrapped its model in {type(wrapped).__name__}, which fixed the set of trained "
            "tensors. Call enable_hft before the first trainer.train(), or create a new Trainer."
        )


def build_config(config: "HFTConfig | Mapping[str, Any] | None", options: Mapping[str, Any]) -> HFTConfig:
    if config is None:
        return HFTConfig.from_dict(options)
    if isinstance(config, HFTConfig):
        return HFTConfig.from_dict(options, base=config) if options else config
    if isinstance(config, Mapping):
        return HFTConfig.from_dict({**config, **options})
    raise ConfigError(f"config={config!r} is not an HFTConfig or a dict of HFT options (ratio, round, ...).")


def settle_optimizer(trainer, run: "HFTRun") -> None:
    """A trainer's optimizer that does not fit the round is dropped with its scheduler (the Trainer
    builds both again); one passed to the Trainer is refused (:meth:`HFTRun.settle`). DeepSpeed builds
    its optimizer from its config: nothing to settle."""
    optimizer = trainer.optimizer
    if optimizer is None or getattr(trainer, "is_deepspeed_enabled", False):
        return
    if run.settle(optimizer, given=trainer.callback_handler.optimizer is optimizer):
        drop_optimizer(trainer, run)


def drop_optimizer(trainer, run: "HFTRun") -> None:
    run.release(trainer.optimizer)
    trainer.optimizer = None
    trainer.lr_scheduler = None


def resolve_checkpoint(trainer, resume) -> str | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
    return str(resume)


def shards(trainer) -> bool:
    """Gradients live in flat partitions (DeepSpeed ZeRO) or shards (FSDP): partly trained
    tensors train through the gradient mask there, not region parameters."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))
