"""Half Fine-Tuning for ``transformers.Trainer`` and every trainer built on it.

TRL's SFT, DPO, GRPO, Reward and KTO trainers subclass ``transformers.Trainer`` and leave its
set-up path alone, so one integration serves them all::

    from hft_plugin import enable_hft
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds)
    enable_hft(trainer, round=0)      # freezes the half that does not train
    trainer.train()

Each trainer gets a session (:class:`_Session`) that translates the trainer's events into calls
on the model's :class:`~hft_plugin.run.HFTRun`, which owns the selection, the checks, the
optimizer's fit, the manifest and the metrics. Zero-code activation (``HFT_ENABLE=1``) is
:class:`~hft_plugin.adapters.trainer_auto.TransformersAdapter`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Mapping

from ..bootstrap import env
from ..config import HFTConfig
from ..errors import HFTError
from ..freeze import HFTHandle
from ..run import HFTRun
from ..sharing import share_option
from . import compat
from .base import InstanceWrappers
from .fsdp import check_fsdp, fsdp_plugin
from .trainer_support import (build_config, check_trainer, drop_optimizer, refuse_peft, replay_lines,
                              resolve_checkpoint, settle_optimizer, share_reference, shards, write_model_card)

try:  # the base class only: without transformers, enable_hft refuses with the line to install it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a requirement of the trainer integration
    TrainerCallback = object  # type: ignore[misc,assignment]

logger = logging.getLogger("hft_plugin")

# trainer -> its session; weak so a dropped trainer takes its session with it
_SESSIONS: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
# trainers on which disable_hft was called: zero-code activation leaves them alone
_OPTED_OUT: "weakref.WeakSet[Any]" = weakref.WeakSet()


class _Metrics(TrainerCallback):
    """The run's stats in the first metrics logged after training starts (W&B, TensorBoard and the
    log history show them); first among the callbacks, so the reporters see what it adds."""

    def __init__(self, run: HFTRun):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        stats = self.run.metrics() if isinstance(logs, dict) else {}
        if stats:
            logs.update(stats)
            last = state.log_history[-1] if state.log_history else None  # the Trainer's copy of these logs
            if isinstance(last, dict) and last.get("step") == state.global_step:
                last.update(stats)


class _Session:
    """HFT on one trainer: translates the trainer's events into calls on its :class:`HFTRun`.

    ``enable_hft`` starts (or takes over) the run before any optimizer, DDP or DeepSpeed wrapper
    exists. The stats reach the logs through a ``TrainerCallback`` (:class:`_Metrics`). The other
    events have no callback, so the trainer's methods are wrapped (:class:`InstanceWrappers`, put
    back by :meth:`stop`): ``train`` (before a checkpoint's weights are loaded);
    ``_prepare_for_training``, which every optimizer path goes through (``create_optimizer``,
    DeepSpeed's ``DummyOptim``, ZeRO-2/3): before it the resumed checkpoint, the ranks and the
    optimizer are checked, after it the optimizer is attached; ``create_optimizer`` (the optimizer
    just built); ``save_model`` (every folder weights go to: ``on_save`` sees checkpoints only, not
    ``trainer.save_model(folder)``); ``create_model_card`` (TRL's card takes no tags from the model,
    and no event says a card was written); the gradient norm (:func:`compat.clipping_wrappers`).
    On the instance, not the class: TRL overrides ``create_model_card`` without calling the Trainer's.
    """

    def __init__(self, trainer, run: HFTRun):
        # weak: _SESSIONS is keyed by the trainer, and the trainer keeps its session alive through
        # the wrapped methods; a strong reference would keep every trainer (and model) forever
        self._trainer = weakref.ref(trainer)
        self.run = run
        self._wrappers = InstanceWrappers(trainer)
        self._in_prepare = False
        self.callback = _Metrics(run)
        self.automatic = False  # started by zero-code activation
        self.requested: HFTConfig = run.requested  # the options asked for (round="next" unresolved)

    trainer = property(lambda self: self._trainer())
    handle = property(lambda self: self.run.handle)
    selection = property(lambda self: self.run.selection)
    config = property(lambda self: self.run.config)
    sharing = property(lambda self: self.run.sharing)

    # -- turning on and off --------------------------------------------------------------------------
    def start(self) -> HFTHandle:
        try:
            settle_optimizer(self.trainer, self.run)
        except HFTError:
            self.run.stop()  # the model as it was
            raise
        self.run.claimed = True
        _SESSIONS[self.trainer] = self
        share_reference(self.trainer, self.run)
        for name, wrapper in (("train", self._train), (compat.PREPARE, self.prepare),
                              ("create_optimizer", self._create_optimizer), ("save_model", self._save_model),
                              ("create_model_card", self._create_model_card)):
            self._wrappers.wrap(name, wrapper)
        self.trainer.callback_handler.callbacks.insert(0, self.callback)  # before the reporters
        self._wrap_clipping_if_masked()
        return self.handle

    def _wrap_clipping_if_masked(self) -> None:
        # Region parameters need nothing at clipping time; mask-mechanism tensors are masked before
        # the norm is taken (outside DeepSpeed, whose gradient hooks mask them earlier).
        if self.handle.masked_parameters and not getattr(self.trainer, "is_deepspeed_enabled", False):
            for name, wrapper in compat.clipping_wrappers(self.run.mask_gradients).items():
                self._wrappers.wrap(name, wrapper)

    def stop(self) -> None:
        trainer = self.trainer
        self._wrappers.restore()
        if self.callback in trainer.callback_handler.callbacks:
            trainer.callback_handler.callbacks.remove(self.callback)
        deepspeed = getattr(trainer, "is_deepspeed_enabled", False)
        if self.run.release_on_stop(trainer.optimizer, owned_by_engine=deepspeed):
            drop_optimizer(trainer, self.run)
        self.run.stop()
        if _SESSIONS.get(trainer) is self:
            del _SESSIONS[trainer]

    # -- the wrappers (each gets the trainer's method it replaces first) ------------------------------
    def _train(self, original: Callable, resume_from_checkpoint=None, *args, **kwargs):
        self.run.reset_resume_check()
        try:
            self.before_train(resolve_checkpoint(self.trainer, resume_from_checkpoint))
            return original(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.run.reset_resume_check()

    def before_train(self, checkpoint: str | None) -> None:
        """Before the trainer loads ``checkpoint``'s weights into the model: refuse a checkpoint of
        another selection, and unshare what loading would change. Once per train() call."""
        self.run.check_resume_once(checkpoint, optimizer_exists=self.trainer.optimizer is not None, loading=True)

    def _create_optimizer(self, original: Callable, *args, **kwargs):
        optimizer = original(*args, **kwargs)
        if optimizer is not None:
            self.run.adopt(optimizer, type(self.trainer).__name__)
        return optimizer

    def _save_model(self, original: Callable, output_dir=None, *args, **kwargs):
        result = original(output_dir, *args, **kwargs)
        if self.trainer.args.should_save:
            self.run.save_manifest(output_dir or self.trainer.args.output_dir)
        return result

    def _create_model_card(self, original: Callable, *args, **kwargs):
        return write_model_card(self.trainer, self.selection, self.handle, original, args, kwargs)

    # -- what happens before and after the trainer builds its optimizer ------------------------------
    def prepare(self, original: Callable, *args, **kwargs):
        if self._in_prepare:  # the class-level patch and the instance wrapper both lead here
            return original(*args, **kwargs)
        self._in_prepare = True
        try:
            self.before_prepare(compat.prepare_resume(args, kwargs))
            result = original(*args, **kwargs)
            self.after_prepare()
            return result
        finally:
            self._in_prepare = False

    def before_prepare(self, resume: str | None) -> None:
        trainer, run = self.trainer, self.run
        run.follow(trainer.model)
        checkpoint = resolve_checkpoint(trainer, resume)
        # checked already in this train() call, unless model_init built a new model and selection inside it
        run.check_resume_once(checkpoint, optimizer_exists=trainer.optimizer is not None)
        if checkpoint is not None and not shards(trainer):  # the Trainer loaded the checkpoint just before this step
            run.load_checkpoint(checkpoint)
        share_reference(trainer, run)
        if getattr(trainer, "is_fsdp_enabled", False):
            check_fsdp(fsdp_plugin(trainer.accelerator), self.handle)
        run.check_ranks_agree()
        if getattr(trainer, "is_deepspeed_enabled", False):
            run.install_zero_masks()
        if compat.input_grads_needed(run.model):
            run.require_input_grads()
        self._wrap_clipping_if_masked()
        settle_optimizer(trainer, run)
        run.training_started(type(trainer).__name__ if trainer.is_world_process_zero() else None,
                             trainer.args.output_dir if trainer.args.should_save else None, replay_lines(trainer))

    def after_prepare(self) -> None:
        trainer = self.trainer
        self.run.check_sharing()
        if getattr(trainer, "is_deepspeed_enabled", False):
            self.run.check_zero_optimizer(getattr(trainer.model_wrapped, "optimizer", None))
        else:
            self.run.attach(trainer.optimizer)  # refuses an optimizer that does not fit the round


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
    check_trainer(trainer)
    refuse_peft(trainer)
    cfg = build_config(config, options)
    share = share_option(share_reference, env.share_reference() if share_reference is None else None)
    _OPTED_OUT.discard(trainer)
    existing = _SESSIONS.get(trainer)
    if existing is not None:
        note = "" if cfg == existing.requested else f" (the new options {cfg.to_dict()} were ignored)"
        logger.warning("hft_plugin: HFT is already enabled on this trainer; nothing changed%s. Call disable_hft "
                       "first to change it.", note)
        return existing.handle
    run = HFTRun.take_over(trainer.model, cfg, partial="mask" if shards(trainer) else "auto", share_reference=share)
    return _Session(trainer, run).start()


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


def __getattr__(name: str) -> Any:
    # zero-code activation lives in its own module; its adapter keeps the name the start-up hook uses
    if name == "TransformersAdapter":
        from .trainer_auto import TransformersAdapter

        return TransformersAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
