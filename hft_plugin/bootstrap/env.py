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

The variables are read as one snapshot (:func:`snapshot`), taken again only when an ``HFT_*``
variable has changed, so the adapters, the start-up hook and the guard judge the same values. The true/false words are those
of :mod:`hft_plugin.switches`, the same in every place.

This module imports nothing but the standard library (``yaml`` only when ``HFT_CONFIG`` is a
YAML file, the plugins only to check a strategy that is not built in), so the start-up hook can
use it for free.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

from .. import switches
from ..parsing import DECIMAL as _DECIMAL, error as _error, read_bool
# The value parsers live in the core (the command line reads its flags by the same rules); they are
# named here too, as they always were: env.parse_int, env.flag_type, ...
from ..parsing import flag_type, parse_bool, parse_int, parse_max_kl, parse_path, parse_ratio, parse_round  # noqa: F401

HFT_ENABLE = "HFT_ENABLE"
"""``1``/``true``/``yes``/``on`` switches HFT on in every process that inherits it; ``0``/``false``/
``no``/``off``, empty or unset leaves everything alone. Any other value (``flase``, ``ture``) is an
error when training starts. Read again each time a trainer starts training, so a program can switch
HFT off (``0``) for one task and on for the next."""

HFT_RATIO = "HFT_RATIO"
"""Trainable share of the transformer layers' parameters, a decimal number in (0, 1) such as
``0.5``. Default 0.5."""

HFT_STRATEGY = "HFT_STRATEGY"
"""``category`` (the paper's default), ``layer``, ``model``, or a strategy a plugin registers."""

HFT_ROUND = "HFT_ROUND"
"""Fine-tuning round: plain decimal digits (``0``, ``1``, ``2``, ...), or ``next`` for the round
after the one recorded in the manifest of the folder the model was loaded from. Each round trains a
new half. Default 0. Read when each ``train()`` starts, so a script may change it between tasks."""

HFT_SEED = "HFT_SEED"
"""Seed of the draw: plain decimal digits. Default 0."""

HFT_TRAIN_EMBEDDINGS = "HFT_TRAIN_EMBEDDINGS"
"""Train the parameters outside the layers (embeddings, lm_head, final norm): ``1``/``true``/
``yes``/``on`` or ``0``/``false``/``no``/``off``; empty is an error. Default 1."""

HFT_SCORES = "HFT_SCORES"
"""The importance scores file that ``HFT_STRATEGY=shielded`` reads: a path, as
``hft_plugin.importance.compute_scores(model).save(folder)`` returned it (absolute, so every worker
finds it whatever its directory). Read by every rank; nothing is recomputed."""

HFT_CONFIG = "HFT_CONFIG"
"""Path of a YAML (``.yaml``/``.yml``) or JSON file holding the same keys in lower case (``ratio``,
``strategy``, ``round``, ``seed``, ``train_embeddings``). The single variables override it."""

HFT_DISABLE_ADAPTERS = "HFT_DISABLE_ADAPTERS"
"""Comma-separated adapter names (``transformers``, ``llamafactory``, ``openrlhf``, ``axolotl``,
``swift``) that the start-up hook must not activate, e.g. when a framework's own integration should
be used instead."""

HFT_SHARE_REFERENCE = "HFT_SHARE_REFERENCE"
"""Let a trainer's reference model (DPO, KTO, GRPO, ...) share the policy's frozen tensors instead of
holding its own copy of them: a boolean. Default 1. An integration option, not a selection option:
it changes no weight and goes into no manifest."""

HFT_DISABLE_PLUGIN_AUTOLOAD = "HFT_DISABLE_PLUGIN_AUTOLOAD"
"""``1``/``true``/``yes``/``on`` skips the third-party plugins that ``hft_plugin`` entry points name (see
:mod:`hft_plugin.plugins`); the built-in layouts and strategies stay."""
HFT_WATCH_FORGETTING = "HFT_WATCH_FORGETTING"
"""Watch forgetting while training (:func:`hft_plugin.watch_forgetting`): a boolean. With ``HFT_ENABLE``
or on its own (a full fine-tune gets the same curve). Every ``transformers.Trainer`` (TRL's CLI,
LLaMA-Factory, Axolotl, ms-swift) logs ``forgetting/kl`` and ``forgetting/nll_delta``. Default 0."""

HFT_WATCH_EVERY = "HFT_WATCH_EVERY"
"""Optimizer steps between two forgetting measurements: plain decimal digits, at least 1. Default 50."""

HFT_MAX_KL = "HFT_MAX_KL"
"""Forgetting budget: a positive decimal number of nats per token; training stops at the first
measurement of KL(base || model) above it. Needs ``HFT_WATCH_FORGETTING=1``. Default: no budget."""

WATCH_VARIABLES = (HFT_WATCH_FORGETTING, HFT_WATCH_EVERY, HFT_MAX_KL)
"""The forgetting monitor's variables: integration options, in no manifest."""

HFT_REPLAY = "HFT_REPLAY"
"""Replay in every trainer zero-code activation reaches: ``self`` (texts the model samples from its
BOS token when training starts, stored in ``output_dir/hft_replay_self.json``), ``earlier`` (the task
data earlier rounds recorded in the loaded model's folder), or the path of a JSON, JSON-lines or text
file of earlier data (several: separated by commas). Unset or empty: no replay. A trainer whose data
pipeline cannot take replay (online RL) trains without it, with one log line."""

HFT_REPLAY_RATIO = "HFT_REPLAY_RATIO"
"""Share of each training batch from the ``HFT_REPLAY`` source, a decimal in [0, 1). Default 0.1."""

HFT_REPLAY_TASK = "HFT_REPLAY_TASK"
"""Path of this run's training data file, recorded in ``output_dir/hft_replay.json`` so the next round's
``HFT_REPLAY=earlier`` replays it."""

REPLAY_VARIABLES = (HFT_REPLAY, HFT_REPLAY_RATIO, HFT_REPLAY_TASK)

CONFIG_VARIABLES = {
    "ratio": HFT_RATIO,
    "strategy": HFT_STRATEGY,
    "round": HFT_ROUND,
    "seed": HFT_SEED,
    "train_embeddings": HFT_TRAIN_EMBEDDINGS,
    "scores": HFT_SCORES,
}
"""Which variable sets which :class:`~hft_plugin.HFTConfig` field."""

ALL_VARIABLES = (HFT_ENABLE, *CONFIG_VARIABLES.values(), HFT_CONFIG, HFT_DISABLE_ADAPTERS, HFT_SHARE_REFERENCE,
                 HFT_DISABLE_PLUGIN_AUTOLOAD, *REPLAY_VARIABLES)
ALL_VARIABLES += WATCH_VARIABLES

TOOLING_VARIABLES = frozenset({
    "HFT_AXOLOTL_SITE", "HFT_AXOLOTL_VENV", "HFT_LF_VENV", "HFT_ORLHF_VENV", "HFT_SWIFT_VENV",
    "HFT_BENCH_THREADS", "HFT_WORKER_ONLY",
})
"""Names this repository's own scripts read (CI cells, test workers, benchmarks), not the plugin:
the name check accepts them, so a CI run that exports one and trains with ``HFT_ENABLE=1`` is no
typo."""

_TRUE, _FALSE = switches.ON, switches.OFF
BUILTIN_STRATEGIES = ("category", "layer", "model", "shielded")


class Settings(Mapping[str, str]):
    """The ``HFT_*`` variables (any case) at one moment, read-only: every reader of this module
    takes one where it takes an environment, so all of them judge the same values."""

    def __init__(self, items: tuple[tuple[str, str], ...]) -> None:
        self.items_key = items
        self._values = dict(items)

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


_LAST: list[Settings] = []  # the newest snapshot, reused while the HFT_* variables stay the same


def snapshot(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of ``environ`` (default ``os.environ``): the same object as long as its
    ``HFT_*`` variables are unchanged, so they are read once per change of them.

        >>> snapshot({"HFT_ROUND": "1", "PATH": "/bin"}) is snapshot({"HFT_ROUND": "1"})
        True
    """
    environ = os.environ if environ is None else environ
    if isinstance(environ, Settings):
        return environ
    items = tuple(sorted((name, value) for name, value in environ.items() if name[:4].upper() == "HFT_"))
    if not _LAST or _LAST[0].items_key != items:
        _LAST[:] = [Settings(items)]
    return _LAST[0]


def _parse_strategy(variable: str, text: str) -> str:
    value = text.strip()
    if not value:
        raise _error(f"{variable}={text!r} is empty; set it to {', '.join(BUILTIN_STRATEGIES)} (or a plugin's), or unset it.")
    return value


def check_strategy(name: str, source: str) -> None:
    """Raise ConfigError naming ``source`` (a variable or a flag) if ``name`` is no known strategy.
    The built-in names are checked without importing anything; others load the plugins (torch)."""
    if name in BUILTIN_STRATEGIES:
        return
    from ..selection import strategy_names

    known = strategy_names()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _error(f"{source}={name!r} is not a known strategy.{hint} Known strategies: {', '.join(known)}.")


PARSERS = {  # field -> parser(name to report, text); the name is the variable, or the flag a user typed
    "ratio": parse_ratio,
    "strategy": _parse_strategy,
    "round": parse_round,
    "seed": parse_int,
    "train_embeddings": parse_bool,
    "scores": parse_path,
}


def is_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HFT_ENABLE`` asks for HFT (unset or empty: no). Raises ConfigError on a value that
    is neither on nor off, naming the variable and the accepted values."""
    environ = snapshot(environ)
    text = environ.get(HFT_ENABLE, "")
    if not text.strip() or switches.read(text) is not None:
        return switches.read(text) is True
    raise _error(f"{HFT_ENABLE}={text!r} is neither on nor off, so HFT is not applied and nothing trains; set it "
                 f"to {'/'.join(_TRUE)} to switch HFT on, or to {'/'.join(_FALSE)} (or unset it) to leave it off.")


def switched_off(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HFT_ENABLE`` is set to an explicit off value (``0``/``false``/``no``/``off``), as
    opposed to unset. Raises ConfigError on a malformed value."""
    environ = snapshot(environ)
    return bool(environ.get(HFT_ENABLE, "").strip()) and not is_enabled(environ)


def maybe_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """The start-up hook's cheap test: anything but unset or an explicit off counts, so a typo such
    as ``HFT_ENABLE=ture`` arms the hooks and then fails loudly at training time."""
    environ = snapshot(environ)
    return environ.get(HFT_ENABLE, "").strip().lower() not in ("", *_FALSE)


def disabled_adapters(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The adapter names listed in ``HFT_DISABLE_ADAPTERS``."""
    names = snapshot(environ).get(HFT_DISABLE_ADAPTERS, "")
    return frozenset(n.strip().lower() for n in names.split(",") if n.strip())


def share_reference(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HFT_SHARE_REFERENCE`` lets the reference model share the policy's frozen half (unset:
    yes). Raises ConfigError, naming the variable, on a value that is neither on nor off (empty too).

        >>> share_reference({}), share_reference({"HFT_SHARE_REFERENCE": "0"})
        (True, False)
    """
    return read_bool(snapshot(environ), HFT_SHARE_REFERENCE, True)


def maybe_watching(environ: Mapping[str, str] | None = None) -> bool:
    """The start-up hook's cheap test for ``HFT_WATCH_FORGETTING``: anything but unset or an explicit
    off arms the hook (a malformed value then fails when training starts)."""
    environ = snapshot(environ)
    return environ.get(HFT_WATCH_FORGETTING, "").strip().lower() not in ("", *_FALSE)


def watch_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The options of :func:`hft_plugin.watch_forgetting` that the variables set, or None when
    ``HFT_WATCH_FORGETTING`` is unset or off. Raises ConfigError naming a malformed variable
    (``HFT_WATCH_EVERY``, ``HFT_MAX_KL`` included, and ``HFT_MAX_KL`` set without the monitor).

        >>> watch_settings({"HFT_WATCH_FORGETTING": "1", "HFT_WATCH_EVERY": "20", "HFT_MAX_KL": "0.1"})
        {'every': 20, 'max_kl': 0.1}
        >>> watch_settings({}) is None
        True
    """
    environ = snapshot(environ)
    text = environ.get(HFT_WATCH_FORGETTING)
    if text is None or not text.strip() or not parse_bool(HFT_WATCH_FORGETTING, text):
        if environ.get(HFT_MAX_KL, "").strip():
            raise _error(f"{HFT_MAX_KL}={environ[HFT_MAX_KL]!r} is a forgetting budget, but {HFT_WATCH_FORGETTING} is "
                         f"{'unset' if text is None else repr(text)}, so nothing would measure it: set "
                         f"{HFT_WATCH_FORGETTING}=1, or unset {HFT_MAX_KL}.")
        return None
    settings: dict[str, Any] = {}
    if environ.get(HFT_WATCH_EVERY) is not None:
        settings["every"] = parse_int(HFT_WATCH_EVERY, environ[HFT_WATCH_EVERY])
        if settings["every"] < 1:
            raise _error(f"{HFT_WATCH_EVERY}={environ[HFT_WATCH_EVERY]!r} must be at least 1 (optimizer steps).")
    if environ.get(HFT_MAX_KL) is not None:
        settings["max_kl"] = parse_max_kl(HFT_MAX_KL, environ[HFT_MAX_KL])
    return settings


def replay_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What ``HFT_REPLAY``, ``HFT_REPLAY_RATIO`` and ``HFT_REPLAY_TASK`` ask for, or None when
    ``HFT_REPLAY`` is unset or empty. Raises ConfigError naming the variable on a malformed value.

        >>> replay_settings({"HFT_REPLAY": "self", "HFT_REPLAY_RATIO": "0.2"})
        {'source': 'self', 'ratio': 0.2, 'task_data': None}
        >>> replay_settings({"HFT_REPLAY": "a.jsonl,b.jsonl"})["source"]
        ['a.jsonl', 'b.jsonl']
    """
    environ = snapshot(environ)
    text = environ.get(HFT_REPLAY, "").strip()
    ratio_text = environ.get(HFT_REPLAY_RATIO)
    ratio = 0.1
    if ratio_text is not None:
        value = ratio_text.strip()
        if not _DECIMAL.fullmatch(value):
            raise _error(f"{HFT_REPLAY_RATIO}={ratio_text!r} is not a number; set it to a decimal in [0, 1), e.g. "
                         f"{HFT_REPLAY_RATIO}=0.1.")
        ratio = float(value)
        if not 0.0 <= ratio < 1.0:
            raise _error(f"{HFT_REPLAY_RATIO}={ratio_text!r} is outside [0, 1); it is the share of each batch "
                         f"drawn from {HFT_REPLAY}, e.g. {HFT_REPLAY_RATIO}=0.1 (0 turns replay off).")
    if not text:
        if ratio_text is not None:
            raise _error(f"{HFT_REPLAY_RATIO} is set but {HFT_REPLAY} is not; set {HFT_REPLAY}=self, "
                         f"{HFT_REPLAY}=earlier or {HFT_REPLAY}=PATH, or unset {HFT_REPLAY_RATIO}.")
        return None
    if text.lower() in ("self", "earlier"):
        source: Any = text.lower()
    else:
        paths = [p.strip() for p in text.split(",") if p.strip()]
        source = paths[0] if len(paths) == 1 else paths
    task = environ.get(HFT_REPLAY_TASK, "").strip() or None
    return {"source": source, "ratio": ratio, "task_data": task}


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


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each ``HFT_*`` name in ``environ`` (any case) that the plugin does not read, with the known
    name it most resembles, or None. The plugin would ignore such a variable, so a misspelt
    ``HFT_RATO=0.25`` would train at the default ratio.

        >>> unknown_variables({"HFT_RATO": "0.25", "HFT_ROUND": "1", "HFT_API_KEY": "x"})
        [('HFT_API_KEY', None), ('HFT_RATO', 'HFT_RATIO')]
    """
    import difflib

    environ = snapshot(environ)
    known = (*ALL_VARIABLES, *sorted(TOOLING_VARIABLES))
    # compared without the shared "HFT_" prefix, which would make every pair look alike
    stems = {name[4:]: name for name in known}
    found = []
    for name in sorted(environ):
        if name[:4].upper() != "HFT_" or name in stems.values():
            continue
        close = difflib.get_close_matches(name[4:].upper(), stems, n=1, cutoff=0.6)
        found.append((name, stems[close[0]] if close else None))
    return found


_REPORTED: set[str] = set()  # unknown names without a likely meaning, warned about once per process


def check_names(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for an ``HFT_*`` name that looks like a misspelt variable of the plugin
    (``HFT_RATO``: did you mean ``HFT_RATIO``?), since training would silently use the default in
    its place; warn once about one that resembles none (another tool's ``HFT_API_KEY``)."""
    environ = snapshot(environ)
    unknown = unknown_variables(environ)
    typos = [(name, guess) for name, guess in unknown if guess is not None]
    if typos:
        name, guess = typos[0]
        more = f" (and {', '.join(n for n, _ in typos[1:])})" if len(typos) > 1 else ""
        raise _error(f"{name}={environ[name]!r} is not a variable hft-plugin reads, so it would be ignored"
                     f"{more}. Did you mean {guess}? Rename it, or unset it (the variables: docs/activation.md).")
    for name, _ in unknown:
        if name not in _REPORTED:
            _REPORTED.add(name)
            import logging

            logging.getLogger("hft_plugin").warning(
                "hft_plugin: %s is not a variable hft-plugin reads; it is ignored (the variables: "
                "docs/activation.md).", name)


def config_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The HFTConfig fields that ``HFT_CONFIG`` and the single variables set (file first, variables
    over it), validated one variable at a time so an error names its source. ``HFT_ENABLE`` is
    checked too: a malformed switch is an error here, never a silent "on"; and so are the names
    (:func:`check_names`): a misspelt variable is an error here, never a silent default."""
    environ = snapshot(environ)
    is_enabled(environ)
    check_names(environ)
    values: dict[str, Any] = {}
    path = environ.get(HFT_CONFIG, "").strip()
    if path:
        values.update(read_config_file(path))
    for field, variable in CONFIG_VARIABLES.items():
        text = environ.get(variable)
        if text is not None:
            values[field] = PARSERS[field](variable, text)
    return values


def load_config(environ: Mapping[str, str] | None = None, **overrides: Any):
    """The :class:`~hft_plugin.HFTConfig` to use: ``overrides`` (call arguments, ``None`` meaning
    "not given") over the variables over ``HFT_CONFIG`` over the defaults.

        >>> config = load_config({"HFT_RATIO": "0.25", "HFT_ROUND": "1"}, ratio=None, round=3)
        >>> config.ratio, config.round
        (0.25, 3)
    """
    from ..config import HFTConfig

    environ = snapshot(environ)
    values = config_values(environ)
    path = environ.get(HFT_CONFIG, "").strip()
    try:
        config = HFTConfig.from_dict(values)
    except Exception as exc:  # a file value of the wrong type: say where it came from
        raise _error(f"{HFT_CONFIG}={path!r}: {exc}") from None
    if HFT_STRATEGY in environ:
        check_strategy(config.strategy, HFT_STRATEGY)
    elif "strategy" in values:
        check_strategy(config.strategy, f"{HFT_CONFIG}={path!r}: strategy")
    given = {k: v for k, v in overrides.items() if v is not None}
    return HFTConfig.from_dict(given, base=config) if given else config


def training_config(environ: Mapping[str, str] | None = None):
    """What zero-code activation trains with, read when training starts: None if ``HFT_ENABLE`` is
    explicitly off at this moment (this run trains without HFT), else :func:`load_config`. Raises
    ConfigError on a malformed variable, ``HFT_ENABLE`` included.

        >>> training_config({"HFT_ENABLE": "0", "HFT_ROUND": "3"}) is None
        True
        >>> training_config({"HFT_ENABLE": "1", "HFT_ROUND": "next"}).round
        'next'
    """
    environ = snapshot(environ)
    if switched_off(environ):
        import logging

        logging.getLogger("hft_plugin").info("hft_plugin: %s is off; this run trains without HFT.", HFT_ENABLE)
        return None
    return load_config(environ)


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
