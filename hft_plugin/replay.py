"""Replay: a fixed share of every training batch drawn from earlier data or from the base model's own
samples. The framework-free part: the share, the order, the sources and the record a run leaves.

The paper combines HFT with Replay (10% of earlier tasks' data mixed into training); replay of
earlier or self-generated data is also the lever with published evidence against forgetting
(arXiv 2510.18874, 2505.13811). This module decides *which* examples go *where*; the trainer
integration (:mod:`hft_plugin.adapters.trainer_replay`) feeds them to a trainer.

How a batch is mixed. With batch size ``B`` and share ``ratio``, batch ``t`` of an epoch holds
``floor((t+1)*B*ratio) - floor(t*B*ratio)`` replay examples (exact rational arithmetic) and the
trainer's own examples fill the rest, in the trainer's own order. Over any run of batches the replay
share is ``ratio`` to within one example; at ``B*ratio < 1`` some batches hold none and others one.
The replay examples are a pure function of (seed, global slot number): slot ``j`` takes position
``j mod P`` of a permutation of the ``P`` pool examples drawn for cycle ``j div P`` from
``torch.Generator().manual_seed(seed, cycle)``. The stream of an epoch is therefore a pure function
of (the trainer's order, epoch, seed): a resumed run rebuilds it and skips the batches it trained,
and every rank of a distributed job computes the same stream and takes its own batches of it.

    >>> layout = EpochLayout.build(n_main=10, batch_size=4, ratio=0.25)
    >>> layout.replay_counts, layout.replay_slots
    ((1, 1, 1, 1), 4)
    >>> epoch_stream(list(range(10)), pool_size=3, layout=layout, seed=0, epoch=0)[:8]
    [0, 1, 2, 12, 3, 4, 5, 10]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Sequence

from .errors import ReplayError

SELF = "self"
"""Source name: texts the model samples from its beginning-of-sequence token when training starts."""

EARLIER = "earlier"
"""Source name: the data files earlier rounds recorded in the folder the model was loaded from."""

RECORD_NAME = "hft_replay.json"
"""What a run replayed and which task data it recorded, in ``output_dir`` and every checkpoint."""

SELF_NAME = "hft_replay_self.json"
"""The model's own samples, drawn once and reused by a resume or a later round."""

REPLAY_KEY = "hft_replay_index"
"""The batch key that marks replay rows (pool index, -1 for the trainer's own rows); removed before
the model's forward."""

DEFAULT_RATIO = 0.1  # the paper's Replay: 10% of earlier data


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """``ratio`` as a float in [0, 1), else ReplayError naming it. 0 turns replay off; 1 would leave
    no room for the task being learned.

        >>> check_ratio(0.1)
        0.1
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ReplayError(f"{name}={ratio!r} is not a number; give the share of each batch drawn from the replay "
                          f"source, a decimal in [0, 1) such as {name}=0.1.")
    if not 0.0 <= ratio < 1.0:
        raise ReplayError(f"{name}={ratio!r} is outside [0, 1); it is the share of each batch drawn from the replay "
                          f"source: 0 turns replay off, 0.1 is the paper's Replay, and 1 would leave no room for the "
                          "task being trained.")
    return float(ratio)


# -- the order: pure functions ---------------------------------------------------------------------------
def replay_count(batch: int, batch_size: int, ratio: float) -> int:
    """How many replay examples batch number ``batch`` (0-based) of an epoch holds."""
    share = Fraction(str(ratio)) * batch_size  # str(): 0.1 is 1/10 here, not the nearest binary fraction
    return math.floor((batch + 1) * share) - math.floor(batch * share)


@dataclass(frozen=True)
class EpochLayout:
    """How one epoch of ``n_main`` trainer examples is cut into batches of ``batch_size`` with a
    ``ratio`` share of replay: ``main_counts[t] + replay_counts[t]`` examples in batch ``t`` (every
    batch but the last holds ``batch_size``)."""

    batch_size: int
    ratio: float
    main_counts: tuple[int, ...]
    replay_counts: tuple[int, ...]

    @classmethod
    def build(cls, n_main: int, batch_size: int, ratio: float) -> "EpochLayout":
        if batch_size < 1:
            raise ReplayError(f"batch_size={batch_size!r}: replay needs a batch size of at least 1.")
        check_ratio(ratio)
        main, replay, left, t = [], [], n_main, 0
        while left > 0:
            r = replay_count(t, batch_size, ratio)
            m = min(batch_size - r, left)
            main.append(m)
            replay.append(r)
            left -= m
            t += 1
        return cls(batch_size, ratio, tuple(main), tuple(replay))

    @property
    def batches(self) -> int:
        return len(self.main_counts)

    @property
    def replay_slots(self) -> int:
        """Replay examples per epoch."""
        return sum(self.replay_counts)

    def __len__(self) -> int:
        return sum(self.main_counts) + self.replay_slots


def _permutation(pool_size: int, seed: int, cycle: int) -> list[int]:
    import torch

    # One generator per (seed, cycle): the order never depends on, or touches, the global RNG.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + cycle) % (2**63))
    return torch.randperm(pool_size, generator=generator).tolist()


def replay_indices(first_slot: int, count: int, pool_size: int, seed: int) -> list[int]:
    """The pool indices of replay slots ``first_slot .. first_slot + count - 1``: every pool example
    once per cycle of ``pool_size`` slots, each cycle in its own seeded order.

        >>> sorted(replay_indices(0, 5, pool_size=5, seed=0))
        [0, 1, 2, 3, 4]
        >>> replay_indices(3, 4, 5, 0) == replay_indices(0, 7, 5, 0)[3:]
        True
    """
    if pool_size < 1:
        raise ReplayError("the replay pool is empty; give a source with at least one example.")
    out: list[int] = []
    cycles: dict[int, list[int]] = {}
    for slot in range(first_slot, first_slot + count):
        cycle, position = divmod(slot, pool_size)
        if cycle not in cycles:
            cycles[cycle] = _permutation(pool_size, seed, cycle)
        out.append(cycles[cycle][position])
    return out


def epoch_stream(main_order: Sequence[int], pool_size: int, layout: EpochLayout, seed: int, epoch: int) -> list[int]:
    """The indices of one epoch, batch after batch: the trainer's examples (``main_order``, indices
    below ``len(main_order)``... as the trainer's sampler gave them) and replay examples (pool index
    ``i`` as ``n_main + i``) at the end of each batch. ``n_main`` is ``sum(layout.main_counts)``."""
    n_main = sum(layout.main_counts)
    if len(main_order) != n_main:
        raise ReplayError(f"the trainer's sampler gave {len(main_order)} indices for an epoch of {n_main}.")
    replay = iter(replay_indices(epoch * layout.replay_slots, layout.replay_slots, pool_size, seed))
    out, position = [], 0
    for m, r in zip(layout.main_counts, layout.replay_counts):
        out.extend(main_order[position:position + m])
        out.extend(n_main + next(replay) for _ in range(r))
        position += m
    return out


def rank_batches(stream: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """The batches of ``stream`` one rank trains when a launcher deals whole batches round-robin
    (accelerate's ``BatchSamplerShard`` without ``split_batches``): batch ``t`` goes to rank
    ``t mod world_size``. A model of that dealing, for tests and for the docs; a short last round
    is evened out by the launcher, as it is for data without replay."""
    batches = [list(stream[i:i + batch_size]) for i in range(0, len(stream), batch_size)]
    return batches[rank::world_size]


class MixingSampler:
    """A ``torch.utils.data.Sampler`` over ``[trainer's examples] + [replay pool]``: the trainer's
    own sampler (``inner``) gives the order of its examples; :func:`epoch_stream` puts them into
    batches with the replay share. ``set_epoch`` is forwarded to ``inner``; an epoch's stream
    depends on nothing else, so resume and ranks see the same stream."""

    def __init__(self, inner, n_main: int, pool_size: int, batch_size: int, ratio: float, seed: int):
        self.inner = inner
        self.n_main = n_main
        self.pool_size = pool_size
        self.seed = seed
        self.layout = EpochLayout.build(n_main, batch_size, ratio)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.layout)

    def __iter__(self) -> Iterator[int]:
        order = [int(i) for i in self.inner]
        stream = epoch_stream(order, self.pool_size, self.layout, self.seed, self.epoch)
        self.epoch += 1  # as accelerate's seeded sampler does after an epoch; set_epoch overrides both
        return iter(stream)


class MixedDataset:
    """A map-style dataset over the trainer's examples then the replay pool: index ``i < n_main`` is
    ``main[i]``, index ``n_main + j`` is ``pool[j]``. Each example is projected onto ``columns``
    (what the trainer would keep) and carries :data:`REPLAY_KEY` (its pool index, -1 for the
    trainer's own) as a :class:`Marked`, which the collator wrapper takes out before collating."""

    def __init__(self, main, pool, columns: Sequence[str] | None, sampler: MixingSampler | None = None):
        self.main, self.pool = main, pool
        self.columns = list(columns) if columns is not None else None
        self.n_main = len(main)
        self.sampler = sampler

    def __len__(self) -> int:
        return self.n_main + len(self.pool)

    def set_epoch(self, epoch: int) -> None:
        # accelerate's DataLoaderShard.set_epoch reaches the dataset even where a batch-skipping or
        # sharding wrapper hides the sampler
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < self.n_main:
            row, mark = self.main[index], -1
        else:
            row, mark = self.pool[index - self.n_main], index - self.n_main
        if self.columns is not None:
            row = {k: row[k] for k in self.columns if k in row}
        else:
            row = dict(row)
        return Marked(row, mark)


class Marked:
    """One example and its replay mark (pool index, -1 for the trainer's own). Deliberately not a
    dict: transformers' column-removing collator passes non-dict examples through untouched, so the
    mark reaches the collator wrapper that takes it out."""

    __slots__ = ("row", "mark")

    def __init__(self, row: dict, mark: int):
        self.row, self.mark = row, mark

    def __getitem__(self, key: str) -> Any:
        return self.row[key]

    def __repr__(self) -> str:
        return f"Marked({self.row!r}, mark={self.mark})"


# -- sources ---------------------------------------------------------------------------------------------
def describe(source: Any) -> str:
    """A short name for a source, for the summary and errors."""
    if isinstance(source, str):
        return source
    if isinstance(source, (list, tuple)):
        return ", ".join(map(describe, source))
    name = type(source).__name__
    try:
        return f"a {name} of {len(source)} examples"
    except TypeError:
        return f"a {name}"


def read_rows(path: str) -> list[dict]:
    """The examples in a ``.json`` (a list of objects), ``.jsonl`` (one object a line) or text file
    (one example a non-empty line, as ``{"text": line}``). Raises ReplayError naming the file."""
    if not os.path.isfile(path):
        raise ReplayError(f"replay source {path!r}: no such file. Give a JSON, JSON-lines or text file of earlier "
                          "training examples, a datasets.Dataset, or 'self'.")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"replay source {path!r} cannot be read ({exc}); give a UTF-8 JSON, JSON-lines or "
                          "text file.") from None
    lower = path.lower()
    try:
        if lower.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif lower.endswith(".json"):
            data = json.loads(text) if text.strip() else []
            rows = data if isinstance(data, list) else None
            if rows is None:
                raise ReplayError(f"replay source {path!r} holds a JSON {type(data).__name__}; it must hold a list "
                                  "of examples (objects), or be JSON lines (.jsonl).")
        else:
            rows = [{"text": line} for line in text.splitlines() if line.strip()]
    except ValueError as exc:  # JSONDecodeError
        if isinstance(exc, ReplayError):
            raise
        raise ReplayError(f"replay source {path!r} is not valid JSON ({exc}); fix the file or give another.") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ReplayError(f"replay source {path!r}: every example must be a JSON object such as "
                          '{"prompt": ..., "completion": ...} or {"text": ...}.')
    if not rows:
        raise ReplayError(f"replay source {path!r} is empty; give a file with earlier training examples.")
    return rows


def load_rows(source: Any) -> Any:
    """A ``datasets.Dataset`` of the examples in ``source``: a Dataset (as is), a file path, or a
    list of paths (concatenated). Raises ReplayError on an empty or unreadable source."""
    from datasets import Dataset, concatenate_datasets

    if isinstance(source, Dataset):
        dataset = source
    elif isinstance(source, (str, os.PathLike)):
        dataset = Dataset.from_list(read_rows(os.fspath(source)))
    elif isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        parts = [load_rows(s) for s in source]
        try:
            dataset = concatenate_datasets(parts)
        except ValueError as exc:
            raise ReplayError(f"the replay files {describe(list(map(os.fspath, source)))} hold examples of different "
                              f"formats ({exc}); give files of one format.") from None
    else:
        raise ReplayError(f"replay source {describe(source)!r} is not usable: give a datasets.Dataset, a path to a "
                          f"JSON/JSON-lines/text file (or a list of paths), {SELF!r} or {EARLIER!r}.")
    if len(dataset) == 0:
        raise ReplayError(f"replay source {describe(source)} is empty; give at least one example.")
    return dataset


# -- the record a run leaves -----------------------------------------------------------------------------
def read_record(folder: str | None) -> dict | None:
    """``folder/hft_replay.json`` as a dict, or None where there is none. Raises ReplayError if it is
    damaged."""
    if not folder:
        return None
    path = os.path.join(folder, RECORD_NAME)
    if not os.path.isfile(path):
        return None
    data = _read_json(path, "restore it or delete it (earlier rounds' data are then named again)")
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ReplayError(f"{path} has no list of task data files ('tasks'); restore it or delete it.")
    return data


def earlier_tasks(folder: str | None) -> list[str]:
    """The task data files the rounds that trained ``folder`` recorded (oldest first)."""
    record = read_record(folder)
    return list(record["tasks"]) if record else []


def _read_json(path: str, remedy: str) -> Any:
    """``path``'s JSON; ReplayError naming it and ``remedy`` if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{path} cannot be read ({exc}); {remedy}.") from None


def write_json(path: str, data: dict) -> str:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    from .files import write_atomic

    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def read_self_samples(path: str) -> dict | None:
    """A stored ``hft_replay_self.json`` (its settings and ``texts``), or None if absent."""
    if not os.path.isfile(path):
        return None
    data = _read_json(path, "delete it to draw the samples again")
    if not isinstance(data, dict) or not isinstance(data.get("texts"), list) or not data["texts"]:
        raise ReplayError(f"{path} holds no list of sampled texts; delete it to draw the samples again.")
    return data
