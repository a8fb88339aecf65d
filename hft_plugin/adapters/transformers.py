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
  their selections, the summary is logged and the manifest written; after it, the masks of fused
  tensors are attached to the optimizer.
* Fused tensors (Phi-3's ``qkv_proj``, ``gate_up_proj``) are masked once per optimizer step
  before gradient clipping. Under DeepSpeed ``param.grad`` is not where gradients live, so the
  mask is a gradient hook on the parameter instead, applied before ZeRO reduces the gradient.

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

import torch

from ..checkpoints import check_checkpoint
from ..config import HFTConfig
from ..distributed import check_ranks_agree
from ..errors import ConfigError, HFTError, IntegrationError, SelectionMismatchError
from ..freeze import HFTHandle, apply_selection
from ..report import stats_metrics
from ..selection import Selection, select_half
from .base import Adapter, patch, unpatch
from .deepspeed import ZeroGradientMasks, check_zero_optimizer

logger = logging.getLogger("hft_plugin")

# Wrappers that have already split the model across processes: changing requires_grad under them
# is silently wrong (DDP does not reduce newly trainable gradients, ZeRO keeps updating newly
# frozen ones), so HFT must be enabled before they exist.
_DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")

# trainer -> its session; weak so a dropped trainer takes its session with it
_SESSIONS: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
# trainers on which disable_hft was called: zero-code activation leaves them alone
_OPTED_OUT: "weakref.WeakSet[Any]" = weakref.WeakSet()


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


def _unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer (and similar ``.optimizer`` shells)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


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
        self.trainer = trainer
        self.config = config
        self.selection = selection
        self.handle: HFTHandle | None = None
        self._wrapped: dict[str, Any] = {}
        self._zero_masks = ZeroGradientMasks()
        self._input_grads_enabled = False
        self._attached_to: Any = None
        self._agreed_digest: str | None = None
        self._pruned: list[tuple[Any, int, list]] = []
        self._report_metrics = False
        self._in_prepare = False

    # -- turning on and off --------------------------------------------------------------------------
    def start(self) -> HFTHandle:
        self.handle = apply_selection(self.trainer.model, self.selection)
        _SESSIONS[self.trainer] = self
        if self.trainer.optimizer is not None:
            removed = self.prune_optimizer(self.trainer.optimizer)
            logger.warning(
                "hft_plugin: the trainer already had an optimizer; it was rebuilt to own only the trainable "
                "half (%d frozen tensors and their state removed). Call enable_hft before creating the "
                "optimizer to avoid this.", removed,
            )
        for name, make in (
            ("train", self._wrap_train),
            ("_prepare_for_training", self._wrap_prepare),
            ("create_optimizer", self._wrap_create_optimizer),
            ("save_model", self._wrap_save_model),
            ("log", self._wrap_log),
            ("_clip_grad_norm", self._wrap_mask_first),
            ("_get_grad_norm", self._wrap_mask_before_norm),
        ):
            original = getattr(self.trainer, name, None)
            if original is None:
                continue
            self._wrapped[name] = self.trainer.__dict__.get(name, _MISSING)
            setattr(self.trainer, name, functools.wraps(original)(make(original)))
        return self.handle

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
        for optimizer, index, params in reversed(self._pruned):
            if index < len(optimizer.param_groups):
                optimizer.param_groups[index]["params"] = params
        self._pruned.clear()
        if self.handle is not None:
            self.handle.remove()
        if _SESSIONS.get(self.trainer) is self:
            del _SESSIONS[self.trainer]

    # -- the wrappers --------------------------------------------------------------------------------
    def _wrap_train(self, original: Callable) -> Callable:
        def train(resume_from_checkpoint=None, *args, **kwargs):
            # Checked before the trainer loads the checkpoint's weights into the model.
            self.check_resume(_resolve_checkpoint(self.trainer, resume_from_checkpoint))
            return original(resume_from_checkpoint, *args, **kwargs)
        return train

    def _wrap_prepare(self, original: Callable) -> Callable:
        def _prepare_for_training(*args, **kwargs):
            return self.prepare(original, args, kwargs)
        return _prepare_for_training

    def _wrap_create_optimizer(self, original: Callable) -> Callable:
        def create_optimizer(*args, **kwargs):
            optimizer = original(*args, **kwargs)
            if optimizer is not None and self.prune_optimizer(optimizer):
                logger.warning("hft_plugin: %s put frozen tensors in the optimizer; they were removed.",
                               type(self.trainer).__name__)
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
            self.handle = apply_selection(model, self.selection)
            self._attached_to = None
            self._zero_masks.remove()
        elif self.handle.removed:
            # Another trainer applied its own round to this model object; put ours back.
            self.handle = apply_selection(model, self.selection)
            self._attached_to = None
        self.check_resume(_resolve_checkpoint(trainer, resume))
        if getattr(trainer, "is_fsdp_enabled", False) and self.handle.masked_parameters:
            raise IntegrationError(
                f"{len(self.handle.masked_parameters)} fused tensors (e.g. {next(iter(self.handle.masked_parameters))}) "
                "are trained in part, which needs gradient masks that FSDP's sharded gradients do not support "
                "yet. Use DDP or DeepSpeed, or strategy='layer' (whole layers, no masks)."
            )
        self.check_ranks_agree()
        if getattr(trainer, "is_deepspeed_enabled", False):
            self._zero_masks.install(self.handle)
        self._enable_input_grads_if_needed()
        if trainer.optimizer is not None:
            self.prune_optimizer(trainer.optimizer)
        if trainer.is_world_process_zero():
            logger.info("hft_plugin: training %s with Half Fine-Tuning\n%s", type(trainer).__name__, self.selection.summary())
        if trainer.args.should_save:
            self.selection.save(trainer.args.output_dir)
        self._report_metrics = True

    def after_prepare(self) -> None:
        trainer = self.trainer
        if getattr(trainer, "is_deepspeed_enabled", False):
            check_zero_optimizer(getattr(trainer.model_wrapped, "optimizer", None), self.handle)
            return
        optimizer = _unwrap_optimizer(trainer.optimizer)
        if optimizer is None:
            return
        self.prune_optimizer(optimizer)
        if self.handle.masked_parameters and self._attached_to is not optimizer:
            self.handle.attach(optimizer)
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
        self.handle = apply_selection(self.trainer.model, resumed)
        self._attached_to = None

    def check_ranks_agree(self) -> None:
        """Every rank must train the same half: compare a digest once per selection."""
        self._agreed_digest = check_ranks_agree(self.selection, self._agreed_digest)

    def prune_optimizer(self, optimizer) -> int:
        """Drop frozen tensors (and their state) from ``optimizer``'s groups, in place so a scheduler
        bound to it keeps working. Returns how many were removed."""
        optimizer = _unwrap_optimizer(optimizer)
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            return 0
        removed = 0
        for index, group in enumerate(groups):
            params = group["params"]
            kept = [p for p in params if not isinstance(p, torch.Tensor) or p.requires_grad]
            if len(kept) != len(params):
                # by index: accelerate's load_state_dict replaces the group dicts
                self._pruned.append((optimizer, index, list(params)))
                for p in params:
                    if isinstance(p, torch.Tensor) and not p.requires_grad:
                        optimizer.state.pop(p, None)
                        removed += 1
                group["params"] = kept
        return removed

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
    if wrapped is not None and type(wrapped).__name__ in _DISTRIBUTED_WRAPPERS:
        raise IntegrationError(
            f"The trainer already wrapped its model in {type(wrapped).__name__}, which fixed the set of trained "
            "tensors. Call enable_hft before the first trainer.train(), or create a new Trainer."
        )


def enable_hft(trainer, config: "HFTConfig | Mapping[str, Any] | None" = None, **options: Any) -> HFTHandle:
    """Half fine-tune ``trainer.model``: freeze the half that does not train in this round.

    Works on ``transformers.Trainer`` and its subclasses (TRL's SFT, DPO, GRPO, Reward, KTO
    trainers). Call it before ``trainer.train()``; if the trainer already has an optimizer, the
    frozen tensors are removed from it (with a warning). A second call warns and changes nothing.

    Args:
        trainer: the trainer whose model (the policy) is half fine-tuned. Reference, reward and
            value models are never touched.
        config: an :class:`HFTConfig` or a dict of its options; ``options`` override it.
        **options: HFTConfig's options: ratio, strategy, round, seed, train_embeddings.

    Returns:
        The :class:`~hft_plugin.freeze.HFTHandle`; ``handle.selection`` says what trains.

    Raises:
        IntegrationError: not a Trainer, or a model already wrapped by DDP/DeepSpeed.
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
    cfg = _build_config(config, options)
    _OPTED_OUT.discard(trainer)
    existing = _SESSIONS.get(trainer)
    if existing is not None:
        note = "" if cfg == existing.config else f" (the new options {cfg.to_dict()} were ignored)"
        logger.warning("hft_plugin: HFT is already enabled on this trainer; nothing changed%s. Call disable_hft "
                       "first to change it.", note)
        return existing.handle
    selection = select_half(trainer.model, config=cfg)  # refuses PEFT, quantized, unreadable models
    return _Session(trainer, cfg, selection).start()


def disable_hft(trainer) -> bool:
    """Undo :func:`enable_hft`: every ``requires_grad`` flag back, hooks and wrappers removed.

    An optimizer HFT trimmed gets its tensors back. Returns False (changing nothing) if HFT was
    not enabled on ``trainer``. Zero-code activation (``TransformersAdapter``) leaves a trainer
    alone once ``disable_hft`` was called on it, so this also opts one trainer out of ``HFT_ENABLE``. A model already wrapped by DDP/DeepSpeed stays as it was wrapped:
    build a new Trainer to train the whole model.
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
    config: HFTConfig | None = None


def _auto_enable(trainer) -> "_Session | None":
    config = _AutoState.config
    if config is None:
        return None
    session = _SESSIONS.get(trainer)
    if session is not None or trainer in _OPTED_OUT:
        return session
    try:
        enable_hft(trainer, config)
    except HFTError as exc:
        raise IntegrationError(
            f"HFT was requested for every trainer but cannot be applied to {type(trainer).__name__}: {exc} "
            "Training stops here rather than fine-tune the whole model; unset HFT_ENABLE to train without HFT."
        ) from exc
    return _SESSIONS[trainer]


def _auto_train(wrapped, instance, args, kwargs):
    session = _auto_enable(instance)
    if session is not None:
        # Here, not later, so a mismatched checkpoint is refused before its weights are loaded.
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        session.check_resume(_resolve_checkpoint(instance, resume))
    return wrapped(*args, **kwargs)


def _auto_prepare(wrapped, instance, args, kwargs):
    session = _auto_enable(instance)
    if session is None or session._in_prepare:
        return wrapped(*args, **kwargs)
    return session.prepare(wrapped, args, kwargs)


class TransformersAdapter(Adapter):
    """Half fine-tune every ``transformers.Trainer`` (and TRL trainer) a program creates, with no
    change to its code. The start-up machinery (``HFT_ENABLE``) calls::

        TransformersAdapter().instrument(config={"round": 1})

    ``config`` is an HFTConfig or a dict of its options (passed to the constructor or to
    ``instrument``). Each trainer gets HFT when its ``train()`` starts; a trainer that already
    called :func:`enable_hft` keeps its own options. If HFT cannot be applied (a PEFT model, an
    unreadable architecture, a model already wrapped), training stops with an IntegrationError:
    a silent full fine-tune is never the fallback.

    Example:
        >>> adapter = TransformersAdapter(config={"ratio": 0.5})
        >>> adapter.instrument()
        True
        >>> adapter.uninstrument()
    """

    name = "transformers"
    instruments = ("transformers >= 5.3",)
    _TARGETS = (("Trainer.train", _auto_train), ("Trainer._prepare_for_training", _auto_prepare))

    def __init__(self, config: "HFTConfig | Mapping[str, Any] | None" = None, **options: Any) -> None:
        super().__init__()
        self.config = _build_config(config, options)

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
            patch("transformers.trainer", path, wrapper)
        _AutoState.config = self.config

    def _uninstrument(self) -> None:
        for path, _ in self._TARGETS:
            unpatch("transformers.trainer", path)
        _AutoState.config = None
