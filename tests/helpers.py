"""Checks shared by the tests: what "frozen" and "trained" mean, bit for bit."""

from __future__ import annotations

import torch

from hft_plugin.testing import assert_frozen_and_trained, snapshot  # noqa: F401 - re-exported for the tests


def train_steps(model, optimizer, steps: int = 4, seed: int = 0, vocab: int = 96, handle=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if handle is not None:
            handle.mask_gradients()  # as a trainer does before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
