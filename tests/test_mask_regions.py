"""The block form of the gradient mask: the frozen boxes cover exactly the frozen elements, and
masking and restoring through them are bit-identical to the dense definition."""

from __future__ import annotations

import random

import pytest
import torch

from hft_plugin.masking import FrozenRestore, GradientMask, frozen_boxes, region_mask


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
def test_frozen_boxes_cover_exactly_the_frozen_elements(seed):
    rng = random.Random(seed)
    for _ in range(100):
        shape, boxes = _random_region(rng)
        trainable = region_mask(shape, boxes, "cpu")
        cover = torch.zeros(shape, dtype=torch.int32)
        for box in frozen_boxes(trainable):
            cover[box] += 1
        assert torch.equal(cover, (~trainable).to(torch.int32)), (shape, boxes)  # each frozen element once


@pytest.mark.parametrize("seed", range(4))
def test_mask_and_restore_match_the_dense_definition(seed):
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        shape, boxes = _random_region(rng)
        trainable = region_mask(shape, boxes, "cpu")
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
    assert frozen_boxes(trainable) is None
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
            found = frozen_boxes(region_mask(shapes[name], boxes, "cpu"))
            assert found is not None and len(found) <= max(len(boxes), 1) * 2 + 8, (family, name, len(found))


def test_mask_is_idempotent_and_skips_missing_gradients():
    a = torch.nn.Parameter(torch.ones(4, 2))
    b = torch.nn.Parameter(torch.ones(4))  # no gradient: skipped
    a.grad = torch.ones(4, 2)
    mask = GradientMask([a, b], [region_mask((4, 2), (((0, 0, 2),),), "cpu"), region_mask((4,), (((0, 1, 2),),), "cpu")])
    mask.apply()
    assert a.grad[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    a.grad.fill_(5.0)  # a new gradient (e.g. after a skipped step): every call masks it
    mask.apply()
    mask.apply()
    assert a.grad[:, 0].tolist() == [5.0, 5.0, 0.0, 0.0]
    assert b.grad is None

def test_each_masked_tensor_has_its_mask_built_once_and_shared(monkeypatch):
    """The gradient mask and the restore of every attached optimizer, ``mask_gradients`` and the
    masks handed out by ``trainable_mask`` (a ZeRO gradient hook's) share one mask per tensor, and
    its frozen blocks are found once: a stacked expert tensor's mask is hundreds of megabytes."""
    from hft_plugin import apply_selection, boxes, select_half
    from hft_plugin.mechanisms import mask as mask_mechanism
    from hft_plugin.testing import tiny_model

    built, found = [], []
    to_mask, frozen_slices = boxes.to_mask, mask_mechanism.frozen_slices
    monkeypatch.setattr(boxes, "to_mask", lambda shape, *a, **k: built.append(tuple(shape)) or to_mask(shape, *a, **k))
    monkeypatch.setattr(mask_mechanism, "frozen_slices", lambda m: found.append(tuple(m.shape)) or frozen_slices(m))
    model = tiny_model("mixtral")
    selection = select_half(model, round=0)
    handle = apply_selection(model, selection, partial="mask")
    masked = list(handle.masked_parameters)
    regions = {(tuple(p.shape), selection.plan().partial[n]) for n, p in handle.masked_parameters.items()}
    assert masked and not built  # nothing built before anything needs a mask
    decayed = torch.optim.AdamW(handle.parameters(), lr=1e-3, weight_decay=0.1)  # a gradient mask and a restore
    handle.attach(decayed)
    handle.attach(torch.optim.AdamW(handle.parameters(), lr=1e-3))  # a second optimizer: one more gradient mask
    handle.attach(decayed)  # attached again: its hooks replaced
    handle.mask_gradients()
    shared = [handle.trainable_mask(name) for name in masked]
    assert all(a is handle.trainable_mask(n) for a, n in zip(shared, masked))
    assert len(built) == len(regions) <= len(masked)  # one mask per tensor (tensors with the same region share it)
    assert len(found) == len(masked)  # its frozen blocks found once
    handle.remove()
    assert not handle._masks._masks  # released with the handle


def test_the_gradient_hook_zeroes_frozen_elements_out_of_place():
    """For gradients that never reach ``.grad`` (ZeRO): the hook returns a new gradient, zero on
    the frozen elements (blocks or, for a scattered region, the dense mask) and untouched elsewhere."""
    from hft_plugin import apply_selection, select_half
    from hft_plugin.mechanisms.mask import Frozen
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
