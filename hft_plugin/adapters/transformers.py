"""Half Fine-Tuning for ``transformers.Trainer`` and every trainer built on it.

TRL's SFT, DPO, GRPO, Reward and KTO trainers subclass ``transformers.Trainer`` and leave its
set-up path alone, so one integration serves them all::

    from hft_plugin import enable_hft
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds)
    enable_hft(trainer, round=0)      # freezes the half that does not train
    trainer.train()

What happens where:

* ``enable_hft`` checks everything (trainer type, PEFT, config keys, a model already wrapped for
  distributed training), then freezes the half of ``trainer.model`` that does not train, before
  any optimizer, DDP or DeepSpeed wrapper exists. Only the policy is touched: reference, reward
  and value models are other objects.
* ``Trainer._prepare_for_training`` (the one method every optimizer path goes through: the
  trainer's own ``create_optimizer``, DeepSpeed's config optimizer through ``DummyOptim``,
  ZeRO-2/3) is wrapped: before it, a resumed checkpoint's selection is checked, the ranks compare
  their selections, an optimizer that does not fit the round is rebuilt (or, if it was passed to
  the Trainer, refused), the summary is logged and the manifest written; after it, the optimizer
  is checked and attached to the handle.
* Partly trained fused tensors (Phi-3's ``qkv_proj``, MoE expert stacks) train through region
  parameters (:mod:`hft_plugin.regions`): the optimizer the Trainer's own ``create_optimizer``
  builds gets them in place of their tensors, in the tensors' weight-decay groups. Under DeepSpeed ZeRO (flat gradient partitions) they keep the
  gradient mask instead, as a gradient hook applied before ZeRO reduces the gradient. Under FSDP2
  they keep the mask too, on each rank's shard, and the handle follows the DTensor parameters that
  accelerate's ``fully_shard`` puts in place (:mod:`hft_plugin.adapters.fsdp`).

``TransformersAdapter`` patches ``Trainer`` at class level so HFT reaches trainers a program
builds itself (a CLI started with ``HFT_ENABLE=1``); it fails loudly rather than train the whole
model when HFT was asked for and cannot be applied.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import Any, Callable, Mapping

from ..checkpoints import check_checkpoint, load_renamed
from ..config import HFTConfig
from ..distributed import check_ranks_agree
from ..errors import (ConfigError, HFTError, IntegrationError, OptimizerMismatchError, SelectionMismatchError,
                      UnsupportedModelError)
from ..freeze import HFTHandle, apply_selection
from ..optimizers import drop_frozen, unfuse_strided, unwrap
from ..report import stats_metrics, train_start_summary
from ..selection import Selection, applied_counts, select_half
from ..sharing import FSDP, SharedReference, keep_shared, share_option, unshareable_reason
from .base import Adapter, patch, unpatch
from .deepspeed import ZeroGradientMasks, check_zero_optimizer
from .fsdp import check_fsdp, fsdp_plugin, is_fsdp2_module

logger = logging.getLogger("hft_plugin")

# Wrappers that have already split the model across processes: changing requires_grad under them
# is silently wrong (DDP does not reduce newly trainable gradients, ZeRO keeps updating newly
# frozen ones), so HFT must be enabled before they exist.
_DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")

# trainer -> its session; weak so a dropped trainer takes its session with it
_SESSIONS: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
# trainers on which disable_hft was called: zero-code activation leaves them alone
_OPTED_OUT: "weakref.WeakSet[Any]" = weakref.WeakSet()
# optimizers a trainer's create_optimizer built while HFT was on: HFT may drop and rebuild them
_BUILT: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _trainer_class():
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - transformers is a hard requirement of this adapter
        raise IntegrationError("enable_hft needs transformers: pip install 'hft-plugin[trl]'.") from exc
    return Trainer


def _build_config(config: "HFTConfig | Mapping[str, Any] | None", options: Mapping[str, Any]) -> HFTConfig:
    if config is None:
        return HFTConfig.from_dict(options)
    if isinstance(config, HFTConfig):
        return HFTConfig.from_dict(options, base=config) if options else config
    if isinstance(config, Mapping):
        return HFTConfig.from_dict({**config, **options})
    raise ConfigError(f"config={config!r} is not an HFTConfig or a dict of HFT options (ratio, round, ...).")


def _resolve_checkpoint(trainer, resume) -> str | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
    return str(resume)


class _Session:
    """HFT on one trainer: the selection, the handle, and the wrappers on the trainer instance."""

    def __init__(self, trainer, config: HFTConfig, selection: Selection):
        # weak: _SESSIONS is keyed by the trainer, and the trainer keeps its session alive through
        # the wrapped methods; a strong reference would keep every trainer (and model) forever
        self._trainer = weakref.ref(trainer)
        self.config = config
        self.selection = selection
        self.handle: HFTHandle | None = None
        self._wrapped: dict[str, Any] = {}
        self._zero_masks = ZeroGradientMasks()
        self._input_grads_enabled = False
        self._attached_to: Any = None
        self._agreed_digest: str | None = None
        self._report_metrics = False
        self._in_prepare = False
        # (checkpoint, selection) checked in the train() call under way: the instance wrapper, the
        # class-level patch of zero-code activation and the prepare step each reach the same checks
        self._checked: tuple[str | None, Selection] | None = None
        self.automatic = False  # started by zero-code activation
        self.requested: HFTConfig = config  # the options asked for (round="next" unresolved)
        self.share_reference = True
        self.sharing: SharedReference | None = None

    @property
    def trainer(self):
        return self._trainer()

    # -- turning on and off --------------------------------------------------------------------------
    def start(self) -> HFTHandle:
        self.handle = self.apply(self.selection)
        try:
            self.settle_optimizer()
        except HFTError:
            self.handle.remove()  # the model as it was
            raise
        _SESSIONS[self.trainer] = self
        self.sharing = _reference_sharing(self)
        for name, make in (
            ("train", self._wrap_train),
            ("_prepare_for_training", self._wrap_prepare),
            ("create_optimizer", self._wrap_create_optimizer),
            ("save_model", self._wrap_save_model),
            ("log", self._wrap_log),
            ("create_model_card", self._wrap_model_card),
        ):
            self._wrap(name, make)
        self._wrap_clipping_if_masked()
        return self.handle

    def apply(self, selection: Selection) -> HFTHandle:
        """Apply ``selection``: region parameters, or, where gradients live in flat partitions
        (DeepSpeed ZeRO) or in shards (FSDP), the gradient mask for partly trained tensors."""
        sharded = getattr(self.trainer, "is_deepspeed_enabled", False) or getattr(self.trainer, "is_fsdp_enabled", False)
        return apply_selection(self.trainer.model, selection, partial="mask" if sharded else "auto")

    def _wrap(self, name: str, make: Callable) -> None:
        original = getattr(self.trainer, name, None)
        if original is None or name in self._wrapped:
            return
        self._wrapped[name] = self.trainer.__dict__.get(name, _MISSING)
        setattr(self.trainer, name, functools.wraps(original)(make(original)))

    def _wrap_clipping_if_masked(self) -> None:
        # Region parameters need nothing at clipping time; mask-mechanism tensors are masked before
        # the norm is taken (outside DeepSpeed, whose gradient hooks mask them earlier).
        if self.handle.masked_parameters and not getattr(self.trainer, "is_deepspeed_enabled", False):
            self._wrap("_clip_grad_norm", self._wrap_mask_first)
            self._wrap("_get_grad_norm", self._wrap_mask_before_norm)

    def settle_optimizer(self) -> None:
        """The optimizer of a round owns exactly that round's trainable elements. A trainer's
        optimizer that does not fit is dropped with its scheduler (the Trainer builds both again);
        one passed to the Trainer (``optimizers=(opt, sched)``) is refused, naming what is missing
        or extra."""
        trainer = self.trainer
        optimizer = trainer.optimizer
        if optimizer is None or getattr(trainer, "is_deepspeed_enabled", False):
            return
        fit = self.handle.optimizer_fit(optimizer)
        if fit:
            return
        if unwrap(optimizer) not in _BUILT and trainer.callback_handler.optimizer is optimizer:  # given by the user
            raise OptimizerMismatchError(
                f"{fit.message()} The optimizer given to the Trainer (optimizers=(...)) cannot be used for HFT round "
                f"{self.selection.config.round}: pass one built from handle.parameters() of this round, or none "
                "(set trainer.optimizer = trainer.lr_scheduler = None) to let the Trainer build it."
            )
        self._drop_optimizer()
        logger.warning("hft_plugin: the trainer's optimizer did not fit HFT round %d (it %s); the Trainer builds a new "
                       "optimizer and scheduler for this round.", self.selection.config.round,
                       fit.problems() or "runs a fused kernel over strided regions")

    def _drop_optimizer(self) -> None:
        if self.handle is not None and self.trainer.optimizer is not None:
            self.handle.detach(self.trainer.optimizer)
        self.trainer.optimizer = None
        self.trainer.lr_scheduler = None
        self._attached_to = None

    def stop(self) -> None:
        for name, previous in self._wrapped.items():
            if previous is _MISSING:
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, previous)
        self._wrapped.clear()
        self._zero_masks.remove()
        if self._input_grads_enabled:
            model = self.handle.model if self.handle is not None else None
            if model is not None and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
            self._input_grads_enabled = False
        optimizer = self.trainer.optimizer
        if optimizer is not None and unwrap(optimizer) in _BUILT:
            # It owns only this round's half: the next train() builds one for what trains then.
            self._drop_optimizer()
            logger.info("hft_plugin: HFT disabled; the next train() builds a new optimizer and scheduler.")
        elif optimizer is not None and not getattr(self.trainer, "is_deepspeed_enabled", False):
            logger.warning("hft_plugin: HFT disabled, but the optimizer given to the Trainer owns only the half that "
                           "trained with HFT; give the Trainer a new optimizer to train the whole model.")
        if self.handle is not None:
            self.handle.remove()  # a shared reference gets its own copy back first
        self.sharing = None
        if _SESSIONS.get(self.trainer) is self:
            del _SESSIONS[self.trainer]

    # -- the wrappers --------------------------------------------------------------------------------
    def _wrap_train(self, original: Callable) -> Callable:
        def train(resume_from_checkpoint=None, *args, **kwargs):
            self._checked = None
            try:
                self.before_train(_resolve_checkpoint(self.trainer, resume_from_checkpoint))
                return original(resume_from_checkpoint, *args, **kwargs)
            finally:
                self._checked = None
        return train

    def before_train(self, checkpoint: str | None) -> None:
        """Before the trainer loads ``checkpoint``'s weights into the model: refuse a checkpoint of
        another selection, and unshare what loading would change. Once per train() call."""
        if self._checked is not None and self._checked[0] == checkpoint and self._checked[1] is self.selection:
            return
        self.check_resume(checkpoint)
        _reference_before_load(self, checkpoint)
        self._checked = (checkpoint, self.selection)

    def _wrap_prepare(self, original: Callable) -> Callable:
        def _prepare_for_training(*args, **kwargs):
            return self.prepare(original, args, kwargs)
        return _prepare_for_training

    def _wrap_create_optimizer(self, original: Callable) -> Callable:
        def create_optimizer(*args, **kwargs):
            optimizer = original(*args, **kwargs)
            if optimizer is not None:
                _BUILT.add(unwrap(optimizer))
                self.handle.own_regions(optimizer)
                if drop_frozen(optimizer):
                    logger.warning("hft_plugin: %s put frozen tensors in the optimizer; they were removed.",
                                   type(self.trainer).__name__)
                trainable = {id(p): n for n, p in self.handle.named_parameters()}
                strided = unfuse_strided(optimizer, trainable)
                if strided:
                    logger.info("hft_plugin: %d trainable regions are strided views (e.g. %s); the optimizer groups "
                                "holding them run without fused kernels.", len(strided), strided[0])
            return optimizer
        return create_optimizer

    def _wrap_save_model(self, original: Callable) -> Callable:
        def save_model(output_dir=None, *args, **kwargs):
            result = original(output_dir, *args, **kwargs)
            if self.trainer.args.should_save:
                self.selection.save(output_dir or self.trainer.args.output_dir)
            return result
        return save_model

    def _wrap_log(self, original: Callable) -> Callable:
        def log(logs, *args, **kwargs):
            if self._report_metrics and isinstance(logs, dict):
                logs.update(stats_metrics(self.selection))
                self._report_metrics = False
            return original(logs, *args, **kwargs)
        return log

    def _wrap_model_card(self, original: Callable) -> Callable:
        def create_model_card(*args, **kwargs):
            return _write_model_card(self.trainer, self.selection, self.handle, original, args, kwargs)
        return create_model_card

    def _wrap_mask_first(self, original: Callable) -> Callable:
        def with_mask(*args, **kwargs):
            self.mask_gradients()
            return original(*args, **kwargs)
        return with_mask

    def _wrap_mask_before_norm(self, original: Callable) -> Callable:
        def with_mask(model, grad_norm=None, *args, **kwargs):
            if grad_norm is None:  # not clipped this step (max_grad_norm=0): the norm is measured here
                self.mask_gradients()
            return original(model, grad_norm, *args, **kwargs)
        return with_mask

    # -- what happens before and after the trainer builds its optimizer ------------------------------
    def prepare(self, original: Callable, args: tuple, kwargs: dict):
        if self._in_prepare:  # the class-level patch and the instance wrapper both lead here
            return original(*args, **kwargs)
        self._in_prepare = True
        try:
            resume = kwargs.get("resume_from_checkpoint", args[2] if len(args) > 2 else None)
            self.before_prepare(resume)
            result = original(*args, **kwargs)
            self.after_prepare()
            return result
        finally:
            self._in_prepare = False

    def before_prepare(self, resume: str | None) -> None:
        trainer = self.trainer
        model = trainer.model
        if self.handle is None or self.handle.model is not _unwrapped(model):
            # model_init built a new model inside train(): select on it, same config.
            self.selection = select_half(model, config=self.config)
            self.handle = self.apply(self.selection)
            self._attached_to = None
            self._zero_masks.remove()
        elif self.handle.removed:
            # Another trainer applied its own round to this model object; put ours back.
            self.handle = self.apply(self.selection)
            self._attached_to = None
        checkpoint = _resolve_checkpoint(trainer, resume)
        if self._checked is None or self._checked[0] != checkpoint or self._checked[1] is not self.selection:
            self.check_resume(checkpoint)  # e.g. model_init built a new model and selection inside train()
        sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
        if checkpoint is not None and not sharded:  # the Trainer loaded the checkpoint just before this step
            load_renamed(_unwrapped(model), checkpoint,
                         before_write=self.sharing.unshare if self.sharing is not None and self.sharing.active else None)
        self.sharing = _reference_sharing(self)
        if getattr(trainer, "is_fsdp_enabled", False):
            check_fsdp(fsdp_plugin(trainer.accelerator), self.handle)
        self.check_ranks_agree()
        if getattr(trainer, "is_deepspeed_enabled", False):
            self._zero_masks.install(self.handle)
        self._enable_input_grads_if_needed()
        self._wrap_clipping_if_masked()
        self.settle_optimizer()
        if trainer.is_world_process_zero():
            # WARNING, the level transformers and TRL use for what a user must see at their default
            # verbosity: with logging unconfigured, Python's last-resort handler prints it to stderr.
            logger.warning("hft_plugin: %s trains with Half Fine-Tuning\n%s", type(trainer).__name__,
                           train_start_summary(self.selection, self.handle,
                                               self.sharing.report.summary() if self.sharing else "",
                                               *_replay_lines(trainer)))
        if trainer.args.should_save:
            self.selection.save(trainer.args.output_dir)
        self._report_metrics = True

    def after_prepare(self) -> None:
        trainer = self.trainer
        if self.sharing is not None:
            self.sharing.check()  # preparing may have moved or cast the policy's tensors
        if getattr(trainer, "is_deepspeed_enabled", False):
            check_zero_optimizer(getattr(trainer.model_wrapped, "optimizer", None), self.handle)
            return
        optimizer = unwrap(trainer.optimizer)
        if optimizer is None:
            return
        if self._attached_to is not optimizer:
            self.handle.attach(optimizer)  # refuses an optimizer that does not fit the round
            self._attached_to = optimizer
        else:
            # Weights may have been loaded since the last run (a resumed checkpoint): restore
            # the frozen slices to what they are now, not to what they were then.
            self.handle.refresh()

    def mask_gradients(self) -> None:
        if self.handle is not None:
            self.handle.mask_gradients()

    # -- the checks ----------------------------------------------------------------------------------
    def check_resume(self, checkpoint: str | None) -> None:
        """Refuse a checkpoint written by another model, round or HFT configuration (before its
        weights are loaded); resume with the checkpoint's half if it drew another one."""
        if checkpoint is None:
            return
        resumed = check_checkpoint(checkpoint, self.selection)
        if resumed is self.selection:
            return
        if self.trainer.optimizer is not None:
            raise SelectionMismatchError(
                f"{checkpoint} trained another half than this installation selects for the same options, and "
                "this trainer's optimizer already exists. Create a new Trainer, enable HFT, and resume."
            )
        logger.warning("hft_plugin: %s trained another half than this installation selects for the same "
                       "options; resuming with the checkpoint's half.", checkpoint)
        self.selection = resumed
        self.handle = self.apply(resumed)
        self._attached_to = None

    def check_ranks_agree(self) -> None:
        """Every rank must train the same half: compare a digest once per selection."""
        self._agreed_digest = check_ranks_agree(self.selection, self._agreed_digest)

    def _enable_input_grads_if_needed(self) -> None:
        """Reentrant checkpointing gives layer weights no gradient when nothing before them requires
        grad; with frozen embeddings that is every layer, so make the embeddings' output require it."""
        model = self.handle.model
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers before the rename
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if self._input_grads_enabled or not checkpointing:
            return
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
            return
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            return  # the trainer (e.g. for PEFT) or the user already did it
        model.enable_input_require_grads()
        self._input_grads_enabled = True


_MISSING = object()


def _unwrapped(model):
    from ..layouts.base import unwrap_model

    return unwrap_model(model)


def _write_model_card(trainer, selection: Selection, handle: "HFTHandle | None", original: Callable, args: tuple,
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
                               base_model=base_model_name(_unwrapped(trainer.model)))
    return result


def _refuse_peft(trainer) -> None:
    """A trainer given ``peft_config`` wraps its model in PEFT adapters: say that the two are
    alternatives, before anything changes."""
    from ..layouts.base import is_peft

    model = _unwrapped(trainer.model)
    if is_peft(model):
        raise UnsupportedModelError(
            f"{type(trainer).__name__}'s model is a {type(model).__name__} (PEFT adapters, e.g. LoRA from the "
            "trainer's peft_config). HFT and LoRA are alternatives: drop peft_config (in `trl sft`, drop --use_peft) "
            "and HFT trains half of the base model's own weights; to keep trained adapters, merge them first "
            "(model.merge_and_unload())."
        )


# -- the reference model shares the policy's frozen half (hft_plugin.sharing) ---------------------------
def _sharing_declined(trainer, enabled: bool) -> str | None:
    """Why this trainer's reference must keep its own copy, in one line, or None."""
    if not enabled:
        return "turned off (share_reference=False or HFT_SHARE_REFERENCE=0)"
    if getattr(trainer, "is_fsdp_enabled", False):
        return FSDP
    if getattr(trainer, "is_deepspeed_enabled", False):
        return unshareable_reason(trainer.model, trainer.ref_model) or (
            "DeepSpeed owns the policy's tensors (it casts, moves and broadcasts them in place when training starts)")
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", ())
    if getattr(trainer.args, "sync_ref_model", False) or any(type(c).__name__ == "SyncRefModelCallback" for c in callbacks):
        return "the trainer syncs the policy into the reference (sync_ref_model), which writes into its tensors"
    return None


def _reference_sharing(session: "_Session") -> SharedReference | None:
    """The trainer's ``ref_model`` (TRL's DPO, KTO, GRPO, ... and any trainer exposing one) shares
    the policy's frozen half, or keeps sharing it; checked each time a training run starts."""
    reference = getattr(session.trainer, "ref_model", None)
    if reference is None:
        return None
    declined = _sharing_declined(session.trainer, session.share_reference)
    return keep_shared(session.sharing, session.handle, reference, declined=declined)


def _reference_before_load(session: "_Session", checkpoint: str | None) -> None:
    if checkpoint is not None and session.sharing is not None:
        session.sharing.before_load(checkpoint)  # loading writes into the policy's (shared) tensors


def _replay_lines(trainer) -> list[str]:
    """Replay's line in the train-start block (hft_plugin.adapters.trainer_replay), if it is on."""
    import sys

    module = sys.modules.get("hft_plugin.adapters.trainer_replay")  # never imported here: no replay, no line
    return module.summary_lines(trainer) if module is not None else []


def _check_trainer(trainer) -> None:
    Trainer = _trainer_class()
    if not isinstance(trainer, Trainer):
        raise IntegrationError(
            f"enable_hft needs a transformers.Trainer (or a TRL trainer), got {type(trainer).__name__}. For a "
            "model and your own loop use select_half and apply_selection."
        )
    if not hasattr(Trainer, "_prepare_for_training"):
        import transformers

        raise IntegrationError(
            f"transformers {transformers.__version__} sets up training differently from the versions hft_plugin "
            "supports (it has no Trainer._prepare_for_training). Install transformers >= 5.3."
        )
    if trainer.model is None:
        raise IntegrationError("The trainer has no model yet; call enable_hft after creating it with a model.")
    wrapped = getattr(trainer, "model_wrapped", None)
    if wrapped is not None and (type(wrapped).__name__ in _DISTRIBUTED_WRAPPERS or is_fsdp2_module(wrapped)):
        raise IntegrationError(
            f"The trainer already wrapped its model in {type(wrapped).__name__}, which fixed the set of trained "
            "tensors. Call enable_hft before the first trainer.train(), or create a new Trainer."
        )


def enable_hft(trainer, config: "HFTConfig | Mapping[str, Any] | None" = None, *,
               share_reference: bool | None = None, **options: Any) -> HFTHandle:
    """Half fine-tune ``trainer.model``: freeze the half that does not train in this round.

    Works on ``transformers.Trainer`` and its subclasses (TRL's SFT, DPO, GRPO, Reward, KTO
    trainers). Call it before ``trainer.train()``. The optimizer of a round owns exactly that
    round's trainable elements: an optimizer the trainer already built that does not fit is
    dropped with its scheduler and built again (with a warning); one given to the Trainer
    (``optimizers=(opt, sched)``) that does not fit is refused. A second call warns and changes
    nothing.

    Args:
        trainer: the trainer whose model (the policy) is half fine-tuned. Reference, reward and
            value models are never touched.
        config: an :class:`HFTConfig` or a dict of its options; ``options`` override it.
        share_reference: let the trainer's reference model (``trainer.ref_model``: DPO, KTO, GRPO)
            share the policy's frozen tensors instead of holding its own copy (see
            :mod:`hft_plugin.sharing`). Default: ``HFT_SHARE_REFERENCE``, else True.
        **options: HFTConfig's options: ratio, strategy, round, seed, train_embeddings.

    Returns:
        The :class:`~hft_plugin.freeze.HFTHandle`; ``handle.selection`` says what trains.

    Raises:
        IntegrationError: not a Trainer, a model already wrapped by DDP/DeepSpeed/FSDP, or an FSDP1
            set-up that cannot train half a model (at ``train()``).
        OptimizerMismatchError: the optimizer given to the Trainer owns frozen tensors or lacks
            trainable ones (build it from ``handle.parameters()`` of this round).
        UnsupportedModelError: a PEFT-wrapped or quantized model.
        ConfigError: an unknown option (with the closest known one) or a bad value.

    Nothing on the model changes if an error is raised.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from hft_plugin import enable_hft
        >>> from hft_plugin.testing import tiny_model
        >>> trainer = Trainer(model=tiny_model("llama"), args=TrainingArguments("/tmp/hft-doc", report_to=[]))
        >>> handle = enable_hft(trainer, round=0)
        >>> handle.selection.trainable_ratio
        0.5
        >>> disable_hft(trainer)
        True
    """
    _check_trainer(trainer)
    _refuse_peft(trainer)
    cfg = _build_config(config, options)
    share = share_option(share_reference)
    _OPTED_OUT.discard(trainer)
    existing = _SESSIONS.get(trainer)
    if existing is not None:
        note = "" if cfg == existing.requested else f" (the new options {cfg.to_dict()} were ignored)"
        logger.warning("hft_plugin: HFT is already enabled on this trainer; nothing changed%s. Call disable_hft "
                       "first to change it.", note)
        return existing.handle
    selection = select_half(trainer.model, config=cfg)  # refuses PEFT, quantized, unreadable models
    # the session keeps the resolved options (round="next" is a number from here on), so a resumed
    # checkpoint is compared with the round that trains
    session = _Session(trainer, selection.config, selection)
    session.requested = cfg
    session.share_reference = share
    return session.start()


def disable_hft(trainer) -> bool:
    """Undo :func:`enable_hft`: every ``requires_grad`` flag back, hooks and wrappers removed.

    The optimizer and scheduler the trainer built under HFT own only that round's half: they are
    dropped, so the next ``train()`` builds new ones and trains the whole model (an optimizer you
    gave the Trainer is left to you, with a warning). Returns False (changing nothing) if HFT was
    not enabled on ``trainer``. Zero-code activation (``TransformersAdapter``) leaves a trainer
    alone once ``disable_hft`` was called on it, so this also opts one trainer out of
    ``HFT_ENABLE``. A model already wrapped by DDP/DeepSpeed stays as it was wrapped: build a new
    Trainer to train the whole model.
    """
    try:
        _OPTED_OUT.add(trainer)
    except TypeError:  # not a trainer at all: nothing to opt out
        pass
    session = _SESSIONS.get(trainer)
    if session is None:
        return False
    session.stop()
    return True


def hft_session(trainer) -> "_Session | None":
    """The HFT state of ``trainer``, if HFT is enabled on it."""
    return _SESSIONS.get(trainer)


# -- zero-code activation ------------------------------------------------------------------------------
class _AutoState:
    adapter: "TransformersAdapter | None" = None  # the newest instrumented adapter still active, if any
    adapters: "list[TransformersAdapter]" = []  # every active one, oldest first: the next in line


def _auto_config() -> HFTConfig | None:
    """The options for a trainer whose ``train()`` starts now: the adapter's own, or the ``HFT_*``
    variables read at this moment (None when ``HFT_ENABLE`` is now off; a malformed variable
    raises its ConfigError here, before the trainer changes anything)."""
    from ..bootstrap import env

    adapter = _AutoState.adapter
    if adapter.config is not None:
        return adapter.resolve_config()
    if adapter.watch_only and not env.is_enabled():
        return None  # armed by HFT_WATCH_FORGETTING alone: the monitor without HFT
    return env.training_config()


def _auto_enable(trainer) -> "_Session | None":
    if _AutoState.adapter is None or trainer in _OPTED_OUT:
        return _SESSIONS.get(trainer)
    session = _SESSIONS.get(trainer)
    if session is not None and (not session.automatic or session._in_prepare):
        return session  # the program called enable_hft itself (its options stand), or this train() did
    config = _auto_config()
    if session is not None:
        if config == session.requested:
            return session
        session.stop()  # the variables changed since this trainer last trained: a new round
    if config is None:
        return None
    try:
        enable_hft(trainer, config)
    except ConfigError:
        raise  # names the option or variable to fix; nothing was changed
    except HFTError as exc:
        raise IntegrationError(
            f"HFT was requested for every trainer but cannot be applied to {type(trainer).__name__}: {exc} "
            "Training stops here rather than fine-tune the whole model; unset HFT_ENABLE to train without HFT."
        ) from exc
    session = _SESSIONS[trainer]
    session.automatic, session.requested = True, config
    return session


def _auto_train(wrapped, instance, args, kwargs):
    session = _auto_enable(instance)
    from .watch import watch_from_environment

    # HFT_WATCH_FORGETTING: after HFT is applied (only the trainable half is kept), before a
    # checkpoint is loaded (the base is the model the run started from)
    watch_from_environment(instance)
    _auto_replay(instance)
    if session is not None:
        # Here, not later, so a mismatched checkpoint is refused before its weights are loaded.
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        session.before_train(_resolve_checkpoint(instance, resume))
        try:
            return wrapped(*args, **kwargs)
        finally:
            session._checked = None
    return wrapped(*args, **kwargs)


def _auto_replay(trainer) -> None:
    """``HFT_REPLAY``: replay on every trainer zero-code activation reaches (before its loader exists)."""
    from ..bootstrap import env

    settings = env.replay_settings()
    if settings is not None and trainer not in _OPTED_OUT:
        from .trainer_replay import auto_replay

        auto_replay(trainer, settings)


def _auto_prepare(wrapped, instance, args, kwargs):
    session = _auto_enable(instance)
    if session is None or session._in_prepare:
        return wrapped(*args, **kwargs)
    return session.prepare(wrapped, args, kwargs)


class TransformersAdapter(Adapter):
    """Half fine-tune every ``transformers.Trainer`` (and TRL trainer) a program creates, with no
    change to its code. The start-up machinery (``HFT_ENABLE``) calls::

        TransformersAdapter().instrument()

    ``config`` is an HFTConfig or a dict of its options (passed to the constructor or to
    ``instrument``); without one, the ``HFT_*`` variables are read each time a trainer's
    ``train()`` starts, so a program that changes ``HFT_ROUND`` between tasks trains each task's
    round (a trainer trained again under changed variables switches to the new options), and
    ``HFT_ENABLE=0`` at that moment trains without HFT. A trainer that called :func:`enable_hft`
    keeps its own options. With ``HFT_WATCH_FORGETTING`` set, each trainer also gets the forgetting
    monitor (:func:`hft_plugin.watch_forgetting`) when its ``train()`` starts; ``watch_only=True``
    (the start-up hook's choice when ``HFT_ENABLE`` is not set) applies HFT only while
    ``HFT_ENABLE`` is on. A malformed variable raises its ConfigError when ``train()`` starts. If
    HFT cannot be applied (a PEFT model, an unreadable architecture, a model already wrapped),
    training stops with an IntegrationError: a silent full fine-tune is never the fallback.

    Example:
        >>> adapter = TransformersAdapter(config={"ratio": 0.5})
        >>> adapter.instrument()
        True
        >>> adapter.uninstrument()
    """

    name = "transformers"
    instruments = ("transformers >= 5.3",)
    _TARGETS = (("Trainer.train", _auto_train), ("Trainer._prepare_for_training", _auto_prepare))

    def __init__(self, config: "HFTConfig | Mapping[str, Any] | None" = None, *, watch_only: bool = False,
                 **options: Any) -> None:
        super().__init__()
        self.config = _build_config(config, options) if config is not None or options else None
        # armed by HFT_WATCH_FORGETTING alone: HFT applies only while HFT_ENABLE is on
        self.watch_only = watch_only

    def _instrument(self, config: "HFTConfig | Mapping[str, Any] | None" = None, **options: Any) -> None:
        if config is not None or options:
            self.config = _build_config(config if config is not None else self.config, options)
        Trainer = _trainer_class()
        if not hasattr(Trainer, "_prepare_for_training"):
            import transformers

            raise IntegrationError(
                f"transformers {transformers.__version__} has no Trainer._prepare_for_training; hft_plugin "
                "supports transformers >= 5.3."
            )
        for path, wrapper in self._TARGETS:
            patch("transformers.trainer", path, wrapper, owner=self)
        _AutoState.adapters.append(self)
        _AutoState.adapter = self

    def _uninstrument(self) -> None:
        for path, _ in self._TARGETS:
            unpatch("transformers.trainer", path, owner=self)
        if self in _AutoState.adapters:
            _AutoState.adapters.remove(self)
        _AutoState.adapter = _AutoState.adapters[-1] if _AutoState.adapters else None
