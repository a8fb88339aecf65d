"""Zero-code activation of HFT on every ``transformers.Trainer`` a program creates
(``HFT_ENABLE=1``): :class:`TransformersAdapter` patches ``Trainer`` at class level and hands each
trainer to :func:`~hft_plugin.enable_hft` when its ``train()`` starts."""

from __future__ import annotations

from typing import Any, Mapping

from ..config import HFTConfig
from ..errors import ConfigError, HFTError, IntegrationError
from . import compat
from .base import Adapter, patch, unpatch
from .trainer_support import build_config, resolve_checkpoint, trainer_class
from .transformers import _OPTED_OUT, _SESSIONS, _Session, enable_hft

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
        session.before_train(resolve_checkpoint(instance, resume))
        try:
            return wrapped(*args, **kwargs)
        finally:
            session.run.reset_resume_check()
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
    return session.prepare(wrapped, *args, **kwargs)


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
    _TARGETS = (("Trainer.train", _auto_train), (f"Trainer.{compat.PREPARE}", _auto_prepare))

    def __init__(self, config: "HFTConfig | Mapping[str, Any] | None" = None, *, watch_only: bool = False,
                 **options: Any) -> None:
        super().__init__()
        self.config = build_config(config, options) if config is not None or options else None
        # armed by HFT_WATCH_FORGETTING alone: HFT applies only while HFT_ENABLE is on
        self.watch_only = watch_only

    def _instrument(self, config: "HFTConfig | Mapping[str, Any] | None" = None, **options: Any) -> None:
        if config is not None or options:
            self.config = build_config(config if config is not None else self.config, options)
        problem = compat.prepare_problem(trainer_class())
        if problem:
            raise IntegrationError(problem)
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
