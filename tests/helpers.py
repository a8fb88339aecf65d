"""Checks shared by the tests: what "frozen" and "trained" mean, bit for bit."""

from __future__ import annotations

import torch

from hft_plugin.masking import region_mask


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_frozen_and_trained(selection, before: dict, after: dict) -> dict[str, int]:
    """Every frozen element bit-identical, every trainable tensor (or region) moved.

    Returns counts of the checks made, so callers can assert they were not vacuous.
    """
    plan = selection.plan()
    counts = {"frozen": 0, "trained": 0, "partial": 0}
    for name in plan.frozen:
        assert torch.equal(before[name], after[name]), f"frozen tensor {name} changed"
        counts["frozen"] += 1
    for name in plan.trainable:
        assert not torch.equal(before[name], after[name]), f"trainable tensor {name} did not move"
        counts["trained"] += 1
    for name, boxes in plan.partial.items():
        mask = region_mask(tuple(before[name].shape), boxes, device=before[name].device)
        assert torch.equal(before[name][~mask], after[name][~mask]), f"frozen region of {name} changed"
        assert not torch.equal(before[name][mask], after[name][mask]), f"trainable region of {name} did not move"
        counts["partial"] += 1
    return counts


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
