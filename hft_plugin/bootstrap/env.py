"""The environment variables that switch HFT on without code, and how they are read.

Every variable is a constant here, with its meaning. Precedence, highest first: the arguments of
the call (``enable_hft(trainer, round=2)``), the variables, the file named by ``HFT_CONFIG``, the
defaults of :class:`hft_plugin.HFTConfig`. A malformed value raises :class:`ConfigError` naming the
variable, when HFT is about to be applied (never at interpreter start-up).

    >>> from hft_plugin.bootstrap import env
    >>> env.load_config({"HFT_ENABLE": "1", "HFT_ROUND": "2"}).round
    2
    >>> env.is_enabled({"HFT_ENABLE": "0"})
    False

This module imports nothing but the standard library (``yaml`` only when ``HFT_CONFIG`` is a
YAML file), so the start-up hook can use it for free.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

HFT_ENABLE = "HFT_ENABLE"
"""``1``/``true``/``yes``/``on`` switches HFT on in every process that inherits it; ``0``/``false``/
``no``/``off`` or unset leaves everything alone. Any other value is an error when training starts."""

HFT_RATIO = "HFT_RATIO"
"""Trainable share of the transformer layers' parameters, a float in (0, 1). Default 0.5."""

HFT_STRATEGY = "HFT_STRATEGY"
"""``category`` (the paper's default), ``layer``, ``model``, or a strategy a plugin registers."""

HFT_ROUND = "HFT_ROUND"
"""Fine-tuning round, an integer >= 0. Each round trains a new half. Default 0."""

HFT_SEED = "HFT_SEED"
"""Seed of the draw, an integer >= 0. Default 0."""

HFT_TRAIN_EMBEDDINGS = "HFT_TRAIN_EMBEDDINGS"
"""Train the parameters outside the layers (embeddings, lm_head, final norm): a boolean. Default 1."""

HFT_CONFIG = "HFT_CONFIG"
"""Path of a YAML (``.yaml``/``.yml``) or JSON file holding the same keys in lower case (``ratio``,
``strategy``, ``round``, ``seed``, ``train_embeddings``). The single variables override it."""

HFT_DISABLE_ADAPTERS = "HFT_DISABLE_ADAPTERS"
"""Comma-separated adapter names (``transformers``, ``llamafactory``, ``openrlhf``) that the start-up
hook must not activate, e.g. when a framework's own integration should be used instead."""

HFT_SHARE_REFERENCE = "HFT_SHARE_REFERENCE"
"""Let a trainer's reference model (DPO, KTO, GRPO, ...) share the policy's frozen tensors instead of
holding its own copy of them: a boolean. Default 1. An integration option, not a selection option:
it changes no weight and goes into no manifest."""

CONFIG_VARIABLES = {
    "ratio": HFT_RATIO,
    "strategy": HFT_STRATEGY,
    "round": HFT_ROUND,
    "seed": HFT_SEED,
    "train_embeddings": HFT_TRAIN_EMBEDDINGS,
}
"""Which variable sets which :class:`~hft_plugin.HFTConfig` field."""

ALL_VARIABLES = (HFT_ENABLE, *CONFIG_VARIABLES.values(), HFT_CONFIG, HFT_DISABLE_ADAPTERS, HFT_SHARE_REFERENCE)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _error(message: str) -> Exception:
    from ..errors import ConfigError  # lazily: keep this module free for the start-up hook

    return ConfigError(message)


def parse_bool(variable: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _error(f"{variable}={text!r} is not a boolean; set it to 1 or 0 (true/false, yes/no, on/off also work).")


def _parse_int(variable: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _error(f"{variable}={text!r} is not an integer; set it to a whole number >= 0, e.g. {variable}=1.") from None
    if value < 0:
        raise _error(f"{variable}={text!r} is negative; rounds and seeds count from 0.")
    return value


def _parse_ratio(variable: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise _error(f"{variable}={text!r} is not a number; set it to a float in (0, 1), e.g. {variable}=0.5.") from None
    if not 0.0 < value < 1.0:  # also rejects nan
        raise _error(f"{variable}={text!r} is outside (0, 1); it is the trainable share, e.g. {variable}=0.5.")
    return value


def _parse_strategy(variable: str, text: str) -> str:
    value = text.strip()
    if not value:
        raise _error(f"{variable}={text!r} is empty; set it to category, layer or model (or unset it).")
    return value


_PARSERS = {
    "ratio": _parse_ratio,
    "strategy": _parse_strategy,
    "round": _parse_int,
    "seed": _parse_int,
    "train_embeddings": parse_bool,
}


def is_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HFT_ENABLE`` asks for HFT. Raises ConfigError on a value that is neither on nor off."""
    environ = os.environ if environ is None else environ
    return parse_bool(HFT_ENABLE, environ.get(HFT_ENABLE, ""))


def maybe_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """The start-up hook's cheap test: anything but unset or an explicit off counts, so a typo such
    as ``HFT_ENABLE=ture`` arms the hooks and then fails loudly at training time."""
    environ = os.environ if environ is None else environ
    return environ.get(HFT_ENABLE, "").strip().lower() not in _FALSE


def disabled_adapters(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The adapter names listed in ``HFT_DISABLE_ADAPTERS``."""
    environ = os.environ if environ is None else environ
    names = environ.get(HFT_DISABLE_ADAPTERS, "")
    return frozenset(n.strip().lower() for n in names.split(",") if n.strip())


def share_reference(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HFT_SHARE_REFERENCE`` lets the reference model share the policy's frozen half (unset:
    yes). Raises ConfigError on a value that is neither on nor off.

        >>> share_reference({}), share_reference({"HFT_SHARE_REFERENCE": "0"})
        (True, False)
    """
    environ = os.environ if environ is None else environ
    text = environ.get(HFT_SHARE_REFERENCE)
    return True if text is None else parse_bool(HFT_SHARE_REFERENCE, text)


def read_config_file(path: str) -> dict[str, Any]:
    """Read the mapping in an ``HFT_CONFIG`` file (YAML through ``yaml.safe_load``, or JSON)."""
    if not os.path.isfile(path):
        raise _error(f"{HFT_CONFIG}={path!r}: no such file; point it at a YAML or JSON file or unset it.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".json"):
            import json

            data = json.loads(text) if text.strip() else {}
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # JSONDecodeError, yaml.YAMLError
        raise _error(f"{HFT_CONFIG}={path!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise _error(f"{HFT_CONFIG}={path!r} must hold a mapping such as 'round: 1', not {type(data).__name__}.")
    from ..config import HFTConfig

    problem = HFTConfig.unknown_key(data)
    if problem:
        raise _error(f"{HFT_CONFIG}={path!r}: unknown key {problem}")
    return data


def config_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The HFTConfig fields that ``HFT_CONFIG`` and the single variables set (file first, variables
    over it), validated one variable at a time so an error names its source."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = environ.get(HFT_CONFIG, "").strip()
    if path:
        values.update(read_config_file(path))
    for field, variable in CONFIG_VARIABLES.items():
        text = environ.get(variable)
        if text is not None:
            values[field] = _PARSERS[field](variable, text)
    return values


def load_config(environ: Mapping[str, str] | None = None, **overrides: Any):
    """The :class:`~hft_plugin.HFTConfig` to use: ``overrides`` (call arguments, ``None`` meaning
    "not given") over the variables over ``HFT_CONFIG`` over the defaults.

        >>> config = load_config({"HFT_RATIO": "0.25", "HFT_ROUND": "1"}, ratio=None, round=3)
        >>> config.ratio, config.round
        (0.25, 3)
    """
    from ..config import HFTConfig

    values = config_values(environ)
    path = (os.environ if environ is None else environ).get(HFT_CONFIG, "").strip()
    try:
        config = HFTConfig.from_dict(values)
    except Exception as exc:  # a file value of the wrong type: say where it came from
        raise _error(f"{HFT_CONFIG}={path!r}: {exc}") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    return HFTConfig.from_dict(given, base=config) if given else config


def export(config_or_values: Any, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``HFT_ENABLE=1`` and one variable per given field into ``environ`` (default: a copy of
    ``os.environ``) and return it; used by ``hft-run``.

        >>> export({"round": 2}, {})["HFT_ROUND"]
        '2'
    """
    environ = dict(os.environ) if environ is None else environ
    values = config_or_values.to_dict() if hasattr(config_or_values, "to_dict") else dict(config_or_values)
    environ[HFT_ENABLE] = "1"
    for field, value in values.items():
        if value is None:
            continue
        if field not in CONFIG_VARIABLES:
            raise _error(f"Unknown HFT option {field!r}; known options: {', '.join(CONFIG_VARIABLES)}.")
        environ[CONFIG_VARIABLES[field]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return environ
