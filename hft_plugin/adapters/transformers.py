"""Half Fine-Tuning for ``transformers.Trainer`` and every trainer built on it.

TRL's SFT, DPO, GRPO, Reward and KTO trainers subclass ``transformers.Trainer`` and leave its
set-up path alone, so one integration serves them all::

    from hft_plugin import enable_hft
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds)
    enable_hft(trainer, round=0)      # freezes the half that does not train
    trainer.train()

Each trainer gets a session that translates the trainer's events into calls on the model's
:class:`~hft_plugin.run.HFTRun` (which owns the selection, the checks, the optimizer's fit, the
manifest and the metrics): ``enable_hft`` checks the trainer and starts (or takes over) the run
before any optimizer, DDP or DeepSpeed wrapper exists; ``Trainer._prepare_for_training``, the one
method every optimizer path goes through (``create_optimizer``, DeepSpeed's ``DummyOptim``,
ZeRO-2/3), is wrapped: before it the run checks the resumed checkpoint, the ranks and the
optimizer, after it the optimizer is attached. Under DeepSpeed ZeRO and FSDP partly trained tensors
train through the gradient mask, elsewhere through region parameters (:mod:`hft_plugin.regions`).
Zero-code activation (``HFT_ENABLE=1``) is :class:`~hft_plugin.adapters.trainer_auto.TransformersAdapter`.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Callable, Mapping

from ..config import HFTConfig
from ..errors import HFTError
from ..freeze import HFTHandle
from ..run import HFTRun
from ..selection import Selection
from ..sharing import share_option
from .fsdp import check_fsdp, fsdp_plugin
from .trainer_support import (build_config, check_trainer, refuse_peft, replay_lines, resolve_checkpoint, shards,
                              sharing_declined, write_model_card)

logger = logging.getLogger("hft_plugin")

# trainer -> its session; weak so a dropped trainer takes its session with it
_SESSIONS: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
# trainers on which disable_hft was called: zero-code activation leaves them alone
_OPTED_OUT: "weakref.WeakSet[Any]" = weakref.WeakSet()


class _Session:
    """HFT on one trainer: translates the trainer's events into calls on its :class:`HFTRun`.

    Where transformers has a public event (``TrainerCallback``) that fires at the same moment with
    the same data, it would be used; the events HFT needs have none: ``_prepare_for_training``
    (before and after the optimizer exists), ``create_optimizer`` (the optimizer just built),
    ``save_model`` (every folder weights go to, checkpoints and the final save; ``on_save`` sees
    checkpoints only), ``log`` (before the entry goes to ``log_history``; ``on_log`` sees it
    after) and the clipping methods (before the gradient norm is taken). So the instance's methods
    are wrapped, and put back by :meth:`stop`.
    """

    def __init__(self, trainer, run: HFTRun):
        # weak: _SESSIONS is keyed by the trainer, and the trainer keeps its session alive through
        # the wrapped methods; a strong reference would keep every trainer (and model) forever
        self._trainer = weakref.ref(trainer)
        self.run = run
        self._wrapped: dict[str, Any] = {}
        self._in_prepare = False
        # (checkpoint, selection) checked in the train() call under way: the instance wrapper, the
        # class-level patch of zero-code activation and the prepare step each reach the same checks
        self._checked: tuple[str | None, Selection] | None = None
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
            self.settle_optimizer()
        except HFTError:
            self.run.stop()  # the model as it was
            raise
        self.run.claimed = True
        _SESSIONS[self.trainer] = self
        self.share_reference()
        for name, wrapper in (("train", self._train), ("_prepare_for_training", self._prepare_for_training),
                              ("create_optimizer", self._create_optimizer), ("save_model", self._save_model),
                              ("log", self._log), ("create_model_card", self._create_model_card)):
            self._wrap(name, wrapper)
        self._wrap_clipping_if_masked()
        return self.handle

    def _wrap(self, name: str, wrapper: Callable) -> None:
        original = getattr(self.trainer, name, None)
        if original is None or name in self._wrapped:
            return
        self._wrapped[name] = self.trainer.__dict__.get(name, _MISSING)
        setattr(self.trainer, name, functools.wraps(original)(functools.partial(wrapper, original)))

    def _wrap_clipping_if_masked(self) -> None:
        # Region parameters need nothing at clipping time; mask-mechanism tensors are masked before
        # the norm is taken (outside DeepSpeed, whose gradient hooks mask them earlier).
        if self.handle.masked_parameters and not getattr(self.trainer, "is_deepspeed_enabled", False):
            self._wrap("_clip_grad_norm", self._mask_first)
            self._wrap("_get_grad_norm", self._mask_before_norm)

    def settle_optimizer(self) -> None:
        """A trainer's optimizer that does not fit the round is dropped with its scheduler (the
        Trainer builds both again); one passed to the Trainer is refused (:meth:`HFTRun.settle`)."""
        trainer = self.trainer
        optimizer = trainer.optimizer
        if optimizer is None or getattr(trainer, "is_deepspeed_enabled", False):
            return
        if self.run.settle(optimizer, given=trainer.callback_handler.optimizer is optimizer):
            self._drop_optimizer()

    def _drop_optimizer(self) -> None:
        self.run.release(self.trainer.optimizer)
        self.trainer.optimizer = None
        self.trainer.lr_scheduler = None

    def stop(self) -> None:
        for name, previous in self._wrapped.items():
            if previous is _MISSING:
                self.trainer.__dict__.pop(name, None)
            else:
                setattr(self.trainer, name, previous)
        self._wrapped.clear()
        optimizer = self.trainer.optimizer
        if self.run.built_under_hft(optimizer):
            # It owns only this round's half: the next train() builds one for what trains then.
            self._drop_optimizer()
            logger.info("hft_plugin: HFT disabled; the next train() builds a new optimizer and scheduler.")
        elif optimizer is not None and not getattr(self.trainer, "is_deepspeed_enabled", False):
            logger.warning("hft_plugin: HFT disabled, but the optimizer given to the Trainer owns only the half that "
                           "trained with HFT; give the Trainer a new optimizer to train the whole model.")
        self.run.stop()
        if _SESSIONS.get(self.trainer) is self:
            del _SESSIONS[self.trainer]

    def share_reference(self) -> None:
        """The trainer's ``ref_model`` (TRL's DPO, KTO, GRPO, ... and any trainer exposing one)
        shares the policy's frozen half, or keeps sharing it; checked each time training starts."""
        reference = getattr(self.trainer, "ref_model", None)
        self.run.share_with(reference, sharing_declined(self.trainer) if reference is not None else None)

    # -- the wrappers (each gets the trainer's method it replaces first) ------------------------------
    def _train(self, original: Callable, resume_from_checkpoint=None, *args, **kwargs):
        self._checked = None
        try:
            self.before_train(resolve_checkpoint(self.trainer, resume_from_checkpoint))
            return original(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._checked = None

    def before_train(self, checkpoint: str | None) -> None:
        """Before the trainer loads ``checkpoint``'s weights into the model: refuse a checkpoint of
        another selection, and unshare what loading would change. Once per train() call."""
        if self._checked is not None and self._checked[0] == checkpoint and self._checked[1] is self.selection:
            return
        self.check_resume(checkpoint)
        self.run.before_load(checkpoint)
        self._checked = (checkpoint, self.selection)

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

    def _log(self, original: Callable, logs, *args, **kwargs):
        if isinstance(logs, dict):
            logs.update(self.run.metrics())
        return original(logs, *args, **kwargs)

    def _create_model_card(self, original: Callable, *args, **kwargs):
        return write_model_card(self.trainer, self.selection, self.handle, original, args, kwargs)

    def _mask_first(self, original: Callable, *args, **kwargs):
        self.run.mask_gradients()
        return original(*args, **kwargs)

    def _mask_before_norm(self, original: Callable, model, grad_norm=None, *args, **kwargs):
        if grad_norm is None:  # not clipped this step (max_grad_norm=0): the norm is measured here
            self.run.mask_gradients()
        return original(model, grad_norm, *args, **kwargs)

    # -- what happens before and after the trainer builds its optimizer ------------------------------
    def _prepare_for_training(self, original: Callable, *args, **kwargs):
        return self.prepare(original, args, kwargs)

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
        trainer, run = self.trainer, self.run
        run.follow(trainer.model)
        checkpoint = resolve_checkpoint(trainer, resume)
        if self._checked is None or self._checked[0] != checkpoint or self._checked[1] is not self.selection:
            self.check_resume(checkpoint)  # e.g. model_init built a new model and selection inside train()
        if checkpoint is not None and not shards(trainer):  # the Trainer loaded the checkpoint just before this step
            run.load_checkpoint(checkpoint)
        self.share_reference()
        if getattr(trainer, "is_fsdp_enabled", False):
            check_fsdp(fsdp_plugin(trainer.accelerator), self.handle)
        run.check_ranks_agree()
        if getattr(trainer, "is_deepspeed_enabled", False):
            run.install_zero_masks()
        run.enable_input_grads_if_needed()
        self._wrap_clipping_if_masked()
        self.settle_optimizer()
        if trainer.is_world_process_zero():
            # WARNING, the level transformers and TRL use for what a user must see at their default
            # verbosity: with logging unconfigured, Python's last-resort handler prints it to stderr.
            logger.warning("hft_plugin: %s trains with Half Fine-Tuning\n%s", type(trainer).__name__,
                           run.summary(replay_lines(trainer)))
        if trainer.args.should_save:
            run.save_manifest(trainer.args.output_dir)
        run.training_started()

    def after_prepare(self) -> None:
        trainer = self.trainer
        self.run.check_sharing()
        if getattr(trainer, "is_deepspeed_enabled", False):
            self.run.check_zero_optimizer(getattr(trainer.model_wrapped, "optimizer", None))
        else:
            self.run.attach(trainer.optimizer)  # refuses an optimizer that does not fit the round

    def check_resume(self, checkpoint: str | None) -> None:
        self.run.check_resume(checkpoint, optimizer_exists=self.trainer.optimizer is not None)


_MISSING = object()


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
    share = share_option(share_reference)
    _OPTED_OUT.discard(trainer)
    existing = _SESSIONS.get(trainer)
    if existing is not None:
        note = "" if cfg == existing.requested else f" (the new options {cfg.to_dict()} were ignored)"
        logger.warning("hft_plugin: HFT is already enabled on this trainer; nothing changed%s. Call disable_hft "
                       "first to change it.", note)
        return existing.handle
    return _Session(trainer, _run_for(trainer, cfg, share)).start()


def _run_for(trainer, config: HFTConfig, share: bool) -> HFTRun:
    """The run for ``trainer.model``: the one its set-up started (LLaMA-Factory's model loader
    applies HFT before the trainer exists), so HFT is applied once, or a new one."""
    partial = "mask" if shards(trainer) else "auto"
    run = HFTRun.of(trainer.model)
    if run is not None and not run.claimed and run.handle is not None and not run.handle.removed \
            and run.requested == config:
        run.share_reference = share
        run.use_partial(partial)
        return run
    return HFTRun(trainer.model, config, partial=partial, share_reference=share).start()


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
