"""hft_plugin.sharing on models and a hand-written loop (the trainers are in test_sharing_trainers.py):
a reference model shares exactly the policy's wholly frozen tensors that it holds bit for bit, its
outputs stay bit-identical, the policy trains to the same bits with and without sharing, every case
that must not share says why, bad input is refused, and the reference gets its copy back before a
shared tensor could move."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hft_plugin import ConfigError, apply_selection, select_half
from hft_plugin import sharing
from hft_plugin.bootstrap import env
from hft_plugin.sharing import ReferenceModelError, same_bits, share_reference, shared_reference
from hft_plugin.testing import assert_frozen_and_trained, snapshot, tiny_model

from .helpers import logits, storage

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def setup(family="llama", round=0, ref_seed=0, **ref_overrides):
    policy = tiny_model(family)
    reference = tiny_model(family, seed=ref_seed, **ref_overrides).eval()
    handle = apply_selection(policy, select_half(policy, round=round))
    return policy, reference, handle


def test_shares_every_wholly_frozen_tensor_and_nothing_else():
    policy, reference, handle = setup()
    plan = handle.selection.plan()
    ref_params = dict(reference.named_parameters())
    ids = {n: id(p) for n, p in ref_params.items()}
    flags = {n: p.requires_grad for n, p in ref_params.items()}
    before = logits(reference)

    shared = share_reference(handle, reference)

    report = shared.report
    assert sorted(shared.shared_names) == sorted(plan.frozen) and report.shared_tensors == len(plan.frozen) > 0
    policy_params = dict(policy.named_parameters())
    for name, param in reference.named_parameters():
        assert (storage(param) == storage(policy_params[name])) == (name in plan.frozen)
    assert report.shared_bytes == sum(policy_params[n].numel() * 4 for n in plan.frozen)
    assert report.reference_bytes == sum(p.numel() * 4 for p in reference.parameters())
    assert report.not_shared == {sharing.TRAINS: list(plan.trainable)}
    # the reference keeps its parameter objects, names, flags and eval mode; its outputs are the same bits
    assert {n: id(p) for n, p in reference.named_parameters()} == ids
    assert {n: p.requires_grad for n, p in reference.named_parameters()} == flags
    assert not reference.training
    assert same_bits(logits(reference), before)
    assert shared_reference(reference) is shared
    assert "share the policy's frozen half" in report.summary() and "train in this round" in report.summary()


def test_fused_tensors_trained_in_part_are_never_shared_whatever_their_flag():
    policy, reference, handle = setup("phi3")
    plan = handle.selection.plan()
    assert plan.partial
    # A partly trained tensor may be updated through views an optimizer owns while its own flag is off.
    for name in plan.partial:
        policy.get_parameter(name).requires_grad_(False)
    shared = share_reference(handle, reference)
    assert sorted(shared.report.not_shared[sharing.TRAINS_IN_PART]) == sorted(plan.partial)
    assert not set(shared.shared_names) & set(plan.partial)
    assert shared.shared_names  # the wholly frozen ones are shared


def dpo_like_run(family: str, share: bool, steps: int = 3):
    """A hand-written preference-style loop: the reference's log-probabilities enter the loss, the
    policy trains its half with AdamW and weight decay. Returns the policy's weights and the
    reference's logits before and after."""
    policy, reference, handle = setup(family)
    if share:
        assert share_reference(handle, reference).report.shared_tensors > 0
    before = snapshot(policy)
    ref_before = logits(reference)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(optimizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 96, (4, 16), generator=gen)
        with torch.no_grad():
            ref_logp = torch.log_softmax(reference(input_ids=ids).logits, -1)
        logp = torch.log_softmax(policy(input_ids=ids).logits, -1)
        loss = -torch.nn.functional.logsigmoid((logp - ref_logp).gather(-1, ids[..., None]).mean() + 0.1)
        loss = loss + policy(input_ids=ids, labels=ids).loss
        loss.backward()
        handle.mask_gradients()
        torch.nn.utils.clip_grad_norm_(handle.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, snapshot(policy), ref_before, logits(reference), handle


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_training_leaves_the_reference_alone_and_the_policy_as_without_sharing(family):
    shared_start, shared_weights, ref_before, ref_after, handle = dpo_like_run(family, share=True)
    plain_start, plain_weights, plain_ref_before, plain_ref_after, plain_handle = dpo_like_run(family, share=False)
    assert same_bits(ref_after, ref_before)  # reference logits bit-identical after training
    assert same_bits(ref_before, plain_ref_before) and same_bits(ref_after, plain_ref_after)
    assert shared_weights.keys() == plain_weights.keys()
    for name in shared_weights:  # the policy ends on the same bits with and without sharing
        assert same_bits(shared_weights[name], plain_weights[name]), name
    # every frozen element bit-identical, every trainable tensor and region moved, in both runs
    assert_frozen_and_trained(handle.selection, shared_start, shared_weights)
    assert_frozen_and_trained(plain_handle.selection, plain_start, plain_weights)


# -- what is not shared, and why ---------------------------------------------------------------------
def test_a_reference_from_another_checkpoint_shares_nothing():
    policy, reference, handle = setup(ref_seed=1)
    frozen = handle.selection.plan().frozen
    equal = {n for n in frozen if torch.equal(policy.get_parameter(n), reference.get_parameter(n))}
    assert equal == {n for n in frozen if n.endswith("norm.weight")}  # initialised to ones in both
    shared = share_reference(handle, reference)
    assert set(shared.report.not_shared[sharing.VALUES]) == set(frozen) - equal
    assert set(shared.shared_names) == equal  # bit-identical, so sharing them is exact


def test_a_reference_in_another_dtype_shares_nothing():
    policy, _, handle = setup()
    reference = tiny_model("llama").to(torch.bfloat16).eval()
    shared = share_reference(handle, reference)
    assert shared.report.shared_tensors == 0
    assert sorted(shared.report.not_shared[sharing.DTYPE]) == sorted(handle.selection.plan().frozen)


def test_a_reference_of_another_shape_shares_nothing():
    _, reference, handle = setup(intermediate_size=96)
    shared = share_reference(handle, reference)
    frozen_mlp = [n for n in handle.selection.plan().frozen if ".mlp." in n]
    assert frozen_mlp and set(frozen_mlp) <= set(shared.report.not_shared[sharing.SHAPE])
    assert not set(frozen_mlp) & set(shared.shared_names)


def test_one_bit_of_difference_is_not_shared():
    policy, reference, handle = setup()
    name = handle.selection.plan().frozen[0]
    with torch.no_grad():
        value = reference.get_parameter(name).view(-1)
        value[0] = torch.nextafter(value[0], torch.tensor(float("inf")))
    shared = share_reference(handle, reference)
    assert shared.report.not_shared[sharing.VALUES] == [name]
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # bits, not ==
    assert same_bits(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


def test_a_later_round_shares_only_what_has_not_moved_away_from_the_reference():
    policy, reference, handle = setup()
    start = snapshot(policy)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    loss = policy(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, start[n])}
    handle = apply_selection(policy, select_half(policy, round=1))  # the next round, same model object
    frozen = set(handle.selection.plan().frozen)
    shared = share_reference(handle, reference)
    assert moved & frozen and frozen - moved
    assert set(shared.report.not_shared[sharing.VALUES]) == moved & frozen
    assert set(shared.shared_names) == frozen - moved


def test_a_flag_changed_by_hand_before_sharing_is_not_shared():
    policy, reference, handle = setup()
    name = handle.selection.plan().frozen[0]
    policy.get_parameter(name).requires_grad_(True)
    shared = share_reference(handle, reference)
    assert shared.report.not_shared[sharing.REQUIRES_GRAD] == [name] and name not in shared.shared_names


def test_a_frozen_tensor_aliasing_a_trained_one_is_not_shared():
    policy, reference, handle = setup()
    plan = handle.selection.plan()
    params = dict(policy.named_parameters())
    frozen, trained = next((f, t) for f in plan.frozen for t in plan.trainable
                           if params[f].shape == params[t].shape and f.split(".")[-2] == t.split(".")[-2])
    params[frozen].data = params[t := trained].data  # e.g. weights tied by hand
    with torch.no_grad():
        reference.get_parameter(frozen).copy_(params[t])
    shared = share_reference(handle, reference)
    assert shared.report.not_shared[sharing.ALIASED] == [frozen]


def test_zero3_partitioned_tensors_are_not_shared():
    """Stub: the ``ds_id`` marker DeepSpeed ZeRO-3 puts on partitioned parameters (a real ZeRO-3 run
    is in test_sharing_distributed.py)."""
    _, reference, handle = setup()
    reference.get_parameter("model.norm.weight").ds_id = 0
    shared = share_reference(handle, reference)
    assert shared.report.reason == sharing.ZERO3 and shared.report.shared_tensors == 0
    assert "nothing shared: DeepSpeed ZeRO-3" in shared.report.summary()


def test_a_reference_deepspeed_prepared_as_its_own_engine_is_not_shared():
    """Stub: a module class named DeepSpeedEngine holding the reference as ``.module``, as
    ``deepspeed.initialize`` returns it (a real engine is in test_sharing_distributed.py)."""

    class DeepSpeedEngine(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    _, reference, handle = setup()
    shared = share_reference(handle, DeepSpeedEngine(reference))
    assert shared.report.reason == sharing.DEEPSPEED_ENGINE and shared.report.reference_tensors > 0


FSDP_SCRIPT = r"""
import os, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from hft_plugin import apply_selection, select_half
from hft_plugin.sharing import share_reference, FSDP
from hft_plugin.testing import tiny_model
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%s" % os.environ["PORT"])
policy, reference = tiny_model("llama"), tiny_model("llama")
handle = apply_selection(policy, select_half(policy, round=0))
for layer in reference.model.layers:
    fully_shard(layer)
fully_shard(reference)
shared = share_reference(handle, reference)
assert shared.report.reason == FSDP and not shared.active, shared.report.summary()
print("OK", shared.report.summary())
dist.destroy_process_group()
"""


def test_an_fsdp2_sharded_reference_is_not_shared():
    from tests.test_distributed import free_port

    environ = dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, env=environ,
                            timeout=300)
    assert result.returncode == 0 and "OK reference model: nothing shared: FSDP" in result.stdout, result.stderr[-3000:]


def test_a_reason_given_by_the_caller_shares_nothing():
    _, reference, handle = setup()
    shared = share_reference(handle, reference, declined="turned off")
    assert not shared.active and shared.report.summary() == "reference model: nothing shared: turned off."


# -- bad input -----------------------------------------------------------------------------------------
def test_the_policy_itself_as_reference_is_refused():
    policy, _, handle = setup()
    with pytest.raises(ReferenceModelError, match="the policy itself"):
        share_reference(handle, policy)


def test_a_peft_wrapped_reference_is_refused_and_nothing_changes():
    peft = pytest.importorskip("peft")
    policy, reference, handle = setup()
    wrapped = peft.get_peft_model(reference, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n: storage(p) for n, p in wrapped.named_parameters()}
    with pytest.raises(ReferenceModelError, match="PEFT-wrapped"):
        share_reference(handle, wrapped)
    assert {n: storage(p) for n, p in wrapped.named_parameters()} == before


def test_a_reference_on_the_meta_device_is_refused():
    from transformers import AutoModelForCausalLM

    from hft_plugin.testing import tiny_config

    policy, _, handle = setup()  # the policy is kept: a handle refers to its model weakly
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ReferenceModelError, match="meta device"):
        share_reference(handle, reference)


def test_not_a_module_and_a_removed_handle_are_refused():
    _, reference, handle = setup()
    with pytest.raises(ReferenceModelError, match="torch.nn.Module"):
        share_reference(handle, {"weights": 1})
    handle.remove()
    with pytest.raises(ReferenceModelError, match="removed"):
        share_reference(handle, reference)


# -- the reference gets its copy back before a shared tensor could move ---------------------------------
def assert_own_copy(policy, reference, before_logits):
    policy_params = dict(policy.named_parameters())
    for name, param in reference.named_parameters():
        assert storage(param) != storage(policy_params[name]), name
    assert same_bits(logits(reference), before_logits)


def test_remove_unshares_before_any_flag_changes():
    policy, reference, handle = setup()
    before = logits(reference)
    shared = share_reference(handle, reference)
    frozen = handle.selection.plan().frozen
    seen = {}

    def probe():  # registered after the sharing: runs after it, still before the flags change
        seen["flags"] = {n: policy.get_parameter(n).requires_grad for n in frozen}
        seen["shared"] = [n for n in frozen if storage(reference.get_parameter(n)) == storage(policy.get_parameter(n))]

    handle.on_remove(probe)
    handle.remove()
    assert seen == {"flags": {n: False for n in frozen}, "shared": []}
    assert not shared.active and shared_reference(reference) is None
    assert_own_copy(policy, reference, before)


def test_a_new_round_on_the_same_model_unshares():
    policy, reference, handle = setup()
    before = logits(reference)
    shared = share_reference(handle, reference)
    apply_selection(policy, select_half(policy, round=1))
    assert not shared.active
    assert_own_copy(policy, reference, before)


def test_a_failing_callback_stops_remove_with_the_model_unchanged():
    policy, reference, handle = setup()
    shared = share_reference(handle, reference)
    calls = []

    def fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the copy")

    handle.on_remove(fails_once)
    with pytest.raises(MemoryError):
        handle.remove()
    assert not handle.removed and all(not policy.get_parameter(n).requires_grad for n in handle.selection.plan().frozen)
    handle.remove()  # retried: the rest of the callbacks run, then the flags change
    assert handle.removed and len(calls) == 2 and not shared.active


def test_check_unshares_a_flag_changed_by_hand_before_training(caplog):
    policy, reference, handle = setup()
    before = logits(reference)
    shared = share_reference(handle, reference)
    name = shared.shared_names[0]
    assert shared.check() == []
    policy.get_parameter(name).requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        assert shared.check() == [name]
    assert "got its own copy" in caplog.text and name in caplog.text
    assert name not in shared.shared_names and shared.active
    # the report follows: one tensor fewer, and why
    assert shared.report.shared_tensors == len(handle.selection.plan().frozen) - 1
    assert shared.report.not_shared["were unshared (they may train now)"] == [name]
    # now that tensor may train: it does, and the reference does not move
    optimizer = torch.optim.SGD([policy.get_parameter(name)], lr=1.0)
    policy(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert same_bits(logits(reference), before)


def test_check_after_the_policy_tensor_was_replaced_drops_the_pair_silently():
    policy, reference, handle = setup()
    shared = share_reference(handle, reference)
    name = shared.shared_names[0]
    param = policy.get_parameter(name)
    param.data = param.data.clone()  # as a cast or a move to another device does
    assert shared.check() == [] and name not in shared.shared_names


def test_before_load_unshares_the_tensors_a_checkpoint_changes(tmp_path):
    from safetensors.torch import save_file

    policy, reference, handle = setup()
    before = logits(reference)
    shared = share_reference(handle, reference)
    changed = shared.shared_names[0]
    state = {n: p.detach().clone() for n, p in policy.named_parameters()}
    state[changed] += 1.0
    save_file(state, str(tmp_path / "model.safetensors"))
    assert shared.before_load(str(tmp_path)) == [changed]
    assert changed not in shared.shared_names and len(shared.shared_names) == len(handle.selection.plan().frozen) - 1
    policy.load_state_dict(state)  # writes into the policy's tensors in place, as a resumed trainer does
    assert same_bits(logits(reference), before)


def test_before_load_of_a_checkpoint_it_cannot_read_unshares_everything(tmp_path):
    policy, reference, handle = setup()
    shared = share_reference(handle, reference)
    torch.save(policy.state_dict(), tmp_path / "pytorch_model.bin")
    assert len(shared.before_load(str(tmp_path))) == len(handle.selection.plan().frozen)
    assert not shared.active


def test_sharing_twice_with_one_handle_is_harmless_and_another_policy_takes_over():
    policy, reference, handle = setup()
    first = share_reference(handle, reference)
    assert share_reference(handle, reference) is first
    other = tiny_model("llama")
    other_handle = apply_selection(other, select_half(other, round=0))
    second = share_reference(other_handle, reference)
    assert not first.active and second.active and shared_reference(reference) is second
    assert second.shared_names
    for name in second.shared_names:
        assert storage(reference.get_parameter(name)) == storage(other.get_parameter(name))
        assert storage(reference.get_parameter(name)) != storage(policy.get_parameter(name))


# -- the switch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [(None, True), ("1", True), (" ON ", True), ("0", False), ("false", False)])
def test_hft_share_reference_values(text, expected):
    assert env.share_reference({} if text is None else {"HFT_SHARE_REFERENCE": text}) is expected


@pytest.mark.parametrize("text,message", [("maybe", "'maybe' is not a boolean"), ("", "'' is empty")])
def test_hft_share_reference_malformed_names_the_variable(text, message):
    with pytest.raises(ConfigError, match=f"HFT_SHARE_REFERENCE={message}"):
        env.share_reference({"HFT_SHARE_REFERENCE": text})


def test_share_option_takes_the_argument_then_the_setting_then_the_variable(monkeypatch):
    monkeypatch.setenv("HFT_SHARE_REFERENCE", "0")
    assert sharing.share_option(True) is True and sharing.share_option(None, setting=True) is True
    assert sharing.share_option(None) is False  # read through the core's parser, as env.share_reference reads it
    monkeypatch.setenv("HFT_SHARE_REFERENCE", "maybe")
    with pytest.raises(ConfigError, match="HFT_SHARE_REFERENCE='maybe' is not a boolean"):
        sharing.share_option(None)
    with pytest.raises(ConfigError, match="share_reference=1 is not True or False"):
        sharing.share_option(1)
