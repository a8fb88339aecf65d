"""The live forgetting monitor for ``transformers.Trainer`` and TRL's trainers.

:func:`watch_forgetting` adds a :class:`ForgettingMonitor`, a ``transformers.TrainerCallback``, to
a trainer. Every ``every`` optimizer steps and at the last step it compares the model with the
base it started from (:mod:`hft_plugin.forgetting`) and hands ``forgetting/kl`` and
``forgetting/nll_delta`` to the trainer's own log at that step, so the console, TensorBoard, W&B
and ``trainer.state.log_history`` all get them. With ``max_kl`` it stops training at the first
measurement above the budget, through the Trainer's own stop.

Where each part happens, and why there:

* The probes are drawn and the base's values kept when :func:`watch_forgetting` is called, before
  ``train()`` loads any checkpoint into the model: a resumed run still measures against the model
  it started from, not against the checkpoint.
* The callback goes first in the trainer's list, so that at a measured step the values are in the
  log dict before the reporting callbacks (TensorBoard, W&B, the console) read it.
* Only the main process measures; every process forces the log at a measured step (the trainer
  gathers the loss across processes when it logs) and learns the budget's verdict from the main one.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Sequence

from ..errors import ConfigError, IntegrationError
from ..forgetting import (DEFAULT_BATCH_SIZE, DEFAULT_EVERY, DEFAULT_LENGTH, DEFAULT_SAMPLES, PROBE_SEED, PROBES_FILE,
                          BaseSnapshot, Measurement, Probes, check_count, check_every, check_max_kl, context_length,
                          encode_texts, measure, over_budget, read_texts, sample_probes, trained_tensors,
                          usable_tokenizer, vocab_size)
from ..layouts.base import unwrap_model

logger = logging.getLogger("hft_plugin")

try:  # the base class only: this module is imported by code that has transformers
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a requirement of the trainer integration
    TrainerCallback = object  # type: ignore[misc,assignment]

# trainer -> its monitor; weak, so a dropped trainer takes its monitor (and the kept base) along
_MONITORS: "weakref.WeakKeyDictionary[Any, ForgettingMonitor]" = weakref.WeakKeyDictionary()

_NO_TOKENIZER = ("hft_plugin: the forgetting monitor found no tokenizer (trainer.processing_class is None or cannot "
                 "encode text): its probes are token ids sampled from the model, and %s keeps them without text.")


def _declined(trainer) -> str | None:
    """Why the monitor cannot measure this trainer's model, in one line, or None."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return ("FSDP shards the weights across processes, so no process holds a whole model to measure; measure "
                "checkpoints after training with `hft forgetting BASE TUNED`")
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled() or getattr(plugin, "zero_stage", None) == 3:
            return ("DeepSpeed ZeRO-3 partitions the weights across processes, so no process holds a whole model to "
                    "measure; measure checkpoints after training with `hft forgetting BASE TUNED`")
    model = unwrap_model(trainer.model)
    if any(p.device.type == "meta" for p in model.parameters()):
        return "the model is on the meta device (no weights to measure)"
    return None


def _source_folder(model) -> str | None:
    """The local folder the model was loaded from (a previous round's output), if any."""
    path = getattr(getattr(model, "config", None), "name_or_path", None)
    return path if isinstance(path, str) and path and os.path.isdir(path) else None


class ForgettingMonitor(TrainerCallback):
    """Measures how far the trainer's model moved from its base; see :func:`watch_forgetting`.

    Attributes:
        history: one ``{"step": int, "forgetting/kl": float, "forgetting/nll_delta": float}`` per
            measurement, in order (main process only).
        last: the latest :class:`~hft_plugin.forgetting.Measurement`, or None.
        probes: the :class:`~hft_plugin.forgetting.Probes` measured on (main process only).
        base: the kept starting values (:class:`~hft_plugin.forgetting.BaseSnapshot`; main process only).
        declined: why the monitor does not measure (one line), or None while it does.
        stopped_at: the step at which the budget stopped training, or None.
    """

    def __init__(self, trainer, *, every: int, max_kl: float | None, batch_size: int, probes: Probes | None,
                 base: BaseSnapshot | None, declined: str | None = None):
        self._trainer = weakref.ref(trainer)
        self.every = every
        self.max_kl = max_kl
        self.batch_size = batch_size
        self.probes = probes
        self.base = base
        self.declined = declined
        # declined for a reason every process shares (FSDP, ZeRO-3): no process takes any step
        # below; a reason only the main process has (a resume it cannot measure) leaves the others'
        # steps in place, so that all processes still log and agree on the budget at the same steps
        self._off_everywhere = declined is not None
        self._model = weakref.ref(unwrap_model(trainer.model))
        self.history: list[dict[str, float]] = []
        self.last: Measurement | None = None
        self.stopped_at: int | None = None
        self._pending: dict[str, float] | None = None
        self._measured_step: int | None = None

    @property
    def measuring(self) -> bool:
        """Whether this process measures (the main process of a run the monitor can measure)."""
        return self.declined is None and self.base is not None and self.probes is not None

    def remove(self) -> None:
        """Take the monitor off its trainer and free the kept base."""
        trainer = self._trainer()
        if trainer is not None:
            trainer.remove_callback(self)
            if _MONITORS.get(trainer) is self:
                del _MONITORS[trainer]
        self.base = None

    # -- measuring -----------------------------------------------------------------------------------
    def measure(self) -> Measurement:
        """Compare the trainer's model with its base now (main process)."""
        trainer = self._trainer()
        return measure(unwrap_model(trainer.model), self.probes, self.base, batch_size=self.batch_size)

    def _record(self, step: int) -> Measurement:
        result = self.last = self.measure()
        values = {"forgetting/kl": result.kl, "forgetting/nll_delta": result.nll_delta}
        self.history.append({"step": step, **values})
        self._pending = values
        self._measured_step = step
        return result

    def _decline(self, args, reason: str, everywhere: bool = False) -> None:
        self.declined = reason
        self.base = None
        self._off_everywhere = self._off_everywhere or everywhere
        if getattr(args, "process_index", 0) == 0:
            logger.warning("hft_plugin: the forgetting monitor is off: %s.", reason)

    # -- the trainer's events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._pending = self._measured_step = self.stopped_at = None  # a trainer may train again
        trainer = self._trainer()
        if self.declined is not None or trainer is None:
            return
        reason = _declined(trainer)
        if reason is not None:
            return self._decline(args, reason, everywhere=True)
        if self.base is None:  # another process: it only takes part in the budget's verdict
            return
        model = unwrap_model(trainer.model)
        if model is not self._model():
            # model_init built a new model inside train(): fine before any step, not on a resume
            if state.global_step > 0:
                return self._decline(args, "the trainer built a new model (model_init) and resumed from a checkpoint, "
                                           "so the base's values were never seen; call watch_forgetting on a trainer "
                                           "given its model")
            self.base = BaseSnapshot.capture(model, device=self.base.device)
            self._model = weakref.ref(model)
        self._follow_what_trains(args, model, state.global_step)
        if self.declined is not None:
            return
        if args.should_save:
            self.probes.save(args.output_dir)
        budget = f"; stops above max_kl={self.max_kl:g}" if self.max_kl is not None else ""
        logger.warning("hft_plugin: forgetting monitor: KL(base || model) every %d steps on %s; the base keeps %s of "
                       "starting values (%d tensors) on %s%s.", self.every, self.probes.describe(),
                       _mib(self.base.nbytes), len(self.base.values), self.base.device, budget)

    def _follow_what_trains(self, args, model, step: int) -> None:
        """Keep the starting values of exactly what trains now: add tensors that train since the
        capture (unchanged so far, unless the run resumes), drop those that no longer train and
        never moved (a whole-model capture made before enable_hft)."""
        import torch

        names = trained_tensors(model)
        missing = [n for n in names if n not in self.base.values]
        if missing and step > 0:
            return self._decline(args, f"{len(missing)} tensors train that did not when watch_forgetting was called "
                                       f"(e.g. {missing[0]}) and the run resumes from step {step}, so their starting "
                                       "values are unknown; call watch_forgetting after enable_hft")
        self.base.add(model, missing)
        params = dict(model.named_parameters())
        unchanged = [n for n, kept in self.base.values.items() if n not in names and n in params
                     and torch.equal(kept, params[n].detach().to(kept.device, kept.dtype))]
        if unchanged:
            self.base.keep_only(n for n in self.base.values if n not in unchanged)

    def on_step_end(self, args, state, control, **kwargs):
        if self._off_everywhere:
            return
        step = state.global_step
        if step % self.every != 0 and step < state.max_steps:
            return
        # every process logs at this step: the trainer gathers the loss across processes when it logs
        control.should_log = True
        stop = False
        if self.measuring:
            result = self._record(step)
            stop = over_budget(result.kl, self.max_kl)
        if self.max_kl is not None and _agree(args, stop):
            self._stop(args, state, control)

    def _stop(self, args, state, control) -> None:
        """The Trainer's own stop, as its DefaultFlowCallback does at the last step: the save and
        evaluation strategies apply."""
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy

        control.should_training_stop = True
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True
        if (args.eval_strategy == IntervalStrategy.STEPS and state.eval_steps
                and state.global_step % state.eval_steps != 0 and args.eval_delay <= state.global_step):
            control.should_evaluate = True
        self.stopped_at = state.global_step
        if self.last is not None:
            logger.warning("hft_plugin: forgetting budget exceeded at step %d: forgetting/kl = %.6g nats per token > "
                           "max_kl = %g; training stops here (the trainer's save strategy applies).",
                           state.global_step, self.last.kl, self.max_kl)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)
        # the trainer recorded this log in its history (a copy) just before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == self._measured_step:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def on_save(self, args, state, control, **kwargs):
        if self.probes is None or not args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):  # a later round loading this checkpoint finds the same probes
            self.probes.save(folder)

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if not self.measuring or trainer is None:
            return
        if state.global_step > 0 and self._measured_step != state.global_step:
            self._record(state.global_step)  # training ended between measurements (e.g. early stopping)
        if self._pending is not None:
            trainer.log(dict(self._pending))


def _agree(args, stop: bool) -> bool:
    """The main process's verdict, on every process (each must stop at the same step)."""
    if getattr(args, "world_size", 1) <= 1:
        return stop
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([1 if stop else 0], device=args.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _check_base_device(base_device: Any) -> Any:
    import torch

    if base_device in ("cpu", "model"):
        return base_device
    try:
        return torch.device(base_device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"base_device={base_device!r} is not a device: pass 'cpu' (default: keeps accelerator memory "
                          "free), 'model' (beside the model: faster measurements) or a torch device.") from None


def _probes(trainer, model, tokenizer, texts, samples: int, length: int, seed: int, main: bool) -> Probes | None:
    """The probes: the given texts, else the probes file of the output folder or of the folder the
    model was loaded from, else new samples of the base (drawn by the main process only)."""
    vocab, context = vocab_size(model), context_length(model)
    if texts is not None:
        if isinstance(texts, (str, os.PathLike)):
            texts = read_texts(os.fspath(texts))
        probes = texts if isinstance(texts, Probes) else encode_texts(texts, tokenizer, vocab_size=vocab,
                                                                       context=context)
        probes.check_fits(vocab, context, "the probe texts")
        return probes
    if context is not None and length > context:
        raise ConfigError(f"length={length} is longer than the model's context of {context} tokens; draw shorter probes.")
    for folder in (trainer.args.output_dir, _source_folder(model)):
        path = os.path.join(folder, PROBES_FILE) if folder else None
        if path and os.path.isfile(path):
            probes = Probes.load(path)
            probes.check_fits(vocab, context, path)
            if main:
                logger.info("hft_plugin: the forgetting monitor measures on the probes of %s.", path)
            return probes
    return sample_probes(model, count=samples, length=length, seed=seed, tokenizer=tokenizer) if main else None


def watch_forgetting(trainer, *, every: int = DEFAULT_EVERY, texts: "Sequence[str] | str | os.PathLike | None" = None,
                     max_kl: float | None = None, base_device: Any = "cpu", samples: int = DEFAULT_SAMPLES,
                     length: int = DEFAULT_LENGTH, seed: int = PROBE_SEED,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> ForgettingMonitor:
    """Log how far ``trainer``'s model moves from its base while it trains, and optionally stop it.

    Every ``every`` optimizer steps and at the last step the trainer's log gets:

    * ``forgetting/kl``: KL(base || model) of the next-token distributions, in nats, averaged over
      every scored position of the probe texts;
    * ``forgetting/nll_delta``: the probe tokens' mean NLL under the model minus under the base, in
      nats per token (positive: the probes became less likely).

    The probes are, by default, the base model's own samples: ``samples`` sequences of up to
    ``length`` tokens (16 x 64: about 1,000 scored positions, one forward pass of the base and one
    of the model per measurement), drawn from the beginning-of-sequence token with their own
    ``torch.Generator`` (the global random state is untouched). They are written to
    ``output_dir/hft_probes.json`` (and into every checkpoint), and read back from there, or from
    the folder the model was loaded from, so a resumed run and later rounds measure on the same
    probes. ``texts`` replaces them with your own: a list of strings, or a file (one text per line,
    a JSON list, JSON Lines, or an ``hft_probes.json``).

    The base is the model as it is now, when this is called (call it before ``train()``, and after
    :func:`~hft_plugin.enable_hft` so that only the trainable half is kept): the values of every
    tensor that trains are copied to ``base_device`` (``"cpu"``, the default, costs no accelerator
    memory; ``"model"`` keeps them beside the model). Under HFT that is the trainable half (a
    partly trained fused tensor is kept whole); the frozen half is the model's own tensors. Without
    HFT it is every trainable tensor: a full copy of the model for full fine-tuning. A measurement
    exchanges those values with the model's current ones, runs the probes, and exchanges them back,
    bit for bit, under ``torch.no_grad`` in eval mode (train/eval flags restored) with no randomness:
    training is bit-identical with and without the monitor.

    Args:
        trainer: a ``transformers.Trainer`` or TRL trainer, with or without HFT.
        every: measure every this many optimizer steps (and at the last step). Default 50.
        texts: your probe texts (list of str, or a file path) instead of the base's samples.
        max_kl: a budget in nats per token: training stops (``control.should_training_stop``, so
            the save strategy applies) at the first measurement above it, with a log line naming
            the step, the value and the budget. Default: no budget.
        base_device: where the base's values are kept: ``"cpu"``, ``"model"`` or a device.
        samples, length, seed: how many probes to draw, their length in tokens (the start token
            included) and the seed of their generator.
        batch_size: probes per forward pass. The base's log-probabilities over all probes are held
            during a measurement: at most ``samples x (length - 1) x vocabulary x 4`` bytes on
            ``base_device`` (189 MiB at the defaults with a 49,152-token vocabulary).

    Returns:
        The :class:`ForgettingMonitor` (its ``history`` and ``last`` hold the measurements).

    Raises:
        ConfigError: ``every`` not a positive int, ``max_kl`` not a positive number, ``samples``,
            ``length`` or ``batch_size`` out of range, ``length`` beyond the model's context, a
            ``base_device`` that is no device.
        ProbeTextsError: an empty or unreadable texts file, an empty text, a text longer than the
            model's context, texts without a tokenizer, or a probes file made for another model.
        IntegrationError: ``trainer`` is not a ``transformers.Trainer``.

    Everything is checked before anything changes. Under DeepSpeed ZeRO-3 or FSDP no process holds
    a whole model: the monitor says so in one line and does not measure. A trainer without a
    tokenizer is said so once; its probes are token ids. A second call on the same trainer warns
    and returns the first monitor.

    Example:
        >>> from transformers import Trainer, TrainingArguments
        >>> from hft_plugin import watch_forgetting
        >>> from hft_plugin.testing import tiny_model, tiny_tokenizer
        >>> args = TrainingArguments("/tmp/hft-watch-doc", report_to=[], use_cpu=True)
        >>> trainer = Trainer(model=tiny_model("llama"), args=args, processing_class=tiny_tokenizer())
        >>> monitor = watch_forgetting(trainer, every=10, samples=4, length=16)
        >>> monitor.measure().kl                     # trainer.train() logs it every 10 steps
        0.0
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise IntegrationError(f"watch_forgetting needs a transformers.Trainer (or a TRL trainer), got "
                               f"{type(trainer).__name__}. For your own loop use hft_plugin.forgetting: "
                               "BaseSnapshot.capture, sample_probes and measure.")
    every = check_every(every)
    max_kl = check_max_kl(max_kl)
    samples, length = check_count(samples, "samples"), check_count(length, "length", minimum=2)
    batch_size = check_count(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is not a whole number.")
    base_device = _check_base_device(base_device)
    existing = _MONITORS.get(trainer)
    if existing is not None:
        logger.warning("hft_plugin: this trainer's forgetting is already watched; nothing changed (call "
                       "monitor.remove() first to watch it with other options).")
        return existing
    if trainer.model is None:
        raise IntegrationError("The trainer has no model yet; call watch_forgetting after creating it with a model.")
    model = unwrap_model(trainer.model)
    main = trainer.is_world_process_zero()
    declined = _declined(trainer)
    probes = base = None
    if declined is None:
        tokenizer = usable_tokenizer(getattr(trainer, "processing_class", None))
        probes = _probes(trainer, model, tokenizer, texts, samples, length, seed, main)
        if tokenizer is None and main and texts is None:
            logger.warning(_NO_TOKENIZER, PROBES_FILE)
        if main:
            base = BaseSnapshot.capture(model, device=base_device)
    elif main:
        logger.warning("hft_plugin: the forgetting monitor is off: %s.", declined)
    monitor = ForgettingMonitor(trainer, every=every, max_kl=max_kl, batch_size=batch_size, probes=probes, base=base,
                                declined=declined)
    # First in the list: at a measured step the values are in the log before any reporter reads it.
    trainer.callback_handler.callbacks.insert(0, monitor)
    _MONITORS[trainer] = monitor
    return monitor


def forgetting_monitor(trainer) -> ForgettingMonitor | None:
    """The monitor :func:`watch_forgetting` put on ``trainer``, if any."""
    return _MONITORS.get(trainer)


def watch_from_environment(trainer) -> ForgettingMonitor | None:
    """Zero-code activation: watch ``trainer`` as ``HFT_WATCH_FORGETTING``, ``HFT_WATCH_EVERY`` and
    ``HFT_MAX_KL`` say (read now, when its ``train()`` starts), once per trainer."""
    from ..bootstrap import env

    settings = env.watch_settings()
    if settings is None or trainer in _MONITORS:
        return _MONITORS.get(trainer)
    return watch_forgetting(trainer, **settings)


__all__ = ["watch_forgetting", "ForgettingMonitor", "forgetting_monitor", "watch_from_environment"]
