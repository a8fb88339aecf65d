"""How a setting's text becomes a value: the same rules for an ``HFT_*`` variable and a command-line flag.

Each parser takes the name to report (a variable such as ``HFT_ROUND``, or a flag such as ``--round``)
and the text, and returns the value or raises :class:`~hft_plugin.errors.ConfigError` naming it.
The rules are stricter than ``int()`` and ``float()``, which would read ``1_0`` as 10 or take
``inf``. The variables themselves are declared in :mod:`hft_plugin.bootstrap.env`; the true/false
words are those of :mod:`hft_plugin.switches`.

    >>> parse_round("HFT_ROUND", " next "), parse_ratio("--ratio", "0.25")
    ('next', 0.25)

Standard library only: the start-up hook reads the variables through these parsers.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from . import switches

DIGITS = re.compile(r"[0-9]+")
"""A whole number in plain ASCII digits."""
DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A plain decimal number: no sign, no ``_``, no ``inf`` or ``nan``."""


def error(message: str) -> Exception:
    """A :class:`~hft_plugin.errors.ConfigError` (imported only when raised: this module stays
    free for the start-up hook)."""
    from .errors import ConfigError

    return ConfigError(message)


def parse_bool(variable: str, text: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False (any case, spaces around ignored);
    anything else, the empty string included, raises ConfigError naming ``variable``."""
    value = switches.read(text)
    if value is not None:
        return value
    what = "is empty" if not text.strip() else "is not a boolean"
    raise error(f"{variable}={text!r} {what}; accepted values: {switches.WORDS} (any case), or unset it for the "
                "default.")


def parse_int(variable: str, text: str) -> int:
    """A whole number >= 0 in plain ASCII digits (spaces around ignored); else ConfigError naming ``variable``."""
    value = text.strip()
    if not DIGITS.fullmatch(value):  # int() would also take "1_0", "+1", "٣"
        raise error(f"{variable}={text!r} is not a whole number; write plain decimal digits, e.g. {variable}=1.")
    return int(value)


def parse_round(variable: str, text: str) -> int | str:
    """A round: plain ASCII digits, or ``next``; else ConfigError naming ``variable``."""
    value = text.strip()
    if value.lower() == "next":
        return "next"
    if not DIGITS.fullmatch(value):
        raise error(f"{variable}={text!r} is not a round; write plain decimal digits (0, 1, 2, ...) or 'next' "
                    "(the round after the one in the loaded model's hft_selection.json).")
    return int(value)


def parse_ratio(variable: str, text: str) -> float:
    """A plain decimal in (0, 1); else ConfigError naming ``variable``."""
    value = text.strip()
    if not DECIMAL.fullmatch(value):  # float() would also take "0_5", "inf", "nan"
        raise error(f"{variable}={text!r} is not a number; set it to a decimal in (0, 1), e.g. {variable}=0.5.")
    ratio = float(value)
    if not 0.0 < ratio < 1.0:
        raise error(f"{variable}={text!r} is outside (0, 1); it is the trainable share, e.g. {variable}=0.5.")
    return ratio


def parse_path(variable: str, text: str) -> str:
    """A file path (spaces around ignored); empty is a ConfigError naming ``variable``."""
    value = text.strip()
    if not value:
        raise error(f"{variable}={text!r} is empty; set it to the scores file that "
                    "hft_plugin.importance.compute_scores(model).save(folder) wrote, or unset it.")
    return value


def parse_max_kl(variable: str, text: str) -> float:
    """A plain positive decimal (nats per token); else ConfigError naming ``variable``."""
    value = text.strip()
    if not DECIMAL.fullmatch(value) or float(value) <= 0:
        raise error(f"{variable}={text!r} is not a positive number; it is the largest KL(base || model), in nats per "
                    f"token, at which training goes on, e.g. {variable}=0.05. Unset it for no budget.")
    return float(value)


def read_bool(environ: Mapping[str, str], variable: str, default: bool) -> bool:
    """``variable`` of ``environ`` by :func:`parse_bool`, or ``default`` when it is unset (empty is
    an error, as for every boolean variable).

        >>> read_bool({}, "HFT_SHARE_REFERENCE", True)
        True
        >>> read_bool({"HFT_SHARE_REFERENCE": "off"}, "HFT_SHARE_REFERENCE", True)
        False
    """
    text = environ.get(variable)
    return default if text is None else parse_bool(variable, text)


def flag_type(parse: Callable[[str, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that reads a command-line flag by the rules of its ``HFT_*`` variable
    (``parse`` is one of this module's parsers), so ``--round 1_0`` is refused as ``HFT_ROUND=1_0``
    is, where ``int()`` would read 10.

        >>> import argparse
        >>> flag_type(parse_int, "--seed")("3")
        3
        >>> flag_type(parse_int, "--seed")("1_0")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: --seed='1_0' is not a whole number; write plain decimal digits, e.g. --seed=1.
    """
    import argparse

    def convert(text: str) -> Any:
        try:
            return parse(flag, text)
        except ValueError as problem:  # ConfigError is a ValueError
            raise argparse.ArgumentTypeError(str(problem)) from None

    convert.__name__ = flag.lstrip("-")  # argparse names the type in "invalid ... value"
    return convert
