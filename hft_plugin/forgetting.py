"""How far a model has moved from its base: KL and NLL change on fixed probe texts.

The measurement behind the live forgetting monitor (:func:`hft_plugin.watch_forgetting`) and
``hft forgetting BASE TUNED``, free of any training framework:

* **Probes** (:class:`Probes`): by default the base model's own samples, drawn once from the
  beginning-of-sequence token with a generator of their own (the global random state is never
  touched), 16 samples of up to 64 tokens; or texts the user gives. Saved as ``hft_probes.json``
  so that a resumed run and later rounds measure on the same ones.
* **The base** (:class:`BaseSnapshot`): the starting values of every tensor that can train, whole
  (a fused ``qkv_proj`` or an expert stack that trains in part is kept whole). During a
  measurement they are exchanged with the model's current values in place, the base is measured,
  and the values are exchanged back, bit for bit. Under HFT the frozen half is never copied: it
  is the model's own tensors, unchanged by construction, so the base costs only the trainable
  half. Without HFT every trainable tensor is kept (the whole model, for full fine-tuning).
* **The measurement** (:func:`measure`): for each probe position, the next-token distributions of
  the base and of the model; ``kl`` is the mean over positions of KL(base || model) in nats,
  ``nll_delta`` the mean next-token NLL of the probe tokens under the model minus under the base.

Every forward pass runs under ``torch.no_grad`` in eval mode (each module's own train/eval flag is
put back after) and uses no randomness, so training with measurements in between is bit-identical
to training without them.

    >>> from hft_plugin.testing import tiny_model
    >>> from hft_plugin.forgetting import BaseSnapshot, measure, sample_probes
    >>> model = tiny_model("llama")
    >>> probes = sample_probes(model, count=4, length=16, start_token_id=1)
    >>> base = BaseSnapshot.capture(model)
    >>> measure(model, probes, base).kl      # nothing trained yet
    0.0
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError, ProbeTextsError

PROBES_FILE = "hft_probes.json"
"""The probes' file name, written in the output folder beside the manifest (``hft_selection.json``)."""

DEFAULT_SAMPLES = 16
DEFAULT_LENGTH = 64
DEFAULT_EVERY = 50
DEFAULT_BATCH_SIZE = 8

# A seed of its own, so the probes are never the samples another part of a run draws with a plain
# seed such as 0 (replay of the base's own samples must draw different ones).
PROBE_SEED = int.from_bytes(hashlib.sha256(b"hft_plugin forgetting probes").digest()[:4], "big")

_FORMAT = "hft_probes"
_VERSION = 1


# -- settings ------------------------------------------------------------------------------------------
def check_every(every: Any, name: str = "every") -> int:
    """``every`` as a positive int, else :class:`ConfigError` naming the value."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"{name}={every!r} is not a positive whole number of optimizer steps; measure e.g. "
                          f"every {DEFAULT_EVERY} steps ({name}={DEFAULT_EVERY}).")
    return every


def check_max_kl(max_kl: Any, name: str = "max_kl") -> float | None:
    """``max_kl`` as a positive finite float (nats per token), or None; else :class:`ConfigError`."""
    if max_kl is None:
        return None
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not math.isfinite(max_kl) or max_kl <= 0:
        raise ConfigError(f"{name}={max_kl!r} is not a positive number: it is the largest mean KL(base || model), in "
                          f"nats per token, at which training goes on (e.g. {name}=0.05); leave it unset for no budget.")
    return float(max_kl)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number >= {minimum}.")
    return value


# -- the probes ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Probes:
    """Token sequences the base and the model are compared on.

    Attributes:
        token_ids: one list of token ids per probe (each at least 2 tokens: the first is only
            context, every later one is predicted).
        texts: the decoded text of each probe, or None where no tokenizer was available.
        source: ``"samples"`` (drawn from the base) or ``"texts"`` (given by the user).
        seed, length, start_token_id: how samples were drawn (None for texts).
        vocab_size: the output size of the model the probes were made for.
    """

    token_ids: list[list[int]]
    texts: list[str | None]
    source: str
    vocab_size: int
    seed: int | None = None
    length: int | None = None
    start_token_id: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def scored_tokens(self) -> int:
        """How many positions a measurement averages over (every token but each probe's first)."""
        return sum(len(ids) - 1 for ids in self.token_ids)

    def describe(self) -> str:
        if self.source == "samples":
            return (f"{len(self)} samples of the base model (seed {self.seed}, up to {self.length} tokens from token "
                    f"{self.start_token_id}; {self.scored_tokens:,} positions scored)")
        return f"{len(self)} given texts ({self.scored_tokens:,} positions scored)"

    def batches(self, batch_size: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask)``, each ``[batch, longest]`` (int64), padded on the right
        with token 0 (masked out), so every real token keeps its position."""
        for start in range(0, len(self.token_ids), batch_size):
            rows = self.token_ids[start:start + batch_size]
            longest = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), longest), dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, :len(row)] = 1
            yield ids.to(device), mask.to(device)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "source": self.source, "seed": self.seed,
                "length": self.length, "start_token_id": self.start_token_id, "vocab_size": self.vocab_size,
                "probes": [{"text": t, "token_ids": list(ids)} for t, ids in zip(self.texts, self.token_ids)]}

    def save(self, folder: str) -> str:
        """Write ``hft_probes.json`` into ``folder`` (atomically: a reader never sees half a file)."""
        from .files import write_atomic

        return write_atomic(os.path.join(folder, PROBES_FILE), json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Probes":
        try:
            if data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            rows = data["probes"]
            ids = [[int(t) for t in row["token_ids"]] for row in rows]
            texts = [row.get("text") for row in rows]
            probes = cls(ids, texts, str(data["source"]), int(data["vocab_size"]), data.get("seed"),
                         data.get("length"), data.get("start_token_id"))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProbeTextsError(f"{where} is not a probes file this version reads ({exc}); delete it to draw new "
                                  "probes, or pass texts=.") from None
        if not ids or any(len(row) < 2 for row in ids):
            raise ProbeTextsError(f"{where} holds no probe of 2 tokens or more; delete it to draw new probes.")
        return probes

    @classmethod
    def load(cls, path: str) -> "Probes":
        """Read an ``hft_probes.json``; :class:`ProbeTextsError` naming the file if it cannot be used."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProbeTextsError(f"cannot read the probes file {path} ({exc}); delete it to draw new probes.") from None
        return cls.from_dict(data, path)

    def check_fits(self, vocab_size: int, context: int | None, where: str) -> None:
        """Refuse probes made for another vocabulary or longer than the model's context."""
        top = max(max(row) for row in self.token_ids)
        if top >= vocab_size or min(min(row) for row in self.token_ids) < 0:
            raise ProbeTextsError(f"{where} holds token id {top}, outside this model's vocabulary of {vocab_size}: the "
                                  "probes were made for another model. Delete the file to draw new probes.")
        longest = max(len(row) for row in self.token_ids)
        if context is not None and longest > context:
            raise ProbeTextsError(f"{where} holds a probe of {longest} tokens, longer than the model's context of "
                                  f"{context}; shorten it or delete the file to draw new probes.")


def read_texts(path: str) -> "list[str] | Probes":
    """The texts in ``path``: a JSON list of strings (or an ``hft_probes.json``, returned as
    :class:`Probes`), JSON Lines of strings or ``{"text": ...}`` objects (``.jsonl``), or plain text
    with one text per non-empty line. :class:`ProbeTextsError` naming the file if it cannot be read
    or holds no text."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeTextsError(f"texts={path!r} cannot be read ({exc}); pass a UTF-8 file with one text per line, a "
                              "JSON list of strings, or a list of strings.") from None
    try:
        if path.endswith(".json"):
            data = json.loads(content) if content.strip() else []
            if isinstance(data, dict) and data.get("format") == _FORMAT:
                return Probes.from_dict(data, path)
            if isinstance(data, dict) and isinstance(data.get("texts"), list):
                data = data["texts"]
            if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
                raise ValueError("not a list of strings")
            texts = data
        elif path.endswith(".jsonl"):
            texts = []
            for line in content.splitlines():
                if line.strip():
                    item = json.loads(line)
                    texts.append(item["text"] if isinstance(item, dict) else item)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("a line holds neither a string nor {\"text\": string}")
        else:
            texts = [line for line in content.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProbeTextsError(f"texts={path!r} cannot be read as probe texts ({exc}); a .json file holds a list of "
                              "strings, a .jsonl file one string or {\"text\": ...} per line, any other file one text "
                              "per line.") from None
    if not texts:
        raise ProbeTextsError(f"texts={path!r} holds no text; put one probe text per line (or leave texts unset to "
                              "probe with the base model's own samples).")
    return texts


def encode_texts(texts: Sequence[str], tokenizer, *, vocab_size: int, context: int | None) -> Probes:
    """Tokenize the user's ``texts`` (with the tokenizer's special tokens, as training sees text);
    :class:`ProbeTextsError` naming the text that is empty, one token long, or longer than ``context``."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise ProbeTextsError(f"texts={_short(texts)} is neither a list of strings nor a file path.")
    if not texts:
        raise ProbeTextsError("texts=[] holds no text; pass at least one, or leave texts unset to probe with the base "
                              "model's own samples.")
    if tokenizer is None:
        raise ProbeTextsError("probe texts need a tokenizer to encode them, and the trainer has none "
                              "(processing_class is None): give the trainer its tokenizer, or leave texts unset.")
    ids = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ProbeTextsError(f"probe text #{i} ({_short(text)}) is empty or not a string.")
        row = list(tokenizer(text)["input_ids"])
        if len(row) < 2:
            raise ProbeTextsError(f"probe text #{i} ({_short(text)}) is {len(row)} token long; a probe needs 2 tokens "
                                  "or more (the first is context, the rest are predicted).")
        if context is not None and len(row) > context:
            raise ProbeTextsError(f"probe text #{i} ({_short(text)}) is {len(row):,} tokens long, longer than the "
                                  f"model's context of {context:,} tokens; shorten or split it.")
        ids.append(row)
    probes = Probes(ids, list(texts), "texts", vocab_size)
    probes.check_fits(vocab_size, context, "the probe texts")
    return probes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


# -- what the model is ---------------------------------------------------------------------------------
def usable_tokenizer(processing_class) -> Any:
    """The tokenizer inside a trainer's ``processing_class`` (a processor's ``.tokenizer``), or None
    if it has none that encodes and decodes."""
    tokenizer = processing_class
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        tokenizer = getattr(tokenizer, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        return None
    return tokenizer


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def vocab_size(model: nn.Module) -> int:
    """The size of the model's next-token distribution (its output embedding's rows)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(_config(model), "vocab_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"cannot tell the vocabulary size of {type(model).__name__}: it has no output embedding "
                          "and its config no vocab_size.")
    return size


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover, from its config, or None if it names none."""
    config = _config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _token_ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def default_start_token(model: nn.Module, tokenizer=None) -> int | None:
    """The token a document starts with: the tokenizer's or the config's beginning-of-sequence token,
    else its end-of-sequence token (models such as GPT-2 and Qwen separate documents with it)."""
    configs = [c for c in (_config(model), getattr(model, "generation_config", None)) if c is not None]
    candidates = [getattr(tokenizer, "bos_token_id", None)] + [getattr(c, "bos_token_id", None) for c in configs]
    candidates += [getattr(tokenizer, "eos_token_id", None)] + [getattr(c, "eos_token_id", None) for c in configs]
    for value in candidates:
        ids = _token_ids(value)
        if ids:
            return ids[0]
    return None


def stop_token_ids(model: nn.Module, tokenizer=None) -> set[int]:
    configs = [c for c in (_config(model), getattr(model, "generation_config", None)) if c is not None]
    ids = set(_token_ids(getattr(tokenizer, "eos_token_id", None)))
    for config in configs:
        ids.update(_token_ids(getattr(config, "eos_token_id", None)))
    return ids


def _device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode for the duration, then every module's own train/eval flag exactly as it was."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


# -- sampling ------------------------------------------------------------------------------------------
def sample_probes(model: nn.Module, *, count: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH,
                  seed: int = PROBE_SEED, start_token_id: int | None = None, tokenizer=None) -> Probes:
    """Draw ``count`` samples of up to ``length`` tokens (the start token included) from ``model``.

    Plain ancestral sampling at temperature 1 (no top-k or top-p: the model's own distribution),
    from ``start_token_id`` (default: :func:`default_start_token`), with a ``torch.Generator`` of its own
    seeded with ``seed``: the global random state is neither read nor changed. A sample ends at its
    first end-of-sequence token (kept). Runs under ``torch.no_grad`` in eval mode.

    Raises:
        ProbeTextsError: the model names no start token (pass ``start_token_id`` or texts).
        ConfigError: ``count`` or ``length`` below what a probe needs, or ``length`` longer than
            the model's context.
    """
    check_count(count, "samples")
    check_count(length, "length", minimum=2)
    context = context_length(model)
    if context is not None and length > context:
        raise ConfigError(f"length={length} is longer than the model's context of {context} tokens; draw shorter "
                          "probes.")
    start = start_token_id if start_token_id is not None else default_start_token(model, tokenizer)
    if start is None:
        raise ProbeTextsError(f"{type(model).__name__} names no beginning- or end-of-sequence token to start samples "
                              "from (neither its tokenizer nor its config); pass probe texts instead.")
    stops = stop_token_ids(model, tokenizer)
    from .sampling import sample_token_ids  # the one sampler of the model's own texts (replay, importance scores)

    with eval_mode(model):  # every module's own train/eval flag restored, not only the root's
        ids, _ = sample_token_ids(model, count, length, seed=seed, batch_size=count, bos_token_id=start)
    rows = []
    for row in ids.tolist():
        end = next((i for i, token in enumerate(row[1:], 1) if token in stops), len(row) - 1)
        rows.append(row[:end + 1])
    texts = [tokenizer.decode(row) if tokenizer is not None else None for row in rows]
    return Probes(rows, texts, "samples", vocab_size(model), seed, length, start)


# -- the base: starting values of what trains ----------------------------------------------------------
def _storage_key(param: torch.Tensor) -> tuple:
    storage = param.untyped_storage()
    if storage.nbytes() == 0 or param.device.type == "meta":  # placeholders (ZeRO-3, meta): no storage to share
        return ("tensor", id(param))
    return (str(param.device), storage.data_ptr())


def trained_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` that training can change, whole, by name, in model order.

    Whatever trains is mapped to the model tensor whose storage it lives in, so a tensor that trains
    in part (a fused ``qkv_proj``, a stacked expert tensor) is named whole, however HFT makes its
    parts trainable. Found from ``requires_grad`` and, under HFT, from the active handle's
    :meth:`~hft_plugin.freeze.HFTHandle.parameters` and the selection's partly trained tensors.
    """
    from .freeze import active_handle

    named = list(model.named_parameters())
    owners: dict[tuple, tuple[str, nn.Parameter]] = {}
    for name, param in named:  # the largest tensor on a storage owns it (views, regions, ties)
        key = _storage_key(param)
        if key not in owners or param.numel() > owners[key][1].numel():
            owners[key] = (name, param)
    trains = [param for _, param in named if param.requires_grad]
    handle = active_handle(model)
    if handle is not None and not handle.removed:
        trains += handle.parameters()
        by_name = dict(named)
        trains += [by_name[n] for n in handle.selection.plan().partial if n in by_name]
    chosen = {owners[key][0] for key in map(_storage_key, trains) if key in owners}
    return {name: param for name, param in named if name in chosen and owners[_storage_key(param)][1] is param}


def _resolve_device(device, model: nn.Module) -> torch.device:
    return _device(model) if device in (None, "model") else torch.device(device)


def _exchange(param: torch.Tensor, kept: torch.Tensor) -> None:
    """Swap the values of ``param`` and ``kept`` in place: one tensor's worth of temporary memory.
    ``kept`` is at least as wide as ``param`` (see :meth:`BaseSnapshot._widen`), so both directions
    are exact."""
    current = param.detach().clone()
    param.detach().copy_(kept)
    kept.copy_(current)


class BaseSnapshot:
    """The starting values of a model's trained tensors, whole, to measure the base with.

    :meth:`capture` copies them (to ``device``: ``"cpu"`` keeps accelerator memory free,
    ``"model"`` keeps them beside the model for faster exchanges). :meth:`swapped_in` exchanges
    them with the model's current values for the duration of a ``with`` block and back, exactly.
    Tensors are found by name each time, so a wrapper that replaces parameter objects after the
    capture (an upcast, a device move) is followed.

    Example:
        >>> from hft_plugin.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> base = BaseSnapshot.capture(model)
        >>> base.nbytes == sum(p.numel() * p.element_size() for p in model.parameters())
        True
    """

    def __init__(self, values: dict[str, torch.Tensor], device: torch.device):
        self.values = values
        self.device = device

    @classmethod
    def capture(cls, model: nn.Module, names: Iterable[str] | None = None, device="cpu") -> "BaseSnapshot":
        """Copy the current values of ``names`` (default :func:`trained_tensors`) to ``device``."""
        target = _resolve_device(device, model)
        snapshot = cls({}, target)
        snapshot.add(model, trained_tensors(model) if names is None else names)
        return snapshot

    def add(self, model: nn.Module, names: Iterable[str]) -> None:
        params = dict(model.named_parameters())
        pin = self.device.type == "cpu" and torch.cuda.is_available()
        for name in names:
            if name not in self.values:
                value = params[name].detach().to(self.device, copy=True)
                self.values[name] = value.pin_memory() if pin and params[name].is_cuda else value

    def keep_only(self, names: Iterable[str]) -> None:
        """Drop the values of tensors not in ``names`` (they no longer train: frozen since)."""
        wanted = set(names)
        for name in [n for n in self.values if n not in wanted]:
            del self.values[name]

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())

    def _widen(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Hold the kept value in a dtype at least as wide as the parameter's (a model cast to a wider
        dtype after the capture), so exchanging never rounds the parameter's values."""
        kept = self.values[name]
        wide = torch.promote_types(kept.dtype, param.dtype)
        if wide != kept.dtype:
            kept = self.values[name] = kept.to(wide)
        return kept

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """The model holds the base's values inside the block, its own (bit for bit) after it."""
        params = dict(model.named_parameters())
        for name, kept in self.values.items():
            param = params.get(name)
            if param is None or tuple(param.shape) != tuple(kept.shape):
                raise ConfigError(f"the model's tensor {name} is {'gone' if param is None else tuple(param.shape)} "
                                  f"since the base was kept ({tuple(kept.shape)}): the base can no longer be measured.")
        done: list[str] = []
        with torch.no_grad():
            try:
                for name in self.values:
                    _exchange(params[name], self._widen(name, params[name]))
                    done.append(name)
                yield model
            finally:
                for name in reversed(done):
                    _exchange(params[name], self.values[name])


class ModelBase:
    """A base that is a model of its own (``hft forgetting BASE TUNED``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        yield self.model


class KeptBase:
    """A base's log-probabilities on one set of probes, computed once.

    For comparing many models with one base on the same probes (a benchmark's runs, a series of
    checkpoints): each :func:`measure` against it runs only the model. Holds
    ``probes x (length - 1) x vocab x 4`` bytes on ``store_device`` (189 MiB for 16 probes of 64
    tokens and a 49,152-token vocabulary).

    Example:
        >>> import copy
        >>> from hft_plugin.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> probes = sample_probes(model, count=2, length=8)
        >>> kept = KeptBase(copy.deepcopy(model), probes)
        >>> measure(model, probes, kept).kl
        0.0
    """

    def __init__(self, base: nn.Module, probes: "Probes", *, batch_size: int = DEFAULT_BATCH_SIZE, store_device="cpu"):
        self.probes, self.batch_size = probes, batch_size
        device = _device(base)
        with torch.no_grad(), eval_mode(base):
            self.log_probs = [_log_probs(base, ids, mask).to(store_device)
                              for ids, mask in probes.batches(batch_size, device)]


# -- the measurement -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurement:
    """One comparison of a model with its base on the probes.

    Attributes:
        kl: mean over scored positions of KL(base || model) of the next-token distributions, nats.
        nll: mean next-token NLL of the probe tokens under the model, nats per token.
        base_nll: the same under the base.
        tokens: how many positions were scored.
        per_probe_kl: each probe's mean KL (nats per token), in probe order.
    """

    kl: float
    nll: float
    base_nll: float
    tokens: int
    per_probe_kl: list[float]

    @property
    def nll_delta(self) -> float:
        """``nll - base_nll``: positive when the probes became less likely under the model."""
        return self.nll - self.base_nll

    def metrics(self) -> dict[str, float]:
        return {"forgetting/kl": self.kl, "forgetting/nll_delta": self.nll_delta}


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, ``[batch, length - 1, vocab]``, float32."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1)


def measure(model: nn.Module, probes: Probes, base: "BaseSnapshot | ModelBase | nn.Module", *,
            batch_size: int = DEFAULT_BATCH_SIZE, store_device=None) -> Measurement:
    """Compare ``model`` with ``base`` on ``probes``.

    ``base`` is a :class:`BaseSnapshot` of ``model`` (exchanged in for the base's passes and back),
    or another model with the same vocabulary. The base's log-probabilities on all probes are kept
    on ``store_device`` (default: the snapshot's device, else the model's) between the base's
    passes and the model's: at most ``probes x (length - 1) x vocab x 4`` bytes, e.g. 16 x 63 x
    49,152 x 4 = 189 MiB, freed on return. Runs under ``torch.no_grad`` in eval mode, with no randomness.

    Returns:
        A :class:`Measurement`; ``kl`` is exactly 0.0 for a model against its own values.
    """
    if isinstance(base, nn.Module):
        base = ModelBase(base)
    device = _device(model)
    if isinstance(base, KeptBase):
        if base.probes is not probes or base.batch_size != batch_size:
            raise ValueError("this KeptBase was computed on other probes or another batch size; build one for these.")
        with torch.no_grad(), eval_mode(model):
            return _compare(model, list(probes.batches(batch_size, device)), base.log_probs, probes.scored_tokens)
    store = torch.device(store_device) if store_device is not None else getattr(base, "device", device)
    modules = [model] + ([base.model] if isinstance(base, ModelBase) else [])
    batches = list(probes.batches(batch_size, device))
    with torch.no_grad(), eval_mode(*modules):
        with base.swapped_in(model) as base_model:
            base_device = _device(base_model)
            kept = [_log_probs(base_model, ids.to(base_device), mask.to(base_device)).to(store) for ids, mask in batches]
        return _compare(model, batches, kept, probes.scored_tokens)


def _compare(model: nn.Module, batches, kept: list[torch.Tensor], tokens: int) -> Measurement:
    """The model's passes against the base's kept log-probabilities (under no_grad, in eval mode)."""
    kl_sum = nll_sum = base_nll_sum = 0.0
    per_probe: list[float] = []
    for (ids, mask), base_lp in zip(batches, kept):
        lp = _log_probs(model, ids, mask)
        base_lp = base_lp.to(lp.device)
        valid = mask[:, 1:].to(lp.dtype)
        if lp.shape[-1] != base_lp.shape[-1]:
            from .errors import VocabularyMismatchError

            raise VocabularyMismatchError(f"the base predicts {base_lp.shape[-1]:,} tokens and the model "
                                          f"{lp.shape[-1]:,}: they have different vocabularies.")
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1) * valid
        targets = ids[:, 1:].unsqueeze(-1)
        nll = -lp.gather(-1, targets).squeeze(-1) * valid
        base_nll = -base_lp.gather(-1, targets).squeeze(-1) * valid
        kl_sum += float(kl.double().sum())
        nll_sum += float(nll.double().sum())
        base_nll_sum += float(base_nll.double().sum())
        per_probe += (kl.double().sum(-1) / valid.double().sum(-1)).tolist()
        del lp, base_lp
    return Measurement(kl_sum / tokens, nll_sum / tokens, base_nll_sum / tokens, tokens, per_probe)


def over_budget(kl: float, max_kl: float | None) -> bool:
    """Whether a measured KL exceeds the budget; a NaN (a model that diverged) always does."""
    return max_kl is not None and (math.isnan(kl) or kl > max_kl)
