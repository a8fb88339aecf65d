"""A one-minute demo: fine-tune a tiny model with and without HFT and check the frozen half.

    python -m hft_plugin.demo [--family phi3|llama|...] [--steps 30] [--round 0]

It builds a tiny causal LM from a config (nothing downloads), teaches it a toy task (spelling words
backwards) with a plain PyTorch loop and AdamW, once fully and once with HFT, and prints the
selection summary, the losses, how much optimizer state each run holds, and the bit-for-bit check
that every frozen weight stayed identical.

Step times are left out on purpose: on a model this small, per-step overhead hides the saving of
the frozen half's weight gradients and optimizer update; ``benchmarks/speed.py`` measures them
side by side on larger models (docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy

import torch

from . import apply_selection, select_half
from .testing import TINY_CONFIGS, assert_frozen_and_trained, snapshot, tiny_model, tiny_tokenizer


def _batches(tokenizer, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest"]
    for _ in range(steps):
        picks = torch.randint(len(words), (8,), generator=gen).tolist()
        texts = [f"reverse {words[i]} = {words[i][::-1]}" for i in picks]
        ids = tokenizer(texts, padding=True, return_tensors="pt").input_ids
        yield ids


def _train(model, params, steps: int, seed: int, handle=None) -> tuple[list[float], int]:
    """Train; return the losses and the number of elements AdamW keeps state for."""
    tokenizer = tiny_tokenizer()
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    if handle is not None:
        handle.attach(optimizer)
    losses = []
    for ids in _batches(tokenizer, steps, seed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    state = sum(t.numel() for s in optimizer.state.values() for k, t in s.items()
                if k != "step" and isinstance(t, torch.Tensor))
    return losses, state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hft_plugin.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="phi3", choices=sorted(TINY_CONFIGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    # One thread: on matrices this small more threads only add synchronisation, which costs several
    # times the work on a machine whose cores are busy with other jobs.
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)

    base = tiny_model(args.family)
    total = sum(p.numel() for p in base.parameters())
    print(f"HFT demo: a tiny {type(base).__name__} ({total:,} parameters, random weights, built from a config; "
          f"nothing downloads) learns to spell words backwards, {args.steps} AdamW steps on CPU, once with full "
          f"fine-tuning and once with Half Fine-Tuning round {args.round}; then every frozen weight is checked "
          "bit for bit.\n")
    full, half = copy.deepcopy(base), copy.deepcopy(base)
    full_losses, full_state = _train(full, full.parameters(), args.steps, seed=1)

    selection = select_half(half, round=args.round)
    print(selection.summary(), end="\n\n")
    handle = apply_selection(half, selection)
    half_losses, half_state = _train(half, handle.parameters(), args.steps, seed=1, handle=handle)

    print(f"{'':<22}{'first loss':>12}{'last loss':>12}{'AdamW state':>16}")
    print(f"{'full fine-tuning':<22}{full_losses[0]:>12.3f}{full_losses[-1]:>12.3f}{full_state:>16,}")
    print(f"{'half fine-tuning':<22}{half_losses[0]:>12.3f}{half_losses[-1]:>12.3f}{half_state:>16,}")
    print("(AdamW state: elements of its two moment tensors, so twice the parameters each run trains; a fused "
          "tensor trained in part has state for its trained rows only. This model is too small for step times to "
          "show HFT's saving: see benchmarks/speed.py.)\n")

    try:
        counts = assert_frozen_and_trained(selection, snapshot(base), snapshot(half))
    except AssertionError as exc:
        print(f"frozen elements bit-identical: False ({exc})")
        return 1
    print(f"frozen elements bit-identical: True ({counts['frozen_elements']:,} elements in {counts['frozen']} "
          f"whole tensors and {counts['partial']} fused tensors)")
    print(f"every trainable tensor moved ({counts['trained']} whole tensors, and the trainable parts of the fused ones)")
    handle.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
