"""Importance scores for the ``shielded`` strategy: one calibration pass, stored in a file.

A unit's importance is Wanda's (Sun et al., 2023): for each weight, ``|W[i, j]|`` times the
root-mean-square of input feature ``j`` over the calibration tokens, summed over the unit's
elements. It asks how much of what the layer computes on the model's own behaviour runs through
that unit, and it needs one forward pass, no gradient: per input feature of each linear map, a sum
of squares (memory: one number per input column, a few MB even at 70B).

Scores are computed once per model and round, in this explicit step, and written to a file
(``hft_scores.json``) whose content hash is checked on every read. ``select_half`` stays a pure
function of its inputs: ``strategy="shielded", scores=FILE`` reads the file, so every rank, a
resumed run and ``hft plan --strategy shielded --scores FILE`` choose the same half without
computing anything. The manifest of the run names the file and its hash.

The file also records what earlier rounds trained (from the manifests of the folders the model came
through), so a round can be told to avoid it (``avoid_trained=True``) and never repeats the previous
round's half.

    >>> import tempfile
    >>> from hft_plugin import select_half
    >>> from hft_plugin.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> scores = compute_scores(model, num_samples=16, length=16)
    >>> path = scores.save(tempfile.mkdtemp())
    >>> select_half(model, strategy="shielded", scores=path).trainable_ratio
    0.5
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .boxes import index as box_index
from .errors import CalibrationError, ScoresError
from .layouts.base import Layout, Part

SCORES_NAME = "hft_scores.json"
FORMAT_VERSION = 1
KIND = "hft-importance-scores"

MIN_TEXTS = 16
"""Fewer calibration texts than this are refused. Measured (benchmarks/shielded.py, SmolLM2-135M,
its own samples of 128 tokens, 4 draws per count): from 16 texts on, the half chosen agrees with
the half chosen from a pool of 128 texts on 99.2% of the layers' parameters (worst draw 96.7%), and
two disjoint draws agree on 98.8%. At 8 texts the draws agree on 97.1%, at 1 text on 96% with 88.8%
in the worst draw against the pool. For scale, two category seeds agree on 51%."""

DEFAULT_SAMPLES = 64
DEFAULT_LENGTH = 128
MAX_UNKNOWN_SHARE = 0.05
"""More unknown-token (``unk``) positions than this share means the texts are in a script or
tokenizer the model does not know: their scores would measure the unknown token."""

HOW_TO_COMPUTE = ("compute them with hft_plugin.importance.compute_scores(model, round=R).save(output_dir) on the "
                  "model as it enters the round, then pass scores=<the returned path> (HFT_SCORES, hft plan --scores)")


@dataclasses.dataclass(frozen=True)
class Scores:
    """The importance of every unit of one model as it entered one round.

    Attributes:
        fingerprint: the layout fingerprint of the model scored (names, shapes, splits).
        round: the round these scores choose for.
        units: unit key -> importance (Wanda sum), or None for a unit with no linear map to score
            (norms, stacked MoE experts): the strategy chooses those by the category rule.
        trained_before: units that earlier rounds on these weights trained (from their manifests).
        previous_trainable: the units the previous round trained, when its manifest was found.
        avoid_trained: freeze ``trained_before`` first, then by importance.
        calibration: where the scores came from (texts or the model's own samples, counts, seed).
    """

    fingerprint: str
    round: int
    units: dict[str, float | None]
    trained_before: tuple[str, ...] = ()
    previous_trainable: tuple[str, ...] | None = None
    avoid_trained: bool = False
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "kind": KIND, "fingerprint": self.fingerprint, "round": self.round,
            "avoid_trained": self.avoid_trained, "calibration": self.calibration,
            "trained_before": sorted(self.trained_before),
            "previous_trainable": None if self.previous_trainable is None else sorted(self.previous_trainable),
            "units": dict(sorted(self.units.items())),
        }

    @property
    def sha256(self) -> str:
        """The hash of the contents (every field); the file stores it and every read checks it."""
        return _digest(self.payload())

    def to_json(self) -> str:
        return json.dumps({**self.payload(), "sha256": self.sha256}, indent=1)

    def save(self, folder: str, name: str = SCORES_NAME) -> str:
        """Write ``folder/name`` atomically (beside the run's manifest: pass the output_dir) and
        return its absolute path, the value to pass as ``scores=``."""
        from .files import write_atomic

        return write_atomic(os.path.abspath(os.path.join(folder, name)), self.to_json())

    @classmethod
    def load(cls, path: str) -> "Scores":
        """Read and check a scores file (a file, or a folder holding ``hft_scores.json``).

        Raises:
            ScoresError: missing, not JSON, not a scores file, or edited since it was written.
        """
        if os.path.isdir(path):
            path = os.path.join(path, SCORES_NAME)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ScoresError(f"The importance scores file {path} does not exist; {HOW_TO_COMPUTE}.") from None
        except OSError as exc:
            raise ScoresError(f"The importance scores file {path} cannot be read ({exc.strerror or exc}).") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "the scores") -> "Scores":
        def bad(what: str) -> ScoresError:
            return ScoresError(f"{source} is not a valid importance scores file: {what}; {HOW_TO_COMPUTE}.")

        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise bad(f"it has no \"kind\": \"{KIND}\"")
        if data.get("format") != FORMAT_VERSION:
            raise bad(f"its format is {data.get('format')!r}; this version reads {FORMAT_VERSION}")
        saved = data.pop("sha256", None)
        if saved != _digest(data):
            raise ScoresError(f"{source} was edited or damaged after it was written: its content hash is "
                              f"{_digest(data)[:16]}, the file says {str(saved)[:16]}. Scores decide which half "
                              f"is frozen, so an edited file is not used; {HOW_TO_COMPUTE}.")
        try:
            units = data["units"]
            if not isinstance(units, dict) or not all(
                    isinstance(k, str) and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v)) for k, v in units.items()):
                raise bad("'units' is not an object of unit key -> finite number or null")
            round_ = data["round"]
            if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
                raise bad(f"'round' is {round_!r}, not a round number")
            previous = data["previous_trainable"]
            return cls(fingerprint=str(data["fingerprint"]), round=round_, units=units,
                       trained_before=tuple(data["trained_before"]),
                       previous_trainable=None if previous is None else tuple(previous),
                       avoid_trained=bool(data["avoid_trained"]), calibration=dict(data["calibration"]))
        except (KeyError, TypeError) as exc:
            raise bad(f"a key is missing or of the wrong type ({exc})") from None

    def check(self, layout: Layout, round: int, source: str = "the scores") -> None:
        """Raise ScoresError unless these scores were computed for ``layout``'s model and ``round``."""
        if self.fingerprint != layout.fingerprint():
            raise ScoresError(f"{source} was computed for another model (fingerprint {self.fingerprint}, this model "
                              f"{layout.fingerprint()}); {HOW_TO_COMPUTE}.")
        if self.round != round:
            raise ScoresError(f"{source} was computed for round {self.round}, but this is round {round}: each round "
                              f"scores the model as it enters that round; {HOW_TO_COMPUTE}.")
        missing = [u.key for u in layout.units() if u.key not in self.units]
        if missing:
            raise ScoresError(f"{source} has no score for {len(missing)} units of this model (e.g. {missing[0]!r}); "
                              f"{HOW_TO_COMPUTE}.")


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str) -> str:
    """The content hash a scores file stores (checked): what a manifest records beside its path."""
    return Scores.load(path).sha256


# -- computing scores -----------------------------------------------------------------------------------

def compute_scores(model: nn.Module, texts: Sequence[str] | None = None, tokenizer: Any = None, *,
                   round: int | str = 0, avoid_trained: bool = False, num_samples: int = DEFAULT_SAMPLES,
                   length: int = DEFAULT_LENGTH, seed: int = 0, batch_size: int = 8,
                   min_texts: int = MIN_TEXTS) -> Scores:
    """Score every unit of ``model`` by its importance to the model's behaviour on calibration texts.

    Runs one forward pass (no gradient) over the texts; nothing on the model changes (its
    train/eval mode is restored, hooks are removed, the global random state is untouched).

    Args:
        model: the model as it enters the round (for round r > 0: the previous round's output).
        texts: calibration texts; with ``tokenizer``. Default: ``num_samples`` of the model's own
            samples from its BOS token (:func:`hft_plugin.sampling.sample_token_ids`, ``seed``).
        tokenizer: the model's tokenizer, needed with ``texts``.
        round: the round these scores choose for, or ``"next"`` (the round after the manifest of
            the folder the model was loaded from, as ``select_half`` reads it).
        avoid_trained: freeze first what earlier rounds trained (from the manifests of the folders
            the model went through), then by importance.
        num_samples, length, seed: the model's own samples: how many, how many tokens, the seed.
            ``length`` also truncates given texts.
        batch_size: texts per forward pass.
        min_texts: refuse fewer texts than this (default :data:`MIN_TEXTS`, measured).

    Raises:
        CalibrationError: no texts, an empty text, tokens the model does not have, too few texts,
            texts without a tokenizer. UnsupportedModelError: a model HFT cannot train, or on the
            meta device. LayoutError: a model no layout reads.

    Example:
        >>> from hft_plugin.testing import tiny_model
        >>> scores = compute_scores(tiny_model("llama"), num_samples=16, length=16)
        >>> scores.round, len(scores.units) > 0, scores.calibration["source"]
        (0, True, 'self-samples')
    """
    from .config import HFTConfig
    from .sampling import _device, sample_token_ids
    from .selection import check_model, folder_manifest, read_layout, resolve_round

    model = check_model(model)
    device = _device(model)  # a meta model is refused before any work
    layout = read_layout(model)
    config, history = resolve_round(model, HFTConfig(round=round))
    if isinstance(min_texts, bool) or not isinstance(min_texts, int) or min_texts < 1:
        raise CalibrationError(f"min_texts={min_texts!r} must be a whole number >= 1.")
    if texts is None:
        if num_samples < min_texts:
            raise CalibrationError(f"num_samples={num_samples} is below the minimum of {min_texts} texts for a stable "
                                   f"score (measured: see hft_plugin.importance.MIN_TEXTS); pass num_samples >= "
                                   f"{min_texts}.")
        ids, mask = sample_token_ids(model, num_samples, length, seed=seed, batch_size=batch_size)
        batches = [(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
        calibration = {"source": "self-samples", "num_texts": num_samples, "length": length, "seed": seed,
                       "texts_sha256": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()}
    else:
        batches, calibration = _tokenize(model, texts, tokenizer, length, batch_size, min_texts, device)
    norms, tokens = _input_norms(model, layout, batches)
    calibration["num_tokens"] = tokens
    units = {unit.key: _unit_score(model, unit.parts, norms) for unit in layout.units()}
    folder, previous = folder_manifest(model)
    previous_trainable = None
    if previous is not None and previous.fingerprint == layout.fingerprint():
        previous_trainable = tuple(sorted(previous.trainable_units))
    return Scores(fingerprint=layout.fingerprint(), round=int(config.round), units=units,
                  trained_before=tuple(sorted(_trained_before(layout, previous, history))),
                  previous_trainable=previous_trainable, avoid_trained=bool(avoid_trained), calibration=calibration)


def _tokenize(model: nn.Module, texts: Any, tokenizer: Any, length: int, batch_size: int, min_texts: int,
              device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise CalibrationError(f"texts must be a list of strings, got {type(texts).__name__}; pass e.g. "
                               "texts=['first text', 'second text', ...] or leave it out for the model's own samples.")
    if not texts:
        raise CalibrationError("texts=[] holds no calibration text; pass at least "
                               f"{min_texts} texts, or leave texts out for the model's own samples.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise CalibrationError(f"texts[{i}] is {text!r:.40}: an empty or non-text entry scores nothing; "
                                   "drop it or pass text.")
    if len(texts) < min_texts:
        raise CalibrationError(f"{len(texts)} calibration texts are below the minimum of {min_texts} for a stable "
                               f"score (measured: see hft_plugin.importance.MIN_TEXTS); pass at least {min_texts}, "
                               "or leave texts out for the model's own samples.")
    if tokenizer is None:
        raise CalibrationError("texts were given without a tokenizer; pass the model's tokenizer "
                               "(compute_scores(model, texts, tokenizer)).")
    vocab = model.get_input_embeddings().num_embeddings
    encoded = [tokenizer(t, truncation=True, max_length=length)["input_ids"] for t in texts]
    unk = getattr(tokenizer, "unk_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    total = sum(len(e) for e in encoded)
    for i, ids in enumerate(encoded):
        if ids and max(ids) >= vocab:
            raise CalibrationError(
                f"texts[{i}] has token id {max(ids)}, but the model's vocabulary has {vocab} tokens: the tokenizer "
                "is not this model's; pass the tokenizer the model was trained with.")
    unknown = sum(1 for ids in encoded for t in ids if unk is not None and t == unk and t != bos)
    if total and unknown / total > MAX_UNKNOWN_SHARE:
        raise CalibrationError(
            f"{unknown} of the texts' {total} tokens ({unknown / total:.0%}) are the unknown token "
            f"{getattr(tokenizer, 'unk_token', '?')!r}: the texts are in a script or alphabet this tokenizer does "
            f"not have (at most {MAX_UNKNOWN_SHARE:.0%} allowed); pass texts in the model's language(s).")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    batches = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, c in enumerate(chunk):
            ids[row, :len(c)] = torch.tensor(c, dtype=torch.long)
            mask[row, :len(c)] = 1
        batches.append((ids.to(device), mask.to(device)))
    digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    return batches, {"source": "texts", "num_texts": len(texts), "length": length, "texts_sha256": digest}


def _linear_input_dim(module: nn.Module, param_name: str, param: torch.Tensor) -> int | None:
    """Which dimension of a 2-D weight indexes the input features: 1 for nn.Linear ([out, in]), 0 for
    GPT-2's Conv1D ([in, out]); None for anything that is not a plain linear map's weight."""
    if param_name != "weight" or param.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":
        return 0
    return None


@torch.no_grad()
def _input_norms(model: nn.Module, layout: Layout, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[dict[str, torch.Tensor], int]:
    """Per scorable weight: the root-mean-square of each input feature over the calibration tokens."""
    modules = dict(model.named_modules())
    wanted: dict[str, nn.Module] = {}
    for unit in layout.units():
        for part in unit.parts:
            module_name, _, attr = part.param.rpartition(".")
            module = modules.get(module_name)
            param = getattr(module, attr, None) if module is not None else None
            if param is not None and _linear_input_dim(module, attr, param) is not None:
                wanted[module_name] = module
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            keep = current.get("mask")
            if keep is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(keep.shape):
                x = x[keep]  # padding and positions after EOS are not the model's behaviour
            x = x.reshape(-1, x.shape[-1]).double()
            total = (x * x).sum(dim=0)
            sums[name] = sums[name] + total if name in sums else total
        return hook

    # The scores need the layers' inputs, not the logits: keeping one position's logits saves the
    # largest tensor of the pass (batch x length x vocabulary floats: 190 MB for SmolLM2 at 8 x 128).
    keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in wanted.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for ids, mask in batches:
            current["mask"] = mask.bool()
            tokens += int(mask.sum())
            model(input_ids=ids, attention_mask=mask, use_cache=False, **keep_logits)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise CalibrationError("the calibration texts hold no token; pass non-empty texts.")
    return {n: (s / tokens).sqrt() for n, s in sums.items()}, tokens


def _unit_score(model: nn.Module, parts: tuple[Part, ...], norms: dict[str, torch.Tensor]) -> float | None:
    """Wanda's sum over a unit's weight elements: |W| times its input feature's RMS."""
    total, scored = 0.0, False
    for part in parts:
        module_name, _, attr = part.param.rpartition(".")
        if module_name not in norms or attr != "weight":
            continue  # biases and parameters of no linear map add nothing
        module = model.get_submodule(module_name)
        weight = getattr(module, attr).detach()
        dim = _linear_input_dim(module, attr, weight)
        rms = norms[module_name].to(weight.device)
        shape = [1, 1]
        shape[dim] = -1
        boxes = part.boxes if part.boxes is not None else ((),)
        for box in boxes:
            index = box_index(tuple(weight.shape), box)
            block = weight[index].double().abs()
            column = rms[index[dim]].view(shape)
            total += float((block * column).sum())
        scored = True
    return total if scored else None


def _trained_before(layout: Layout, previous: Any, history: tuple[dict[str, Any], ...]) -> set[str]:
    """Units that earlier rounds trained on these weights: the previous manifest's, and those of the
    folders named in its history that still hold their manifest (same model, same round)."""
    from .selection import MANIFEST_NAME, Selection

    trained: set[str] = set()
    fingerprint = layout.fingerprint()
    if previous is not None and previous.fingerprint == fingerprint:
        trained |= set(previous.trainable_units)
    for entry in history:
        folder = entry.get("folder")
        path = os.path.join(folder, MANIFEST_NAME) if isinstance(folder, str) else None
        if path is None or not os.path.isfile(path):
            continue
        try:
            earlier = Selection.load(path)
        except Exception:  # an earlier folder overwritten or damaged: that round cannot be avoided
            continue
        if earlier.fingerprint == fingerprint and earlier.config.round == entry.get("round"):
            trained |= set(earlier.trainable_units)
    return trained & {u.key for u in layout.units()}
