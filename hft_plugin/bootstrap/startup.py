"""The start-up hook: arm the adapters in every Python process where ``HFT_ENABLE`` is set.

The package installs ``hft-plugin.pth`` into site-packages. Python runs its one line at start-up;
that line reads ``HFT_ENABLE`` and, only if it is set to something other than off, imports this
module and calls :func:`activate`. ``activate`` imports neither torch nor a framework: it registers
wrapt post-import hooks, so an adapter is instrumented the moment its framework's module is
imported (or at once if it already is). torchrun, the deepspeed launcher, accelerate launch and
LLaMA-Factory's FORCE_TORCHRUN start fresh interpreters that inherit the environment, so every
worker arms itself the same way.

The adapters read the ``HFT_*`` variables when training starts (each ``train()``), not here, so a
program may set them after start-up, or change them between tasks.

Failure policy. A process that never trains must never be broken: any exception here, or inside
a post-import hook, becomes one warning. A process that does train with ``HFT_ENABLE=1`` must not
silently fine-tune everything: if an adapter of a framework in use could not be instrumented,
:func:`activate` arms a guard that raises :class:`~hft_plugin.IntegrationError` when an optimizer is
built (the moment training would start without HFT) over any trainable tensor of a model without HFT
applied; an optimizer of a model with HFT applied passes. A malformed variable (``HFT_ENABLE=ture``,
``HFT_ROUND=1_0``) is one warning at import and, when training starts, its own
:class:`~hft_plugin.ConfigError`: raised by the adapter before the model changes, or by the guard
before any IntegrationError, so the first error a user sees is the one to fix.

A configuration error is shown once, short: the warning at import is the message; if it is then
raised and nothing catches it, :func:`activate`'s exception hook prints one line pointing back to it
instead of a traceback (the error stays a typed exception a program can catch), and a launcher
(``accelerate launch`` under ``trl sft``) whose worker stopped that way prints one line instead of
a traceback that repeats the worker's stderr. Any other exception goes to the previous hook.

Explicit forms: ``import hft_plugin.auto`` and ``hft-run -- COMMAND``.

    >>> import hft_plugin.bootstrap.startup as startup
    >>> startup.activate({"HFT_ENABLE": "0"})
    False
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

from . import env

ADAPTERS: dict[str, tuple[str, str]] = {
    # adapter name: (module whose import arms it, "adapter module:class")
    "transformers": ("transformers.trainer", "hft_plugin.adapters.transformers:TransformersAdapter"),
    "llamafactory": ("llamafactory.model.adapter", "hft_plugin.adapters.llamafactory:LlamaFactoryAdapter"),
    "openrlhf": ("openrlhf.utils.deepspeed.deepspeed", "hft_plugin.adapters.openrlhf:OpenRLHFAdapter"),
    "axolotl": ("axolotl.integrations.base", "hft_plugin.adapters.axolotl:AxolotlAdapter"),
    "swift": ("swift.pipelines.train.tuner", "hft_plugin.adapters.swift:SwiftAdapter"),
}
"""Every adapter the hook knows, named by string so that start-up imports none of them."""

PTH_NAME = "hft-plugin.pth"

_state: dict = {"active": False, "hooks": [], "instances": {}, "failures": {}, "guard": False, "config_error": None,
               "excepthook": None, "watch_only": False, "set_enable": None}
# set_enable: the HFT_ENABLE value ``import hft_plugin.auto`` wrote into os.environ, for deactivate() to take back

STOPPED = "hft_plugin: stopped before training"
"""How the line that ends a worker stopped by a configuration error starts; a launcher process
recognises its worker's failure by it."""


def _warn(message: str) -> None:
    # logging may not be configured yet and warnings can be filtered to errors by the host
    # program; a plain line on stderr is the one warning that can never break anything.
    sys.stderr.write(f"hft_plugin: {message}\n")


def activate(environ: Mapping[str, str] | None = None) -> bool:
    """Register the post-import hooks once per process. Returns True if it armed them now.

    Never raises: an error becomes one warning on stderr.
    """
    environ = os.environ if environ is None else environ
    if _state["active"]:
        return False
    try:
        hft = env.maybe_enabled(environ)
        if not hft and not env.maybe_watching(environ):
            return False
        import wrapt

        skipped = env.disabled_adapters(environ)
        unknown = skipped - set(ADAPTERS)
        if unknown:
            _warn(f"{env.HFT_DISABLE_ADAPTERS} names unknown adapters {sorted(unknown)}; known: {sorted(ADAPTERS)}.")
        # HFT_WATCH_FORGETTING alone: only the Trainer's adapter, to start the monitor (the other
        # frameworks' trainers are transformers Trainers too); it applies HFT only if HFT_ENABLE is on.
        _state["watch_only"] = not hft
        for name, (module, _) in ADAPTERS.items():
            if name in skipped or (not hft and name != "transformers"):
                continue
            hook = _make_hook(name)
            wrapt.register_post_import_hook(hook, module)
            _state["hooks"].append((module, hook))
        _install_excepthook()
        _state["active"] = True
        return True
    except Exception as exc:  # noqa: BLE001 - start-up must never break the host program
        _warn(f"start-up hook disabled: {exc!r}")
        return False


def _install_excepthook() -> None:
    """Report an uncaught configuration error (or a launcher's worker stopped by one) in one line;
    everything else goes to the hook that was there before."""
    if _state["excepthook"] is not None:
        return
    previous = sys.excepthook

    def hft_excepthook(kind, value, traceback) -> None:
        try:
            line = _one_line_report(value)
        except Exception:  # noqa: BLE001 - never lose the original report
            line = None
        if line is None:
            previous(kind, value, traceback)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    _state["excepthook"] = (previous, hft_excepthook)
    sys.excepthook = hft_excepthook


def _one_line_report(value: BaseException) -> str | None:
    errors = sys.modules.get("hft_plugin.errors")
    if errors is not None and isinstance(value, errors.ConfigError):
        # The traceback says nothing a user can act on: the message names the variable and the fix.
        if str(value) == _state["config_error"]:  # already printed, in full, when the framework was imported
            return f"{STOPPED} on the configuration error above (ConfigError)."
        return f"{STOPPED}: ConfigError: {value}"
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None and isinstance(value, subprocess.CalledProcessError):
        # accelerate launch re-raises its worker's failure with the worker's stderr attached:
        # when the worker stopped on a configuration error, that error is already on screen once
        output = value.stderr or b""
        output = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        if STOPPED in output:
            command = value.cmd if isinstance(value.cmd, str) else " ".join(os.path.basename(str(c)) for c in value.cmd[:2])
            return (f"hft_plugin: the worker ({command} ...) stopped on the configuration error above "
                    f"(exit status {value.returncode}).")
    return None


def _make_hook(name: str):
    def hook(_module) -> None:
        instrument(name)

    hook.__name__ = f"hft_instrument_{name}"
    return hook


def instrument(name: str) -> bool:
    """Instrument one adapter in auto mode (called by the post-import hook). Never raises; a
    failure (an unsupported framework version, a patch that cannot be applied) is one warning, is
    remembered, and arms the optimizer guard (see the module docstring). The ``HFT_*`` variables
    are read by the adapter when training starts, not here; a malformed one is reported here
    once, early, and is the first error the guard raises."""
    if name in _state["instances"]:
        return False
    try:
        _check_variables()
        reason = _try_instrument(name)
        if reason is None:
            return True
        # Not raised here: this import may be in a process that never trains. The guard raises
        # it when an optimizer is built, which is where it matters.
        _warn(f"the {name} adapter is not active: {reason}")
        if _state["watch_only"]:
            return False  # no HFT was asked for: training without the monitor loses nothing
        _state["failures"][name] = reason
        _arm_guard()
    except Exception as exc:  # noqa: BLE001 - a post-import hook must never break the import
        _warn(f"the {name} adapter could not be activated: {exc!r}")
    return False


def _check_variables() -> None:
    """Warn once if the HFT_* variables do not parse now (training will stop on them)."""
    from ..errors import HFTError

    if _state["config_error"] is not None:
        return
    try:
        env.watch_settings()
        if not _state["watch_only"]:
            env.load_config()
    except HFTError as exc:
        _state["config_error"] = str(exc)
        _warn(f"{exc} Training will stop on it.")
        _arm_guard()


def _try_instrument(name: str) -> str | None:
    """Instrument ``name``; return None on success, else the reason it could not be."""
    import importlib

    from ..adapters.base import IncompatibleVersionError, check_requirements
    from ..errors import HFTError

    try:
        module, _, attribute = ADAPTERS[name][1].partition(":")
        options = {"watch_only": True} if _state["watch_only"] else {}
        adapter = getattr(importlib.import_module(module), attribute)(config=None, **options)  # read at train time
        check_requirements(adapter.instruments)
        adapter.instrument()
    except (HFTError, IncompatibleVersionError) as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a patch target missing in this framework version
        return repr(exc)
    _state["instances"][name] = adapter
    return None


GUARD_OWNER = "hft_plugin start-up optimizer guard"
"""The guard's owner of its patch on ``torch.optim.Optimizer.__init__``: named, since its import hook
may fire inside an adapter's ``instrument()``, which would otherwise own it."""


def _arm_guard() -> None:
    if _state["guard"]:
        return
    import wrapt

    def guard_hook(torch_optim) -> None:
        try:
            from ..adapters.base import patch

            patch(torch_optim, "Optimizer.__init__", _refuse_optimizer, owner=GUARD_OWNER)
        except Exception as exc:  # noqa: BLE001
            _warn(f"could not arm the optimizer guard: {exc!r}")

    wrapt.register_post_import_hook(guard_hook, "torch.optim")
    _state["guard"] = True


def _refuse_optimizer(wrapped, instance, args, kwargs):
    params, args, kwargs = _materialised(args, kwargs)
    uncovered = _without_hft(params)
    if not uncovered:
        return wrapped(*args, **kwargs)  # every tensor it trains is of a model with HFT applied
    if _state["config_error"] is not None:
        # Read again: the program may have fixed the variables since. A malformed one is the error
        # to see first, before any about adapters (it is the one to fix).
        env.watch_settings()
        if not env.switched_off() and not _state["watch_only"]:
            env.load_config()
    if not _state["failures"]:
        return wrapped(*args, **kwargs)
    from ..errors import IntegrationError

    failures = "; ".join(f"{name}: {why}" for name, why in _state["failures"].items())
    shapes = ", ".join(str(tuple(p.shape)) for p in uncovered[:3])
    raise IntegrationError(
        f"HFT_ENABLE is set but HFT could not be attached ({failures}), and this optimizer would train "
        f"{len(uncovered)} tensors of no model with HFT applied (shapes {shapes}{', ...' if len(uncovered) > 3 else ''}), "
        "every parameter of its model. Install a supported version (see docs/activation.md), or set "
        f"{env.HFT_DISABLE_ADAPTERS}=<name> to skip an adapter this run does not use, or unset HFT_ENABLE."
    )


def _materialised(args: tuple, kwargs: dict) -> tuple[list, tuple, dict]:
    """The tensors an ``Optimizer.__init__(params, defaults)`` call trains, and its arguments with
    ``params`` read into a list: a generator (``model.parameters()``) can be read only once."""
    given = args[0] if args else kwargs.get("params")
    if given is None or hasattr(given, "shape"):  # a lone tensor: torch's own TypeError says what to pass
        return [], args, kwargs
    params = list(given)
    if args:
        args = (params, *args[1:])
    else:
        kwargs = {**kwargs, "params": params}
    tensors = []
    for item in params:
        if isinstance(item, dict):  # a parameter group
            group = item.get("params", [])
            tensors.extend([group] if hasattr(group, "shape") else list(group))
        elif isinstance(item, tuple) and len(item) == 2:  # (name, tensor), which torch also takes
            tensors.append(item[1])
        else:
            tensors.append(item)
    return tensors, args, kwargs


def _without_hft(tensors: list) -> list:
    """The trainable ``tensors`` that belong to no model with HFT applied now: the guard judges an
    optimizer by the model it trains, so HFT on one model lets no optimizer of another through."""
    freeze = sys.modules.get("hft_plugin.freeze")
    covered: set[int] = set()
    if freeze is not None:
        for model, handle in list(freeze._ACTIVE.items()):
            if handle.removed:
                continue
            covered.update(id(p) for p in model.parameters())
            covered.update(id(p) for p in handle.parameters())  # the region parameters of partly trained tensors
    return [t for t in tensors if getattr(t, "requires_grad", False) and id(t) not in covered]


def status() -> dict:
    """What the hook did in this process: armed, instrumented adapters, failures."""
    return {
        "active": _state["active"],
        "instrumented": sorted(_state["instances"]),
        "failures": dict(_state["failures"]),
        "guard": _state["guard"],
        "config_error": _state["config_error"],
    }


def deactivate() -> None:
    """Undo :func:`activate` (tests and ``hft_plugin.auto`` users): uninstrument adapters and drop
    hooks that have not fired, disarm the optimizer guard, put back the previous exception hook, and
    unset ``HFT_ENABLE`` if ``import hft_plugin.auto`` set it (and nobody changed it since)."""
    import wrapt.importer as importer

    for module, hook in _state["hooks"]:
        hooks = importer._post_import_hooks.get(module)
        if hooks and hook in hooks:
            hooks.remove(hook)
    for adapter in _state["instances"].values():
        adapter.uninstrument()
    if _state["guard"] and "torch.optim" in sys.modules:
        from ..adapters.base import unpatch

        unpatch(sys.modules["torch.optim"], "Optimizer.__init__", owner=GUARD_OWNER)
    hooks = importer._post_import_hooks.get("torch.optim")
    if hooks:
        hooks[:] = [h for h in hooks if getattr(h, "__name__", "") != "guard_hook"]
    if _state["excepthook"] is not None:
        previous, ours = _state["excepthook"]
        if sys.excepthook is ours:  # another hook installed after ours stays, with ours inside it
            sys.excepthook = previous
    if _state["set_enable"] is not None and os.environ.get(env.HFT_ENABLE) == _state["set_enable"]:
        del os.environ[env.HFT_ENABLE]  # auto's switch, unchanged since: a process started later stays plain
    _state.update(active=False, hooks=[], instances={}, failures={}, guard=False, config_error=None,
                  excepthook=None, watch_only=False, set_enable=None)
