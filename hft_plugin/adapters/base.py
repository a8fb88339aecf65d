"""The lifecycle every framework adapter shares: version check, idempotent patch, unpatch.

An adapter is a small class::

    class LlamaFactoryAdapter(Adapter):
        name = "llamafactory"
        instruments = ("llamafactory >= 0.9.5",)

        def _instrument(self):
            patch("llamafactory.model.adapter", "_setup_full_tuning", self._wrapper)

        def _uninstrument(self):
            unpatch("llamafactory.model.adapter", "_setup_full_tuning")

``instrument()`` checks the installed versions, patches once (a second call warns and returns) and
``uninstrument()`` undoes it (a second call is harmless). Patches are wrapt proxies carrying a
marker, so a patch is never applied twice, even by two adapter instances. Methods of one object
(a trainer) are wrapped on the instance with :class:`InstanceWrappers`.

Each patch records its owners: two adapters of one class (two ``TransformersAdapter`` s, say) share
one proxy, and it is removed only when the last of them lets go, so one ``uninstrument()`` cannot
switch off another's patch. A ``patch``/``unpatch`` called inside ``instrument()``/``uninstrument()``
belongs to that adapter without naming it; elsewhere pass ``owner=``. While several own a patch,
the wrapper in force is that of the earliest owner still holding it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import logging
import weakref
from typing import Any, Callable, Iterator

import wrapt
from packaging.requirements import Requirement

from ..errors import IntegrationError

logger = logging.getLogger("hft_plugin")

# wrapt proxies keep attributes named _self_* on the proxy itself (others go to the wrapped object).
MARKER = "_self_hft_patched"
OWNERS = "_self_hft_owners"  # [(owner, wrapper)], earliest first

# Who holds a patch made with no owner named: the adapter whose instrument()/uninstrument() runs, so a
# third party's adapter gets ownership without changing its calls; outside one, every such call
# shares this one anonymous owner (the behaviour before owners existed).
ANONYMOUS = "anonymous"
_CURRENT_OWNER: contextvars.ContextVar[Any] = contextvars.ContextVar("hft_patch_owner", default=ANONYMOUS)

# Every place patched now: (object, attribute) by id, for leak checks (see live_patches()).
_PATCHED: dict[tuple[int, str], tuple[Any, str]] = {}


class IncompatibleVersionError(IntegrationError):
    """An installed framework version is outside an adapter's supported range."""

    def __init__(self, requirement: str, installed: str | None):
        self.requirement = requirement
        self.installed_version = installed
        found = "is not installed" if installed is None else f"is {installed}"
        super().__init__(f"hft_plugin needs {requirement}; the installed version {found}.")


def check_requirements(requirements: tuple[str, ...]) -> None:
    """Raise IncompatibleVersionError for the first requirement the environment does not meet."""
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise IncompatibleVersionError(text, None) from None
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            raise IncompatibleVersionError(text, installed)


def _resolve(module: str | Any, path: str) -> tuple[Any, str]:
    owner = importlib.import_module(module) if isinstance(module, str) else module
    *parents, attribute = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attribute


def is_patched(module: str | Any, path: str) -> bool:
    owner, attribute = _resolve(module, path)
    return getattr(owner.__dict__.get(attribute, getattr(owner, attribute, None)), MARKER, False)


def patch(module: str | Any, path: str, wrapper: Callable, owner: Any = None) -> bool:
    """Wrap ``module.path`` (e.g. ``"Trainer._prepare_for_training"``) with a wrapt ``wrapper``,
    held by ``owner`` (default: the adapter being instrumented, else the anonymous owner).

    Returns False if it was already patched: then nothing changes but that ``owner`` is added to
    the patch's owners (once), so the patch outlives the owner that made it.
    """
    owner = _owner(owner)
    target, attribute = _resolve(module, path)
    current = target.__dict__.get(attribute, getattr(target, attribute, None))
    if getattr(current, MARKER, False):
        owners = getattr(current, OWNERS, None)
        if owners is not None and not any(held is owner for held, _ in owners):
            owners.append((owner, wrapper))
        return False
    owners = [(owner, wrapper)]

    def dispatch(wrapped, instance, args, kwargs):
        return owners[0][1](wrapped, instance, args, kwargs)

    wrapt.wrap_function_wrapper(target, attribute, dispatch)
    proxy = target.__dict__.get(attribute, getattr(target, attribute))
    setattr(proxy, MARKER, True)
    setattr(proxy, OWNERS, owners)
    _PATCHED[(id(target), attribute)] = (target, attribute)
    return True


def unpatch(module: str | Any, path: str, owner: Any = None) -> bool:
    """Let go of ``owner``'s hold on a :func:`patch` (default owner as there). The patch is
    unwrapped when its last owner lets go: returns True then, else False (other owners hold it, or
    ``owner`` held none: a second call is harmless). Only a real patch of ours is unwrapped."""
    owner = _owner(owner)
    try:
        target, attribute = _resolve(module, path)
    except (ImportError, AttributeError):
        return False
    current = target.__dict__.get(attribute)
    if not (getattr(current, MARKER, False) and hasattr(current, "__wrapped__")):
        return False
    owners = getattr(current, OWNERS, [])
    remaining = [(held, wrapper) for held, wrapper in owners if held is not owner]
    if len(remaining) == len(owners):
        return False
    owners[:] = remaining  # dispatch() reads this list: the next owner's wrapper is in force at once
    if owners:
        return False
    setattr(target, attribute, current.__wrapped__)
    _PATCHED.pop((id(target), attribute), None)
    return True


def live_patches() -> list[tuple[str, int]]:
    """Each place patched now, as ("module.Class.attribute", number of owners): what a leak check
    compares before and after a test."""
    live = []
    for key, (target, attribute) in list(_PATCHED.items()):
        current = target.__dict__.get(attribute)
        if not getattr(current, MARKER, False):  # put back by someone else (a test's monkeypatch)
            del _PATCHED[key]
            continue
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        module = getattr(target, "__module__", None)
        live.append((f"{module}.{name}.{attribute}" if module else f"{name}.{attribute}",
                     len(getattr(current, OWNERS, ()))))
    return sorted(live)


class InstanceWrappers:
    """Methods of one object (a trainer) wrapped on the instance, never on its class, and put back by
    :meth:`restore`: what a subclass overrides is still reached, and nothing outlives the object.
    After ``wrap(name, wrapper)``, ``obj.name(*args)`` calls ``wrapper(original, *args)``.

        >>> class Greeter:
        ...     def hello(self, name):
        ...         return f"hello {name}"
        >>> greeter = Greeter()
        >>> wrappers = InstanceWrappers(greeter)
        >>> wrappers.wrap("hello", lambda original, name: original(name).upper())
        True
        >>> greeter.hello("you"), wrappers.restore(), greeter.hello("you"), vars(greeter)
        ('HELLO YOU', None, 'hello you', {})
    """

    def __init__(self, obj: Any) -> None:
        self._obj = weakref.ref(obj)  # the object holds its wrappers (and whoever made them), not the reverse
        self._saved: dict[str, Any] = {}

    def wrap(self, name: str, wrapper: Callable) -> bool:
        """Wrap ``name`` once; False (nothing changed) if it is wrapped already or the object has none."""
        obj = self._obj()
        original = getattr(obj, name, None)
        if original is None or name in self._saved:
            return False
        self._saved[name] = obj.__dict__.get(name, _MISSING)
        setattr(obj, name, functools.wraps(original)(functools.partial(wrapper, original)))
        return True

    def restore(self) -> None:
        obj = self._obj()
        for name, previous in self._saved.items():
            if obj is None:
                break
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, previous)
        self._saved.clear()


_MISSING = object()


def _owner(owner: Any) -> Any:
    return _CURRENT_OWNER.get() if owner is None else owner


@contextlib.contextmanager
def _owning(owner: Any) -> Iterator[None]:
    token = _CURRENT_OWNER.set(owner)
    try:
        yield
    finally:
        _CURRENT_OWNER.reset(token)


class Adapter:
    """Base of every framework adapter. Subclasses set ``name`` and ``instruments`` and implement
    ``_instrument`` / ``_uninstrument``."""

    name: str = ""
    instruments: tuple[str, ...] = ()

    def __init__(self, config: Any = None) -> None:
        self.instrumented = False
        self.config = config  # an HFTConfig, a dict of its options, or None for the HFT_* variables
        self.handles: list = []  # the HFTHandles this adapter applied to the models it saw

    def resolve_config(self):
        """The HFT options to train with: those given, else the ``HFT_*`` environment variables,
        read now, so a bad value fails where a model is set up and not at import."""
        from ..config import HFTConfig

        if self.config is None:
            from ..bootstrap import env

            return env.load_config()
        if isinstance(self.config, HFTConfig):
            return self.config
        return HFTConfig.from_dict(dict(self.config))

    def instrument(self, raise_errors: bool = True, **options: Any) -> bool:
        """Patch the framework. Returns True if it patched now, False if it already was (a warning)
        or, with ``raise_errors=False``, if the framework is missing or unsupported (a warning)."""
        if self.instrumented:
            logger.warning("hft_plugin: the %s adapter is already active.", self.name)
            return False
        try:
            check_requirements(self.instruments)
        except IncompatibleVersionError as exc:
            if raise_errors:
                raise
            logger.warning("hft_plugin: %s adapter not activated: %s", self.name, exc)
            return False
        with _owning(self):
            self._instrument(**options)
        self.instrumented = True
        return True

    def uninstrument(self) -> None:
        """Undo ``instrument``. A second call is harmless."""
        if not self.instrumented:
            return
        with _owning(self):
            self._uninstrument()
        self.instrumented = False

    def _instrument(self, **options: Any) -> None:
        raise NotImplementedError

    def _uninstrument(self) -> None:
        raise NotImplementedError
