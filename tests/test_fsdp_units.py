"""The pieces of FSDP2 support that run in one process: the shard index math against torch's
own, the typed refusals, the FSDP1 checks, and a handle that follows replaced parameters."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from hft_plugin import IntegrationError, apply_selection, select_half
from hft_plugin.adapters.fsdp import check_fsdp
from hft_plugin.shards import UnsupportedPlacement, local_index, local_part
from hft_plugin.testing import tiny_model

from .helpers import assert_frozen_and_trained, snapshot

Replicate = pytest.importorskip("torch.distributed.tensor").Replicate
Shard = pytest.importorskip("torch.distributed.tensor").Shard


def _torch_local_index(shape, placements, mesh_shape, coordinate):
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
    return tuple(slice(o, o + n) if n else None for o, n in zip(offset, local_shape))


@pytest.mark.parametrize("shape,placements,mesh_shape", [
    ((128, 64), [Shard(0)], (2,)),
    ((5, 4), [Shard(0)], (2,)),          # uneven: 3 + 2
    ((1, 4), [Shard(0)], (2,)),          # fewer rows than ranks: the last shard is empty
    ((7, 6), [Shard(0)], (4,)),          # 2 + 2 + 2 + 1
    ((128, 64), [Shard(1)], (2,)),       # a custom shard_placement_fn
    ((10, 6), [Replicate(), Shard(0)], (2, 3)),   # HSDP: replicate across, shard within
    ((10, 6), [Shard(0), Shard(0)], (2, 2)),      # one dimension sharded twice
    ((9, 6), [Shard(0), Shard(1)], (3, 2)),
])
def test_local_index_matches_torch(shape, placements, mesh_shape):
    pytest.importorskip("torch.distributed.tensor._utils")
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        ours = local_index(shape, placements, mesh_shape, coordinate)
        theirs = _torch_local_index(shape, placements, mesh_shape, coordinate)
        for s, t in zip(ours, theirs):
            if t is None:  # torch gives an empty shard no meaningful offset
                assert s.stop == s.start
            else:
                assert (s.start, s.stop) == (t.start, t.stop), (coordinate, ours, theirs)


def test_unsupported_placements_are_named():
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.placement_types import _StridedShard

    for placement in (Partial(), _StridedShard(0, split_factor=2)):
        with pytest.raises(UnsupportedPlacement):
            local_index((8, 4), [placement], (2,), (0,))


def test_flattened_storage_is_refused_with_the_tensor_named():
    assert local_part("w", torch.zeros(8, 4), (8, 4)) is None  # not sharded: the tensor holds the whole
    with pytest.raises(IntegrationError, match=r"qkv_proj.weight.*FSDP2"):
        local_part("layers.0.qkv_proj.weight", torch.zeros(16), (8, 4))  # an FSDP1 flat shard


def test_fsdp1_checks():
    phi3 = tiny_model("phi3")  # kept: a handle holds its model weakly
    handle = apply_selection(phi3, select_half(phi3))
    try:
        check_fsdp(None, handle)  # no FSDP
        check_fsdp(SimpleNamespace(fsdp_version=2, use_orig_params=False), handle)  # FSDP2 has no flat params
        with pytest.raises(IntegrationError, match=r"FSDP2.*use_orig_params.*True"):
            check_fsdp(SimpleNamespace(fsdp_version=1, use_orig_params=False), handle)
        with pytest.raises(IntegrationError, match=r"qkv_proj.*FSDP2"):
            check_fsdp(SimpleNamespace(fsdp_version=1, use_orig_params=True), handle)
    finally:
        handle.remove()
    llama = tiny_model("llama")
    handle = apply_selection(llama, select_half(llama))
    check_fsdp(SimpleNamespace(fsdp_version=1, use_orig_params=True), handle)  # whole tensors: fine
    handle.remove()


def _replace_parameters(model):
    """What fully_shard does to the parameter objects (new ones, same values and flags), without the sharding."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def test_handle_follows_replaced_parameters():
    model = tiny_model("phi3")
    before = snapshot(model)
    handle = apply_selection(model, selection := select_half(model))
    _replace_parameters(model)
    owned = {id(p) for p in handle.parameters()}
    assert all(id(p) in owned for n, p in model.named_parameters() if p.requires_grad and n not in handle.regions)
    for name in handle.regions:  # the regions view the new tensors
        for index, region in handle.region_parameters(name):
            assert id(region) in owned and region.data_ptr() == model.get_parameter(name).data[index].data_ptr()
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(optimizer)
    for _ in range(2):
        ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_frozen_and_trained(selection, before, snapshot(model))
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_parameters_replaced_after_attach_drop_the_stale_hooks(caplog):
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model))
    handle.attach(torch.optim.AdamW(handle.parameters(), lr=1e-2))
    _replace_parameters(model)
    with caplog.at_level("WARNING", logger="hft_plugin"):
        assert handle.refresh_parameters()
    assert handle.mask is None and "attach it again" in caplog.text
    assert not handle.refresh_parameters()  # nothing changed since
    handle.remove()


def test_wrapper_names_are_followed():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_model("llama")
    handle = apply_selection(model, select_half(model))
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])  # as accelerate's FSDP2 activation checkpointing
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    assert {id(p) for p in handle.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    handle.remove()
