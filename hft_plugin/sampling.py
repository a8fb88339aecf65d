"""The base model's own samples, drawn from its BOS token with a private generator.

Texts the model itself writes are a calibration, probe and replay set that needs no data, and that
stands for what the model already does: the importance scores of the ``shielded`` strategy are
computed on them by default, and replay's ``"self"`` source trains on them. The draw uses a ``torch.Generator`` of its own, never the
global random state, so a training script's random stream is the same with or without it, and the
same seed gives the same samples on every rank.

    >>> import torch
    >>> from hft_plugin.testing import tiny_model
    >>> state = torch.random.get_rng_state()
    >>> ids, mask = sample_token_ids(tiny_model("llama"), num_samples=3, length=8, seed=0)
    >>> ids.shape, bool(torch.equal(state, torch.random.get_rng_state()))
    (torch.Size([3, 8]), True)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, UnsupportedModelError


def find_bos_token_id(model: nn.Module) -> int:
    """The id every sample starts from: the config's (or generation config's) BOS token."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        token = getattr(source, "bos_token_id", None)
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
        if isinstance(token, int):
            return token
    raise CalibrationError(f"{type(model).__name__} has no bos_token_id in its config, so its own samples cannot "
                           "be drawn; pass bos_token_id=..., or pass calibration texts and a tokenizer.")


def eos_token_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        token = getattr(source, "eos_token_id", None)
        ids.update(t for t in (token if isinstance(token, (list, tuple)) else [token]) if isinstance(t, int))
    return ids


@torch.no_grad()
def sample_token_ids(model: nn.Module, num_samples: int, length: int, *, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 16,
                     bos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` sequences of ``length`` tokens (the BOS token first) from ``model``.

    Plain ancestral sampling at ``temperature`` with a KV cache, from a ``torch.Generator`` seeded
    with ``seed`` on the model's device (the global random state is untouched). A sequence keeps
    its first EOS; the positions after it are masked out (``mask`` is 0 there), so they count in
    no statistic. The model's train/eval mode is restored.

    Returns:
        ``(ids, mask)``: two ``[num_samples, length]`` tensors on the model's device.

    Raises:
        CalibrationError: a count or length below 1 (or a length of 1: nothing would be drawn), or no
            BOS token. UnsupportedModelError: a model on the meta device (it has no weights to sample).
    """
    for name, value in (("num_samples", num_samples), ("length", length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name}={value!r} must be a whole number >= 1.")
    if length < 2:
        raise CalibrationError(f"length={length} leaves no token to sample after BOS; pass length >= 2, e.g. 128.")
    if not temperature > 0:
        raise CalibrationError(f"temperature={temperature!r} must be > 0 (1.0 samples the model as it is).")
    device = _device(model)
    start = bos_token_id if bos_token_id is not None else find_bos_token_id(model)
    eos = sorted(eos_token_ids(model))
    generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        chunks = [_sample_batch(model, min(batch_size, num_samples - done), length, start, temperature, generator, device)
                  for done in range(0, num_samples, batch_size)]
    finally:
        model.train(was_training)
    ids = torch.cat(chunks)
    mask = torch.ones_like(ids)
    if eos:
        is_eos = torch.isin(ids, torch.tensor(eos, device=device))
        is_eos[:, 0] = False  # a BOS that doubles as EOS (some tokenizers) is not an end
        after = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # strictly after the first EOS
        mask[after] = 0
    return ids, mask


def _sample_batch(model: nn.Module, n: int, length: int, start: int, temperature: float,
                  generator: torch.Generator, device: torch.device) -> torch.Tensor:
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    # transformers 5.25 renamed the KV cache argument and output from past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past: Any = None
    step_input = ids
    for _ in range(length - 1):
        attention = torch.ones(ids.shape, dtype=torch.long, device=device)  # no padding: every sample is as long
        out = model(input_ids=step_input, attention_mask=attention, use_cache=True,
                    **({cache_arg: past} if past is not None else {}))
        past = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
        logits = out.logits[:, -1, :].float() / temperature
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
        step_input = token
    return ids


def start_token(tokenizer: Any, model: Any = None) -> int:
    """The token text samples start from: the tokenizer's BOS, else the model config's, else EOS
    (GPT-2-style models use one token for both). Raises CalibrationError if there is none."""
    for owner, name in ((tokenizer, "bos_token_id"), (getattr(model, "config", None), "bos_token_id"),
                        (tokenizer, "eos_token_id")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    raise CalibrationError("the model's tokenizer has neither a beginning- nor an end-of-sequence token to sample "
                           "from; set tokenizer.bos_token, or pass stored texts instead of the model's own samples.")


def sample_texts(model: nn.Module, tokenizer: Any, count: int, *, max_new_tokens: int = 64, seed: int = 0,
                 temperature: float = 1.0, batch_size: int = 16) -> list[str]:
    """``count`` texts of up to ``max_new_tokens`` tokens that ``model`` writes from its start token
    (:func:`start_token`), each up to its first EOS, decoded with ``tokenizer`` (special tokens
    dropped): :func:`sample_token_ids` as text. Some may be empty when the model ends at once.

        >>> from hft_plugin.testing import tiny_model, tiny_tokenizer
        >>> texts = sample_texts(tiny_model("llama"), tiny_tokenizer(), 2, max_new_tokens=8, seed=0)
        >>> len(texts), texts == sample_texts(tiny_model("llama"), tiny_tokenizer(), 2, max_new_tokens=8, seed=0)
        (2, True)
    """
    ids, mask = sample_token_ids(model, count, max_new_tokens + 1, seed=seed, temperature=temperature,
                                 batch_size=batch_size, bos_token_id=start_token(tokenizer, model))
    eos = set(eos_token_ids(model)) | ({tokenizer.eos_token_id} if isinstance(getattr(tokenizer, "eos_token_id", None), int) else set())
    texts = []
    for row, keep in zip(ids[:, 1:].tolist(), mask[:, 1:].tolist()):
        row = [t for t, k in zip(row, keep) if k]
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no parameters to sample with.")
    if param.device.type == "meta":
        raise UnsupportedModelError(f"{type(model).__name__} is on the meta device: its samples need its weights. "
                                    "Load the model (from_pretrained) before drawing samples or computing scores.")
    return param.device
