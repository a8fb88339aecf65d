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
marker, so a patch is never applied twice, even by two adapter instances.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any, Callable

import wrapt
from packaging.requirements import Requirement

from ..errors import IntegrationError

logger = logging.getLogger("hft_plugin")

# wrapt proxies keep attributes named _self_* on the proxy itself (others go to the wrapped object).
MARKER = "_self_hft_patched"


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


def patch(module: str | Any, path: str, wrapper: Callable) -> bool:
    """Wrap ``module.path`` (e.g. ``"Trainer._prepare_for_training"``) with a wrapt ``wrapper``.

    Returns False, changing nothing, if it is already patched.
    """
    if is_patched(module, path):
        return False
    owner, attribute = _resolve(module, path)
    wrapt.wrap_function_wrapper(owner, attribute, wrapper)
    proxy = owner.__dict__.get(attribute, getattr(owner, attribute))
    setattr(proxy, MARKER, True)
    return True


def unpatch(module: str | Any, path: str) -> bool:
    """Undo :func:`patch`. Only a real patch of ours is unwrapped; a second call is harmless."""
    try:
        owner, attribute = _resolve(module, path)
    except (ImportError, AttributeError):
        return False
    current = owner.__dict__.get(attribute)
    if getattr(current, MARKER, False) and hasattr(current, "__wrapped__"):
        setattr(owner, attribute, current.__wrapped__)
        return True
    return False


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
        self._instrument(**options)
        self.instrumented = True
        return True

    def uninstrument(self) -> None:
        """Undo ``instrument``. A second call is harmless."""
        if not self.instrumented:
            return
        self._uninstrument()
        self.instrumented = False

    def _instrument(self, **options: Any) -> None:
        raise NotImplementedError

    def _uninstrument(self) -> None:
        raise NotImplementedError
