"""apply_selection: frozen elements stay bit-identical under real optimizers; trainable ones move."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from hft_plugin import apply_selection, select_half
from hft_plugin.freeze import active_handle
from hft_plugin.testing import tiny_model

from .helpers import MixingSGD, assert_frozen_and_trained, snapshot, train_steps


OPTIMIZERS = {
    "adamw_weight_decay": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adamw_no_decay": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9),
    "sgd_momentum_decay": lambda params: torch.optim.SGD(params, lr=1e-1, momentum=0.9, weight_decay=0.01),
    "adafactor": lambda params: Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False),
    "mixing": lambda params: MixingSGD(params),
}


@pytest.mark.parametrize("partial", ["auto", "mask"])
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "mixtral"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_frozen_bits_identical_and_trainable_moved(family, optimizer, partial):
    model = tiny_model(family)
    selection = select_half(model, round=1)
    handle = apply_selection(model, selection, partial=partial)
    opt = OPTIMIZERS[optimizer](handle.parameters())
    handle.attach(opt)
    before = snapshot(model)
    train_steps(model, opt, steps=3, handle=handle)
    counts = assert_frozen_and_trained(selection, before, snapshot(model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    if family in ("phi3", "gpt2", "mixtral"):
        assert counts["partial"] > 0
    handle.remove()


def test_masking_alone_is_used_where_it_is_exact_and_restore_where_it_is_not():
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model), partial="mask")
    handle.attach(torch.optim.AdamW(handle.parameters(), weight_decay=0.0))
    assert handle.restore is None
    handle.attach(torch.optim.AdamW(handle.parameters(), weight_decay=0.1))
    assert handle.restore is not None
    handle.remove()


def test_without_the_mask_fused_slices_would_move():
    """Under the mask mechanism the masks carry the promise: the same run without attach() moves
    frozen slices."""
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection, partial="mask")
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    before = snapshot(model)
    train_steps(model, opt, steps=2)
    with pytest.raises(AssertionError, match="frozen region"):
        assert_frozen_and_trained(selection, before, snapshot(model))


def test_optimizer_owns_exactly_the_trainable_tensors():
    model = tiny_model("llama")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    plan = selection.plan()
    names = [n for n, _ in handle.named_parameters()]
    assert sorted(names) == sorted(plan.trainable + tuple(plan.partial))
    assert sum(p.numel() for p in handle.parameters()) == selection.stats()["trainable_params"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in plan.frozen)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    train_steps(model, opt, steps=1)
    assert len(opt.state) == len(names)


def test_remove_restores_flags_and_rounds_follow_each_other():
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice survives
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = apply_selection(model, select_half(model, 0))
    assert active_handle(model) is first
    second = apply_selection(model, select_half(model, 1))  # removes round 0 first
    assert first.removed and active_handle(model) is second
    trainable = {n for n, _ in second.named_parameters()}
    assert trainable == {n for n in select_half(model, 1).plan().trainable if flags[n]}
    second.remove()
    second.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert active_handle(model) is None


def test_mask_is_one_fused_call_per_step(monkeypatch):
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model), partial="mask")
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    handle.attach(opt)
    calls = []
    real = torch._foreach_zero_
    monkeypatch.setattr(torch, "_foreach_zero_", lambda views: calls.append(len(views)) or real(views))
    train_steps(model, opt, steps=2)  # the optimizer's pre-hook masks
    # one call per step, over the frozen blocks of every masked tensor (q/k/v and gate/up blocks)
    assert len(calls) == 2 and calls[0] >= len(handle.masked_parameters)


def test_torch_compile_trains_and_keeps_frozen_bits():
    model = tiny_model("llama")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(opt)
    before = snapshot(model)
    train_steps(compiled, opt, steps=2, handle=handle)
    assert_frozen_and_trained(selection, before, snapshot(model))
    assert select_half(compiled).trainable_units == selection.trainable_units


def test_a_skipped_step_does_not_leave_the_next_one_unmasked():
    """A gradient scaler skips optimizer.step on overflow; the next step must still be masked."""
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection, partial="mask")
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.0)
    handle.attach(opt)
    assert handle.restore is None  # masking alone carries the promise here
    before = snapshot(model)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    handle.mask_gradients()
    opt.zero_grad(set_to_none=True)  # the step was skipped
    model(input_ids=ids, labels=ids).loss.backward()
    handle.mask_gradients()
    opt.step()
    assert_frozen_and_trained(selection, before, snapshot(model))


def test_attaching_again_replaces_the_hooks_and_a_second_optimizer_keeps_the_first_ones():
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model), partial="mask")
    first = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    handle.attach(first)
    handle.attach(first)
    assert len(first._optimizer_step_pre_hooks) == 1 and len(first._optimizer_step_post_hooks) == 1
    second = torch.optim.SGD(handle.parameters(), lr=1e-2)
    handle.attach(second)
    assert len(first._optimizer_step_pre_hooks) == 1 and len(second._optimizer_step_pre_hooks) == 1
    handle.detach(first)
    assert len(first._optimizer_step_pre_hooks) == 0 and len(second._optimizer_step_pre_hooks) == 1
    handle.remove()
    assert len(second._optimizer_step_pre_hooks) == 0


def test_restore_follows_weights_loaded_after_attach():
    """Resuming loads weights after the optimizer exists: refresh() makes those the frozen values."""
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection, partial="mask")
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(opt)
    assert handle.restore is not None
    with torch.no_grad():
        model.load_state_dict(tiny_model("phi3", seed=1).state_dict())
    handle.refresh()
    loaded = snapshot(model)
    train_steps(model, opt, steps=2, handle=handle)
    assert_frozen_and_trained(selection, loaded, snapshot(model))


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_a_model_dropped_while_applied_is_collected(family):
    # the registry of applied handles must not keep every model HFT touched alive until exit
    import gc
    import weakref

    model = tiny_model(family)
    handle = apply_selection(model, select_half(model))
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
    handle.attach(optimizer)
    gone = weakref.ref(model)
    del model, optimizer
    gc.collect()
    assert gone() is None
    handle.remove()  # nothing left to restore: harmless
    assert handle.removed
