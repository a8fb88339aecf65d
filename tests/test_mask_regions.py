"""The block form of the gradient mask: the frozen slices cover exactly the frozen elements, the
slices found from boxes are those found in the dense mask, and masking and restoring through them
are bit-identical to the dense definition."""

from __future__ import annotations

import random

import pytest
import torch

from hft_plugin.boxes import MAX_FROZEN_SLICES, frozen_slices, frozen_slices_of_mask, to_mask, within
from hft_plugin.mechanisms.mask import Frozen, FrozenRestore, GradientMask


def _random_region(rng: random.Random):
    shape = tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 3)))
    boxes = []
    for _ in range(rng.randint(0, 3)):
        box = []
        for dim, size in enumerate(shape):
            if rng.random() < 0.6:
                start = rng.randint(0, size - 1)
                box.append((dim, start, rng.randint(start + 1, size)))
        boxes.append(tuple(box))
    return shape, tuple(boxes)


@pytest.mark.parametrize("seed", range(4))
def test_frozen_slices_cover_exactly_the_frozen_elements(seed):
    rng = random.Random(seed)
    for _ in range(100):
        shape, boxes = _random_region(rng)
        trainable = to_mask(shape, boxes, "cpu")
        cover = torch.zeros(shape, dtype=torch.int32)
        for box in frozen_slices_of_mask(trainable):
            cover[box] += 1
        assert torch.equal(cover, (~trainable).to(torch.int32)), (shape, boxes)  # each frozen element once
        # found from the boxes alone: the very slices the dense mask gives
        assert frozen_slices(shape, boxes) == frozen_slices_of_mask(trainable), (shape, boxes)


def test_slices_from_boxes_give_up_where_the_dense_mask_does():
    shape = (130, 130)
    boxes = tuple(((0, i, i + 1), (1, j, j + 1)) for i in range(0, 130, 2) for j in range(0, 130, 2))  # a checkerboard
    assert frozen_slices_of_mask(to_mask(shape, boxes, "cpu")) is None and frozen_slices(shape, boxes) is None
    frozen = Frozen.of_boxes(shape, boxes)  # then the dense mask, built from the boxes
    assert torch.equal(frozen.dense("cpu", torch.float32), to_mask(shape, boxes, "cpu", torch.float32))
    rows = tuple(((0, i, i + 1),) for i in range(0, 130, 2))  # 65 row blocks: few slices, far below the limit
    assert len(frozen_slices((130, 4), rows)) == 65 < MAX_FROZEN_SLICES


@pytest.mark.parametrize("seed", range(2))
def test_boxes_cut_to_a_part_are_the_part_of_the_mask(seed):
    rng = random.Random(200 + seed)
    for _ in range(100):
        shape, boxes = _random_region(rng)
        part = []
        for size in shape:
            start = rng.randint(0, size)
            part.append(slice(start, rng.randint(start, size)))
        part = tuple(part)
        local_shape, local_boxes = within(shape, boxes, part)
        assert torch.equal(to_mask(local_shape, local_boxes, "cpu"), to_mask(shape, boxes, "cpu")[part]), (shape, boxes, part)


@pytest.mark.parametrize("seed", range(4))
def test_mask_and_restore_match_the_dense_definition(seed):
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        shape, boxes = _random_region(rng)
        trainable = to_mask(shape, boxes, "cpu")
        param = torch.nn.Parameter(torch.randn(shape, generator=gen))
        grad = torch.randn(shape, generator=gen)
        grad[~trainable] = float("nan")  # a frozen element's gradient may be anything
        param.grad = grad.clone()
        GradientMask([param], [trainable]).apply()
        assert torch.equal(param.grad[trainable], grad[trainable])
        assert bool((param.grad[~trainable] == 0).all())
        before = param.detach().clone()
        restore = FrozenRestore([param], [trainable])
        with torch.no_grad():
            param.mul_(3.0).add_(1.0)
        restore.apply()
        assert torch.equal(param.detach()[~trainable], before[~trainable])
        assert torch.equal(param.detach()[trainable], before[trainable] * 3.0 + 1.0)


def test_scattered_regions_fall_back_to_a_dense_mask():
    gen = torch.Generator().manual_seed(0)
    trainable = torch.rand(80, 80, generator=gen) > 0.5
    assert frozen_slices_of_mask(trainable) is None
    param = torch.nn.Parameter(torch.randn(80, 80, generator=gen))
    grad = torch.randn(80, 80, generator=gen)
    param.grad = grad.clone()
    GradientMask([param], [trainable]).apply()
    assert torch.equal(param.grad, grad * trainable)
    before = param.detach().clone()
    restore = FrozenRestore([param], [trainable])
    with torch.no_grad():
        param.add_(1.0)
    restore.apply()
    assert torch.equal(param.detach()[~trainable], before[~trainable])


def test_fused_layouts_need_few_boxes():
    from hft_plugin import select_half
    from hft_plugin.testing import tiny_model

    for family in ("phi3", "gpt2", "gpt_neox", "mixtral"):
        model = tiny_model(family)
        plan = select_half(model, 0).plan()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for name, boxes in plan.partial.items():
            found = frozen_slices(shapes[name], boxes)
            assert found is not None and len(found) <= max(len(boxes), 1) * 2 + 8, (family, name, len(found))


def test_mask_is_idempotent_and_skips_missing_gradients():
    a = torch.nn.Parameter(torch.ones(4, 2))
    b = torch.nn.Parameter(torch.ones(4))  # no gradient: skipped
    a.grad = torch.ones(4, 2)
    mask = GradientMask([a, b], [to_mask((4, 2), (((0, 0, 2),),), "cpu"), to_mask((4,), (((0, 1, 2),),), "cpu")])
    mask.apply()
    assert a.grad[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    a.grad.fill_(5.0)  # a new gradient (e.g. after a skipped step): every call masks it
    mask.apply()
    mask.apply()
    assert a.grad[:, 0].tolist() == [5.0, 5.0, 0.0, 0.0]
    assert b.grad is None

def test_each_masked_tensor_is_found_frozen_once_and_shared_without_a_dense_mask(monkeypatch):
    """The gradient mask and the restore of every attached optimizer, ``mask_gradients`` and the ZeRO
    gradient hook share where each tensor is frozen, found once from its boxes; no dense mask is built
    for block-shaped regions (a stacked expert tensor's would cost one byte per element)."""
    from hft_plugin import apply_selection, boxes, select_half
    from hft_plugin.mechanisms import mask as mask_mechanism
    from hft_plugin.testing import tiny_model

    built, found = [], []
    dense, from_boxes = boxes.to_mask, mask_mechanism.frozen_slices
    for module in (boxes, mask_mechanism):
        monkeypatch.setattr(module, "to_mask", lambda shape, *a, **k: built.append(tuple(shape)) or dense(shape, *a, **k))
    monkeypatch.setattr(mask_mechanism, "frozen_slices", lambda shape, b: found.append(tuple(shape)) or from_boxes(shape, b))
    model = tiny_model("mixtral")
    handle = apply_selection(model, select_half(model, round=0), partial="mask")
    masked = list(handle.masked_parameters)
    assert masked and not found  # nothing is found before anything needs it
    decayed = torch.optim.AdamW(handle.parameters(), lr=1e-3, weight_decay=0.1)  # a gradient mask and a restore
    handle.attach(decayed)
    handle.attach(torch.optim.AdamW(handle.parameters(), lr=1e-3))  # a second optimizer: one more gradient mask
    handle.attach(decayed)  # attached again: its hooks replaced
    handle.mask_gradients()
    hooks = [handle.gradient_hook(name) for name in masked]
    assert sorted(found) == sorted(tuple(handle.masked_parameters[n].shape) for n in masked)  # once per tensor
    assert not built  # and never through a dense mask
    shared = {name: handle._frozen_blocks(name) for name in masked}
    assert all(hook.__self__ is shared[name] for hook, name in zip(hooks, masked))
    assert all(f is shared[n] for n, f in zip(masked, handle.mask._regions.frozen))
    assert all(f is shared[n] for n, f in zip(masked, handle._all_mask._regions.frozen))
    handle.remove()
    assert not handle._frozen  # released with the handle


def test_the_gradient_hook_zeroes_frozen_elements_out_of_place():
    """For gradients that never reach ``.grad`` (ZeRO): the hook returns a new gradient, zero on
    the frozen elements (blocks or, for a scattered region, the dense mask) and untouched elsewhere."""
    from hft_plugin import apply_selection, select_half
    from hft_plugin.testing import tiny_model

    gen = torch.Generator().manual_seed(0)
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model, round=0), partial="mask")
    cases = [(handle.gradient_hook(n), handle.trainable_mask(n)) for n in handle.masked_parameters]
    scattered = torch.rand(40, 40, generator=gen) > 0.5
    cases.append((Frozen(scattered).zeroed, scattered))
    for hook, trainable in cases:
        grad = torch.randn(trainable.shape, generator=gen)
        given = grad.clone()
        masked = hook(grad)
        assert torch.equal(grad, given)  # autograd's gradient is left as it was
        assert torch.equal(masked, grad * trainable)
    with pytest.raises(KeyError):
        handle.gradient_hook("model.embed_tokens.weight")
    handle.remove()
