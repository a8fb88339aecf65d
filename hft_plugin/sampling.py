"""Texts a causal LM writes from its beginning-of-sequence token, reproducibly.

Used for self-replay (:mod:`hft_plugin.replay`) and meant for any other user of the model's own
samples (the forgetting monitor's probe texts). Sampling draws from one ``torch.Generator`` seeded
with ``seed`` on the CPU: the global random state is never read or changed, and the draws do not
depend on the device the model runs on (the probabilities are moved to the CPU to be sampled).

    >>> from hft_plugin.testing import tiny_model, tiny_tokenizer
    >>> texts = sample_texts(tiny_model("llama"), tiny_tokenizer(), 2, max_new_tokens=8, seed=0)
    >>> len(texts), texts == sample_texts(tiny_model("llama"), tiny_tokenizer(), 2, max_new_tokens=8, seed=0)
    (2, True)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .errors import ReplayError


def start_token(tokenizer: Any, model: Any = None) -> int:
    """The token sampling starts from: the tokenizer's BOS, else the model config's, else EOS (GPT-2
    style models use one token for both). Raises ReplayError if there is none."""
    for owner, name in ((tokenizer, "bos_token_id"), (getattr(model, "config", None), "bos_token_id"),
                        (tokenizer, "eos_token_id")):
        value = getattr(owner, name, None)
        if isinstance(value, int):
            return value
    raise ReplayError("the model's tokenizer has neither a beginning- nor an end-of-sequence token to sample from; "
                      "set tokenizer.bos_token, or replay stored data instead of 'self'.")


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer: Any, count: int, *, max_new_tokens: int = 64, seed: int = 0,
                 temperature: float = 1.0, batch_size: int = 16) -> list[str]:
    """``count`` texts sampled from ``model`` starting at the BOS token (ancestral sampling at
    ``temperature``), each at most ``max_new_tokens`` tokens, ending early at EOS.

    Args:
        model: a causal LM whose forward takes ``input_ids`` (and ``past_key_values``) and returns
            ``logits`` of shape [batch, length, vocab]. Its training mode is restored afterwards.
        tokenizer: decodes the tokens (special tokens skipped); gives BOS and EOS.
        count: how many texts; the result has exactly ``count`` strings (some may be empty when the
            model ends at once).
        seed: the draws are a function of (model weights, seed, batch_size, max_new_tokens).

    Returns:
        A list of ``count`` strings.

    Raises:
        ReplayError: ``count < 1``, ``max_new_tokens < 1``, or no BOS/EOS token to start from.
    """
    if count < 1 or max_new_tokens < 1:
        raise ReplayError(f"cannot sample {count} texts of up to {max_new_tokens} tokens; both must be at least 1.")
    start = start_token(tokenizer, model)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(int(seed))
    # transformers 5.25 renamed the cache argument and output (past_key_values -> cache)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for first in range(0, count, batch_size):
            n = min(batch_size, count - first)
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            tokens = ids
            past = None
            done = torch.zeros(n, dtype=torch.bool)
            for _ in range(max_new_tokens):
                out = model(input_ids=ids, use_cache=True, **{cache_name: past})
                past = getattr(out, cache_name, None)
                logits = out.logits[:, -1, :].float().cpu() / max(temperature, 1e-6)
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                ids = nxt.unsqueeze(1).to(device)
                tokens = torch.cat([tokens, ids], dim=1)
                if past is None:  # a model without a cache: feed the whole sequence again
                    ids = tokens
                if bool(done.all()):
                    break
            for row in tokens[:, 1:].cpu().tolist():
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
