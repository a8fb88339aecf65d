"""``hft verify BASE TUNED``: is the frozen half of a tuned checkpoint bit-identical to its base,
and what trained?

HFT promises that what a round freezes ends the round bit-identical. A checkpoint that an HFT run
saved carries the proof's other half: its manifest (``hft_selection.json``, see docs/manifest.md)
records which tensors, and which boxes of partly trained tensors, that round trained. This module
reads both checkpoints tensor by tensor (never a whole model; memory stays near the largest
tensor), under the names the manifest uses: the names the model has in memory, which transformers
5 may store otherwise (one key per expert for the stacked ``experts.gate_up_proj``; see
:class:`hft_plugin.weights.ConvertedCheckpoint`, which merges them with transformers' own
conversion mapping). For each tensor it counts the frozen elements that differ from the base (the
promise: none) and the trainable elements that moved.

Equality is bit equality: ``0.0`` and ``-0.0`` differ, a NaN equals the same NaN. When the two
checkpoints store a tensor in different dtypes (a bf16 base trained and saved in fp32), the base
is cast to the tuned dtype first, and the row says so.

    >>> import os, tempfile
    >>> from hft_plugin import select_half
    >>> from hft_plugin.testing import tiny_model
    >>> root = tempfile.mkdtemp()
    >>> base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    >>> base.save_pretrained(os.path.join(root, "base"))
    >>> selection = select_half(tuned, round=0)
    >>> with torch.no_grad():                      # "train" exactly the trainable half
    ...     for name, param in tuned.named_parameters():
    ...         if name in selection.plan().trainable:
    ...             _ = param.add_(1.0)
    >>> tuned.save_pretrained(os.path.join(root, "tuned"))
    >>> _ = selection.save(os.path.join(root, "tuned"))
    >>> report = verify_checkpoint(os.path.join(root, "base"), os.path.join(root, "tuned"))
    >>> report.holds, report.totals()["changed_elements"], report.totals()["moved_elements"] > 0
    (True, 0, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import torch

from .errors import ManifestError, SelectionMismatchError
from .selection import MANIFEST_NAME, Selection
from .weights import CheckpointWeights, ConvertedCheckpoint, dtype_code, meta_model

__all__ = ["verify_checkpoint", "VerifyReport", "TensorCheck", "run_cli", "EXIT_BROKEN"]

EXIT_BROKEN = 1
"""The exit code of ``hft verify`` when a frozen element differs from the base (2 is a usage or input error)."""

# Elements compared as integers of their size: bit equality, so -0.0 != 0.0 and a NaN equals itself.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass
class TensorCheck:
    """One tensor of the model: what the manifest says of it, and what the checkpoints show.

    ``half`` is ``"frozen"`` (frozen whole), ``"trains"`` (trains whole), ``"in part"`` (some boxes
    train) or ``"unlisted"`` (in both checkpoints but not in the manifest: a buffer, say; compared,
    never judged). ``changed`` counts frozen elements that differ from the base, ``moved``
    trainable elements that do.
    """

    name: str
    half: str
    numel: int
    frozen: int
    changed: int
    trainable: int
    moved: int
    stored: tuple[str, ...] = ()  # the tuned checkpoint's stored keys it was built from
    cast: str | None = None  # "BF16 -> F32" when the base stores it in another dtype
    first_changed: tuple[int, ...] | None = None  # index of the first frozen element that differs
    base_value: float | None = None  # ... its value in the base
    tuned_value: float | None = None  # ... and in the tuned checkpoint

    @property
    def holds(self) -> bool:
        return self.changed == 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stored"] = list(self.stored)
        out["first_changed"] = None if self.first_changed is None else list(self.first_changed)
        out["holds"] = self.holds
        return out


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found: one :class:`TensorCheck` per tensor, in the manifest's order."""

    base: str
    tuned: str
    manifest: str
    selection: Selection
    tensors: list[TensorCheck]
    conversion: str
    unplaced: list[str] = dataclasses.field(default_factory=list)  # stored keys of TUNED the model does not have

    @property
    def holds(self) -> bool:
        """True when every frozen element is bit-identical to the base."""
        return all(t.holds for t in self.tensors)

    @property
    def broken(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.holds]

    def totals(self) -> dict[str, Any]:
        judged = [t for t in self.tensors if t.half != "unlisted"]
        trainable = [t for t in judged if t.trainable]
        return {
            "frozen_tensors": sum(t.half == "frozen" for t in judged),
            "trains_tensors": sum(t.half == "trains" for t in judged),
            "partial_tensors": sum(t.half == "in part" for t in judged),
            "frozen_elements": sum(t.frozen for t in judged),
            "changed_elements": sum(t.changed for t in judged),
            "changed_tensors": [t.name for t in judged if not t.holds],
            "trainable_elements": sum(t.trainable for t in judged),
            "moved_elements": sum(t.moved for t in judged),
            "unmoved_tensors": [t.name for t in trainable if t.moved == 0],
            "unlisted_tensors": [t.name for t in self.tensors if t.half == "unlisted"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "holds": self.holds,
            "base": os.path.abspath(self.base),
            "tuned": os.path.abspath(self.tuned),
            "manifest": os.path.abspath(self.manifest),
            "config": self.selection.config.to_dict(),
            "fingerprint": self.selection.fingerprint,
            "conversion": self.conversion,
            "totals": self.totals(),
            "tensors": [t.to_dict() for t in self.tensors],
            "unplaced_stored_keys": list(self.unplaced),
        }

    def table(self) -> str:
        """One row per tensor: its half, frozen elements and how many changed, trainable elements
        and how many moved, and the verdict."""
        several = any(len(t.stored) > 1 for t in self.tensors)
        width = max([len("tensor")] + [len(t.name) for t in self.tensors])
        head = f"{'tensor':<{width}}  {'half':<8}{'frozen':>12}{'changed':>10}{'trainable':>12}{'moved':>12}"
        head += f"{'stored as':>11}" if several else ""
        lines = [head + "  verdict"]
        for t in self.tensors:
            row = (f"{t.name:<{width}}  {t.half:<8}{t.frozen:>12,}{t.changed:>10,}{t.trainable:>12,}{t.moved:>12,}")
            if several:
                row += f"{(str(len(t.stored)) + ' keys' if len(t.stored) > 1 else '1 key'):>11}"
            if t.half == "unlisted":
                verdict = "not in the manifest (not judged)"
            elif not t.holds:
                verdict = f"CHANGED ({_n(t.changed, 'frozen element')} differ{'s' if t.changed == 1 else ''} from the base)"
            elif t.trainable and t.moved == 0:
                verdict = "ok (did not move)"
            else:
                verdict = "ok"
            lines.append(row + "  " + verdict + (f"; base cast {t.cast}" if t.cast else ""))
        return "\n".join(lines)

    def summary(self) -> str:
        """The verdict in a few lines: the frozen half, what trained, and whether the promise holds."""
        s, c = self.totals(), self.selection.config
        moved = s["moved_elements"] / s["trainable_elements"] if s["trainable_elements"] else 0.0
        lines = [
            f"frozen:  {_n(s['frozen_tensors'], 'tensor')} whole and {s['partial_tensors']} in part, "
            f"{_n(s['frozen_elements'], 'element')}: "
            + ("all bit-identical to the base" if self.holds else
               f"{s['changed_elements']:,} differ{'s' if s['changed_elements'] == 1 else ''} from the base, in "
               f"{_n(len(s['changed_tensors']), 'tensor')}"),
            f"trained: {_n(s['trains_tensors'], 'tensor')} whole and {s['partial_tensors']} in part, "
            f"{_n(s['trainable_elements'], 'element')}: {s['moved_elements']:,} moved ({moved:.2%})"
            + (f"; {_n(len(s['unmoved_tensors']), 'trainable tensor')} did not move at all "
               f"(e.g. {s['unmoved_tensors'][0]})" if s["unmoved_tensors"] else ""),
        ]
        if s["trainable_elements"] and not s["moved_elements"]:
            lines.append("note: no trainable element moved: is TUNED the base itself, or saved before any step?")
        if s["unlisted_tensors"]:
            lines.append(f"not in the manifest (compared, not judged): {', '.join(s['unlisted_tensors'])}")
        if self.unplaced:
            lines.append(f"stored keys the model does not have (not compared): {len(self.unplaced)}, "
                         f"e.g. {self.unplaced[0]}")
        if self.holds:
            lines.append(f"verdict: the promise holds: the half HFT round {c.round} froze is bit-identical to the base")
        else:
            worst = self.broken[0]
            where = ""
            if worst.first_changed is not None:
                base_text, tuned_text = _shown(worst.base_value, worst.tuned_value)
                where = (f", first at [{', '.join(map(str, worst.first_changed))}]: "
                         f"{base_text} in the base, {tuned_text} tuned")
            lines.append(
                f"verdict: THE PROMISE DOES NOT HOLD: {_n(len(self.broken), 'frozen tensor')} "
                f"differ{'s' if len(self.broken) == 1 else ''} from the base, e.g. {worst.name} "
                f"({worst.changed:,} of {_n(worst.frozen, 'frozen element')}{where})"
            )
        return "\n".join(lines)

    def started_from(self) -> str | None:
        """The folder the manifest says this round's weights came from (the previous round's, in
        its history), or None for a first round or a model not loaded from a folder."""
        history = self.selection.history
        folder = history[-1].get("folder") if history else None
        return folder if isinstance(folder, str) else None

    def text(self) -> str:
        """The header, the table and the summary: what ``hft verify`` prints."""
        c = self.selection.config
        header = [
            f"hft verify: {self.tuned} against {self.base}",
            f"manifest {self.manifest}: HFT round {c.round}, strategy={c.strategy} ratio={c.ratio:g} seed={c.seed} "
            f"train_embeddings={c.train_embeddings}, layout {self.selection.layout_name}, "
            f"fingerprint {self.selection.fingerprint}",
            f"names: {self.conversion}",
        ]
        started = self.started_from()
        if started is not None and os.path.abspath(started) != os.path.abspath(self.base):
            # A later round starts from the previous round's weights, not the original base: the
            # frozen half is compared with whatever BASE is, so say which folder the run named.
            header.append(f"note: the manifest says round {c.round} started from {started}; "
                          "BASE should be the weights this round started from")
        return "\n".join(header) + "\n\n" + self.table() + "\n\n" + self.summary()


def verify_checkpoint(base: str, tuned: str, *, manifest: str | None = None,
                      allow_pickle: bool = False) -> VerifyReport:
    """Compare checkpoint ``tuned`` with ``base`` tensor by tensor against ``tuned``'s manifest.

    Reads ``tuned/hft_selection.json`` (or ``manifest``), builds the model of ``tuned/config.json``
    on the meta device (names and shapes only), then streams both checkpoints one in-memory tensor
    at a time: safetensors, single file or sharded with an index, MoE experts stored one key per
    expert included (merged with transformers' own conversion mapping, as ``from_pretrained`` does).

    Args:
        base: the weights the round started from (a ``save_pretrained`` folder): the base model
            for round 0, the previous round's output for a later round.
        tuned: the folder the HFT run saved (``trainer.save_model``, a ``checkpoint-N`` folder).
        manifest: another ``hft_selection.json`` to judge by (default: the one in ``tuned``).
        allow_pickle: read pickled ``.bin`` weights (``torch.load(weights_only=True)``).

    Returns:
        A :class:`VerifyReport`; ``report.holds`` says whether every frozen element is bit-identical.

    Raises:
        ManifestError: ``tuned`` has no manifest (or it cannot be read).
        SelectionMismatchError: the manifest was written for another model than ``tuned``'s config
            (fingerprint), a tensor it names is missing from a checkpoint or has another shape.
        ConfigError: a folder does not exist or holds no readable weights or config.

    Example:
        >>> verify_checkpoint("no/such/base", "no/such/tuned")
        Traceback (most recent call last):
        ...
        hft_plugin.errors.ConfigError: TUNED no/such/tuned: no such directory.
    """
    from .boxes import to_mask
    from .selection import read_layout

    tuned_weights = CheckpointWeights(tuned, allow_pickle, label=f"TUNED {tuned}")
    base_weights = CheckpointWeights(base, allow_pickle, label=f"BASE {base}")
    manifest_path = manifest or os.path.join(tuned, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        if manifest is None:
            raise ManifestError(
                f"TUNED {tuned} has no {MANIFEST_NAME}, so nothing says which half was frozen: it was not saved by an "
                "HFT run (enable_hft writes it into the output_dir, every checkpoint-N and trainer.save_model's "
                "folder). Pass the run's manifest with --manifest FILE (manifest=...); if you know the run's options, "
                f"`hft plan {tuned} --round N --format json > FILE` writes the manifest it would have written."
            )
        raise ManifestError(f"--manifest {manifest}: no such file; pass the {MANIFEST_NAME} the HFT run wrote.")
    selection = Selection.load(manifest_path)
    model = meta_model(tuned)
    fingerprint = read_layout(model).fingerprint()
    if fingerprint != selection.fingerprint:
        raise SelectionMismatchError(
            f"{manifest_path} was written for another model (fingerprint {selection.fingerprint}) than the one "
            f"{os.path.join(tuned, 'config.json')} describes ({fingerprint}): other parameter names or shapes, or "
            "fused tensors cut otherwise. Pass the manifest of the run that saved TUNED (--manifest), or the "
            "checkpoint that run saved."
        )
    shapes = selection.layout.shapes
    tuned_view = ConvertedCheckpoint(tuned_weights, model)
    base_view = ConvertedCheckpoint(base_weights, model)
    for role, folder, view in (("TUNED", tuned, tuned_view), ("BASE", base, base_view)):
        _check_holds_everything(role, folder, view, shapes, manifest_path)

    plan = selection.plan()
    half = {**{n: "trains" for n in plan.trainable}, **{n: "frozen" for n in plan.frozen},
            **{n: "in part" for n in plan.partial}}
    checks: dict[str, TensorCheck] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}  # base groups loaded for several names, until all are used

    def base_tensor(name: str) -> torch.Tensor:
        group = base_view.group(name)
        loaded = pending.get(id(group))
        if loaded is None:
            loaded = base_view.load(group)
            if len(loaded) > 1:
                pending[id(group)] = loaded
        value = loaded.pop(name)
        if not loaded:
            pending.pop(id(group), None)
        return value

    for group in tuned_view.groups:
        for name, tuned_value in tuned_view.load(group).items():
            if name not in base_view:  # only unlisted names can be missing here: listed ones were checked
                continue
            base_value = base_tensor(name)
            expected = shapes.get(name)
            for role, value in (("TUNED", tuned_value), ("BASE", base_value)):
                if expected is not None and tuple(value.shape) != tuple(expected):
                    raise SelectionMismatchError(
                        f"{role} {tuned if role == 'TUNED' else base} holds {name} with shape {list(value.shape)}, "
                        f"but {manifest_path} records {list(expected)}: the checkpoint does not hold the model the "
                        "manifest was written for."
                    )
            if tuple(base_value.shape) != tuple(tuned_value.shape):  # an unlisted tensor
                raise SelectionMismatchError(
                    f"{name} has shape {list(base_value.shape)} in BASE {base} but {list(tuned_value.shape)} in "
                    f"TUNED {tuned}: they are not the same model."
                )
            trainable_mask = None
            if name in plan.partial:
                trainable_mask = to_mask(tuple(tuned_value.shape), plan.partial[name], device="cpu")
            checks[name] = _compare(name, half.get(name, "unlisted"), tuned_value, base_value, trainable_mask,
                                    tuple(tuned_view.sources(name)))
            del tuned_value, base_value  # one tensor of each checkpoint at a time
    tuned_weights.close()
    base_weights.close()
    ordered = [checks[n] for n in shapes if n in checks]
    ordered += [c for n, c in checks.items() if n not in shapes]
    return VerifyReport(base, tuned, manifest_path, selection, ordered, tuned_view.conversion, tuned_view.unplaced)


def _check_holds_everything(role: str, folder: str, view: ConvertedCheckpoint, shapes: dict, manifest_path: str) -> None:
    """Every tensor the manifest names is in the checkpoint (under its in-memory name), with the
    manifest's shape where the header tells it; checked before any tensor is read."""
    missing = [n for n in shapes if n not in view]
    if missing:
        hint = ""
        if view.unplaced:
            hint = (f" It stores {len(view.unplaced)} keys the model of TUNED's config.json does not take (e.g. "
                    f"{view.unplaced[0]}): saved from another model, or in a layout this transformers cannot convert.")
        raise SelectionMismatchError(
            f"{role} {folder} lacks {_n(len(missing), 'tensor')} that {manifest_path} names, e.g. "
            f"{', '.join(missing[:3])} ({view.conversion}).{hint} Pass the checkpoint of the same model."
        )
    for name, shape in shapes.items():
        stored = view.stored_shape(name)
        if stored is not None and tuple(stored) != tuple(shape):
            raise SelectionMismatchError(
                f"{role} {folder} stores {name} with shape {list(stored)}, but {manifest_path} records {list(shape)}: "
                "the checkpoint does not hold the model the manifest was written for."
            )


def _compare(name: str, half: str, tuned: torch.Tensor, base: torch.Tensor, trainable_mask: torch.Tensor | None,
             stored: tuple[str, ...]) -> TensorCheck:
    cast = None
    if base.dtype != tuned.dtype:
        cast = f"{dtype_code(base.dtype, name)} -> {dtype_code(tuned.dtype, name)}"
        base = base.to(tuned.dtype)
    differ = _differs(tuned, base)
    numel = tuned.numel()
    if half == "frozen":
        frozen_differ, trainable, moved = differ, 0, 0
    elif half == "in part":
        frozen_differ = differ & ~trainable_mask
        trainable = int(trainable_mask.sum())
        moved = int((differ & trainable_mask).sum())
    else:  # trains whole, or unlisted: every difference is a move
        frozen_differ, trainable, moved = None, numel if half == "trains" else 0, int(differ.sum())
    changed = int(frozen_differ.sum()) if frozen_differ is not None else 0
    check = TensorCheck(name, half, numel, numel - trainable if half != "unlisted" else 0, changed,
                        trainable, moved, stored, cast)
    if changed:
        flat = int(frozen_differ.reshape(-1).to(torch.uint8).argmax())  # the first differing element
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(tuned.shape)))
        check.first_changed = index
        check.base_value, check.tuned_value = float(base[index]), float(tuned[index])
    return check


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _shown(base: float | None, tuned: float | None) -> tuple[str, str]:
    """Two values that differ in their bits, printed short but still different (9 digits tell
    float32 values apart; repr where that is not enough, e.g. float64 or -0.0 against 0.0)."""
    short = f"{base:.9g}", f"{tuned:.9g}"
    return short if short[0] != short[1] else (repr(base), repr(tuned))


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: do the bits differ?"""
    view = _INT_OF_SIZE.get(a.element_size())
    if view is None or a.is_complex() or a.dtype == torch.bool:
        return a != b
    return a.view(view) != b.view(view)


# -- the command -------------------------------------------------------------------------------------

def run_cli(args: argparse.Namespace) -> int:
    """Run ``hft verify`` with parsed arguments: 0 when the frozen half is bit-identical to the
    base, :data:`EXIT_BROKEN` (1) when a frozen element differs. Typed errors propagate (the
    ``hft`` command prints them as one line, exit code 2)."""
    report = verify_checkpoint(args.base, args.tuned, manifest=args.manifest, allow_pickle=args.allow_pickle)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.text())
    if not report.holds:
        count = len(report.broken)
        print(f"hft verify: {_n(count, 'frozen tensor')} of {args.tuned} differ{'s' if count == 1 else ''} from "
              f"{args.base} (e.g. {report.broken[0].name})", file=sys.stderr)
        return EXIT_BROKEN
    return 0
