"""HFT in a plain PyTorch loop is the same half frozen by hand.

Each run trains a tiny model with HFT exactly as the README shows (``apply_selection``, an
optimizer over ``handle.parameters()``, ``attach``, ``clip_grad_norm_(model.parameters())``,
``step``) and the same model with the same half frozen by hand (tests/hand_frozen.py: separate
leaf tensors for the trainable parts of fused tensors), from the same weights on the same batches.
Trained weights must agree to float tolerance, frozen elements must be bit-identical, and the
clipped norms must agree: the norm HFT clips is the trained half's.
"""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from hft_plugin import HFTError, apply_selection, select_half
from hft_plugin.testing import tiny_model

from .hand_frozen import HandFrozen, box_index
from .helpers import MixingSGD, assert_frozen_and_trained, snapshot

FAMILIES = ["llama", "phi3", "gpt2", "gpt_neox", "mixtral", "qwen3_moe"]
FUSED = ["phi3", "gpt_neox", "mixtral", "gpt2"]

OPTIMIZERS = {
    "adamw_weight_decay": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9),
    "adafactor": lambda params: Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False),
    "mixing": lambda params: MixingSGD(params),
}


def batches(steps: int, accumulation: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, 96, (4, 16), generator=gen) for _ in range(accumulation)] for _ in range(steps)]


def train(forward, params_to_clip, optimizer, data, max_norm) -> list[float]:
    """Steps of gradient accumulation, clipping and an optimizer step; the clipped norms."""
    norms = []
    for micro_batches in data:
        for ids in micro_batches:
            loss = forward(input_ids=ids, labels=ids).loss / len(micro_batches)
            loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params_to_clip(), max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def compare(selection, hft_after: dict, reference_after: dict, before: dict, atol: float) -> None:
    plan = selection.plan()
    for name in plan.frozen:
        assert torch.equal(hft_after[name], before[name]), f"frozen {name} moved"
    for name in plan.trainable:
        torch.testing.assert_close(hft_after[name], reference_after[name], atol=atol, rtol=1e-4, msg=name)
        assert not torch.equal(hft_after[name], before[name]), f"trainable {name} did not move"
    for name, boxes in plan.partial.items():
        trainable = torch.zeros(before[name].shape, dtype=torch.bool)
        for box in boxes:
            trainable[box_index(before[name].shape, box)] = True
        assert torch.equal(hft_after[name][~trainable], before[name][~trainable]), f"frozen part of {name} moved"
        torch.testing.assert_close(hft_after[name][trainable], reference_after[name][trainable], atol=atol, rtol=1e-4,
                                   msg=name)
        assert not torch.equal(hft_after[name][trainable], before[name][trainable]), f"trained part of {name} did not move"


def run_both(family: str, make_optimizer, *, steps=3, accumulation=2, max_norm=1.0, round=1):
    model = tiny_model(family).eval()  # no dropout: both runs see the same function
    selection = select_half(model, round=round)
    reference = HandFrozen(model, selection.plan())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = apply_selection(model, selection)
    optimizer = make_optimizer(handle.parameters())
    handle.attach(optimizer)
    data = batches(steps, accumulation)
    hft_norms = train(model, model.parameters, optimizer, data, max_norm)
    ref_optimizer = make_optimizer(reference.parameters())
    ref_norms = train(reference, reference.parameters, ref_optimizer, data, max_norm)
    hft_after = {n: p.detach().clone() for n, p in model.named_parameters() if n in before}
    handle.remove()
    return selection, before, hft_after, reference.weights(), hft_norms, ref_norms


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_same_as_frozen_by_hand(family, optimizer):
    """Clipping (max norm 1, always active here) and 2 micro-batches of gradient accumulation."""
    selection, before, hft, ref, hft_norms, ref_norms = run_both(family, OPTIMIZERS[optimizer])
    assert hft_norms == pytest.approx(ref_norms, rel=1e-5)
    compare(selection, hft, ref, before, atol=2e-5)


# -- the failing cases, as users met them ---------------------------------------------------------


@pytest.mark.parametrize("family", FUSED)
def test_clip_norm_in_a_plain_loop_is_the_trained_halfs(family):
    """The README's loop: backward, clip_grad_norm_(model.parameters()), step. The norm is the
    trained half's, so every update is what the same half frozen by hand gets (SGD: the update
    scales with the clip factor)."""
    make = lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)  # noqa: E731
    selection, before, hft, ref, hft_norms, ref_norms = run_both(family, make, steps=3, accumulation=1,
                                                                 max_norm=0.1, round=0)
    assert hft_norms == pytest.approx(ref_norms, rel=1e-5), (hft_norms, ref_norms)
    compare(selection, hft, ref, before, atol=2e-5)


def test_an_inf_in_a_frozen_slice_does_not_skip_a_step():
    """A gradient scaler skips a step whose gradients hold an inf. An inf that only a frozen slice of
    a fused tensor would get (here: its output rows weighted by 1e38, for inputs that need no
    gradient) must not skip the step the same half frozen by hand takes."""
    model = tiny_model("phi3")
    selection = select_half(model, round=0)
    handle = apply_selection(model, selection)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    boxes = selection.plan().partial[name]
    module = model.model.layers[0].self_attn.qkv_proj
    trainable_rows = torch.zeros(module.out_features, dtype=torch.bool)
    for box in boxes:
        (dim, start, stop), = box
        trainable_rows[start:stop] = True
    assert trainable_rows.any() and not trainable_rows.all()
    weight = torch.ones(module.out_features)
    weight[~trainable_rows] = 1e38  # the frozen rows' weight gradient overflows; the trained rows' does not
    optimizer = torch.optim.SGD(handle.parameters(), lr=1e-2)
    handle.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    before = module.weight.detach().clone()
    x = torch.randn(4, 16, module.in_features, generator=torch.Generator().manual_seed(0))
    loss = (module(x) * weight).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    after = module.weight.detach()
    assert torch.equal(after[~trainable_rows], before[~trainable_rows])
    assert not torch.equal(after[trainable_rows], before[trainable_rows]), "the step was skipped"
    assert scaler.get_scale() == 1.0  # no overflow was seen
    handle.remove()


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
def test_an_optimizer_kept_across_rounds_is_refused(family, kind):
    """Round 0 trains with an optimizer over its handle.parameters(); round 1 attaches the same
    optimizer. Its state and its tensors belong to round 0: attach refuses it, naming the remedy,
    and changes nothing; a new optimizer from round 1's handle.parameters() trains round 1 exactly."""
    make = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
            "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9)}[kind]
    model = tiny_model(family)
    first = apply_selection(model, select_half(model, round=0))
    optimizer = make(first.parameters())
    first.attach(optimizer)
    _steps(model, optimizer, 2)
    selection = select_half(model, round=1)
    second = apply_selection(model, selection)
    before = snapshot(model)
    with pytest.raises(HFTError, match=r"handle\.parameters\(\)") as caught:
        second.attach(optimizer)
    assert type(caught.value).__name__ == "OptimizerMismatchError"
    _steps(model, optimizer, 2)  # even if used anyway, the stale optimizer moves nothing of round 1's frozen half
    after = snapshot(model)
    for name in selection.plan().frozen:
        assert torch.equal(before[name], after[name]), name
    fresh = make(second.parameters())
    second.attach(fresh)
    before = snapshot(model)
    _steps(model, fresh, 2)
    assert_frozen_and_trained(selection, before, snapshot(model))
    second.remove()


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
def test_an_optimizer_over_model_parameters_is_refused(family):
    """``AdamW(model.parameters())`` owns the frozen half (and, for fused tensors, misses the
    trainable regions): refused by attach, with the remedy."""
    model = tiny_model(family)
    handle = apply_selection(model, select_half(model, round=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(HFTError, match=r"handle\.parameters\(\)"):
        handle.attach(optimizer)
    handle.remove()


@pytest.mark.parametrize("partial", ["auto", "mask"])
def test_two_optimizers_each_keep_their_protection(partial):
    """Muon-like updates over the layers' matrices and AdamW over the rest, each attached: the frozen
    slices of every fused tensor stay bit-identical and every trainable part moves."""
    model = tiny_model("phi3")
    selection = select_half(model, round=0)
    handle = apply_selection(model, selection) if partial == "auto" else apply_selection(model, selection, partial=partial)
    named = list(handle.named_parameters())
    matrices = [p for n, p in named if p.ndim >= 2 and ".layers." in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and ".layers." in n)]
    muon = MixingSGD(matrices, lr=1e-2)
    adamw = torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)
    handle.attach(muon)
    handle.attach(adamw)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(3, 96, (4, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        muon.step()
        adamw.step()
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
    counts = assert_frozen_and_trained(selection, before, snapshot(model))
    assert counts["partial"] == 6
    handle.remove()


def test_two_optimizers_must_cover_the_trainable_half_before_a_step():
    """An attached optimizer that leaves trainable tensors to no optimizer: refused before its step."""
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model, round=0))
    params = handle.parameters()
    optimizer = torch.optim.AdamW(params[: len(params) // 2], lr=1e-2)
    handle.attach(optimizer)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    before = snapshot(model)
    with pytest.raises(HFTError, match="lacks .* trainable tensors"):
        optimizer.step()
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    handle.remove()


def _steps(model, optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(3, 96, (4, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
