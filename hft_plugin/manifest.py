"""``hft_selection.json``, the manifest: written from a selection, and read back with every key and
type checked, so a damaged or hand-edited file is a :class:`~hft_plugin.ManifestError` that names
the file and what is wrong, never a KeyError. :class:`hft_plugin.Selection` reads and writes it
through this module (``to_dict``, ``to_json``, ``from_json``, ``save``, ``load``); docs/manifest.md
describes every field.

Formats: 1 (fingerprint of parameter names and shapes) and 2 (the fingerprint also covers how fused
tensors are split, and the history of rounds). A format 1 file records every part's boxes, so it is
upgraded as it is read.

    >>> from hft_plugin import select_half
    >>> from hft_plugin.testing import tiny_model
    >>> selection = select_half(tiny_model("llama"))
    >>> from hft_plugin.selection import Selection
    >>> selection_from_json(Selection, selection.to_json()).trainable_units == selection.trainable_units
    True
"""

from __future__ import annotations

import json
import os
from typing import Any

from .config import NEXT_ROUND, HFTConfig
from .errors import ConfigError, ManifestError
from .layouts.base import Layout, Part, Unit, fingerprint_shapes

MANIFEST_NAME = "hft_selection.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


def selection_to_dict(selection) -> dict[str, Any]:
    """The manifest of ``selection`` (a Selection), as JSON-ready data in the current format."""
    return {
        "format": FORMAT_VERSION,
        "config": selection.config.to_dict(),
        "layout": selection.layout.name,
        "fingerprint": selection.fingerprint,
        "shapes": {n: list(s) for n, s in selection.layout.shapes.items()},
        "outside": list(selection.layout.outside),
        "layers": [
            [{"key": u.key, "group": u.role, "trainable": u.key in selection.trainable_units,
              "parts": [{"param": p.param, "numel": p.numel,
                         "boxes": None if p.boxes is None else [[list(r) for r in b] for b in p.boxes]}
                        for p in u.parts]}
             for u in layer]
            for layer in selection.layout.layers
        ],
        "history": [dict(h) for h in selection.history],
        "stats": selection.stats(),
        **({"scores": {"file": selection.config.scores, "sha256": selection.scores_sha256}}
           if selection.config.scores is not None else {}),
    }


def read_manifest(cls, path: str):
    """Read ``path`` (a manifest file, or a folder holding ``hft_selection.json``) into a ``cls`` (a
    Selection). Raises ManifestError naming the file when it cannot be read or is not valid."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    return cls.from_json(raw, source=path)


def selection_from_json(cls, text: str | bytes, source: str = "the selection"):
    """Parse ``text`` (the content of ``source``) into a ``cls`` (a Selection). Raises ManifestError."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{source} is not valid JSON ({exc}); it is damaged or truncated. {_MANIFEST_FIX}") from None
    return selection_from_dict(cls, data, source)


_MANIFEST_FIX = ("Restore it from a copy, resume from another checkpoint, or start the round from the weights "
                 "without resume_from_checkpoint (a new manifest is written when training starts).")


def selection_from_dict(cls, data: Any, source: str):
    """Build a Selection from a parsed manifest, checking every key and type on the way."""

    def bad(what: str) -> ManifestError:
        return ManifestError(f"{source} is not a valid HFT selection: {what}. {_MANIFEST_FIX}")

    def need(mapping: Any, key: str, kind, where: str):
        if not isinstance(mapping, dict):
            raise bad(f"{where} is {type(mapping).__name__}, not an object")
        if key not in mapping:
            raise bad(f"{where} has no {key!r}")
        value = mapping[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise bad(f"{where}[{key!r}] is {type(value).__name__} {value!r:.60}, not {names}")
        return value

    def ints(value: Any, where: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad(f"{where} is {value!r:.60}, not a list of integers")
        return tuple(value)

    if not isinstance(data, dict):
        raise bad(f"it holds a JSON {type(data).__name__}, not an object")
    version = data.get("format")
    if version not in READABLE_FORMATS:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ManifestError(f"{source} has selection format {version}, written by a newer hft-plugin; this one "
                                f"reads formats {', '.join(map(str, READABLE_FORMATS))}. Upgrade hft-plugin.")
        raise bad(f"its 'format' is {version!r}; this version reads {', '.join(map(str, READABLE_FORMATS))}")
    try:
        config = HFTConfig(**need(data, "config", dict, "the file"))
    except (TypeError, ConfigError) as exc:
        raise bad(f"its 'config' is invalid ({exc})") from None
    if config.round == NEXT_ROUND:
        raise bad("its config has round='next'; a manifest records the round that ran")
    shapes = {}
    for name, shape in need(data, "shapes", dict, "the file").items():
        shapes[name] = ints(shape, f"shapes[{name!r}]")
    outside = need(data, "outside", list, "the file")
    if not all(isinstance(n, str) and n in shapes for n in outside):
        raise bad("'outside' names parameters that are not in 'shapes'")
    layers, trainable = [], set()
    for index, layer in enumerate(need(data, "layers", list, "the file")):
        if not isinstance(layer, list):
            raise bad(f"layers[{index}] is {type(layer).__name__}, not a list")
        units = []
        for position, u in enumerate(layer):
            where = f"layers[{index}][{position}]"
            parts = []
            for k, p in enumerate(need(u, "parts", list, where)):
                pwhere = f"{where}.parts[{k}]"
                param = need(p, "param", str, pwhere)
                if param not in shapes:
                    raise bad(f"{pwhere} names {param!r}, which is not in 'shapes'")
                boxes = need(p, "boxes", (list, type(None)), pwhere)
                if boxes is not None:
                    try:
                        boxes = tuple(tuple(_range(r) for r in box) for box in boxes)
                    except (TypeError, ValueError):
                        raise bad(f"{pwhere}['boxes'] is not a list of [dim, start, stop] lists") from None
                parts.append(Part(param, need(p, "numel", int, pwhere), boxes))
            key = need(u, "key", str, where)
            units.append(Unit(key, need(u, "group", str, where), index, tuple(parts)))
            if need(u, "trainable", bool, where):
                trainable.add(key)
        layers.append(units)
    history = data.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) and isinstance(h.get("round"), int)
                                                for h in history):
        raise bad("'history' is not a list of earlier rounds (objects with an integer 'round')")
    layout = Layout(need(data, "layout", str, "the file"), layers, list(outside), shapes)
    scores = data.get("scores")
    scores_sha256 = scores.get("sha256") if isinstance(scores, dict) else None
    selection = cls(config, layout, frozenset(trainable), tuple(history),
                    scores_sha256 if isinstance(scores_sha256, str) else None)
    saved = need(data, "fingerprint", str, "the file")
    # Format 1 hashed names and shapes only; its parts carry the splits, so it upgrades losslessly.
    expected = fingerprint_shapes(shapes) if version == 1 else selection.fingerprint
    if saved != expected:
        raise bad(f"its fingerprint {saved} does not match its own contents ({expected}); it was edited or is corrupt")
    return selection


def _range(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value):
        raise ValueError(value)
    return (value[0], value[1], value[2])
