"""Region parameters: what the optimizer owns of a partly trained tensor, and how they follow the
model (checkpoints, conversions, copies, removal, checkpointing, compile, the experts' implementations)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hft_plugin import HFTError, apply_selection, select_half
from hft_plugin.testing import tiny_model

from .helpers import assert_frozen_and_trained, snapshot

MECHANISMS = {"phi3": "rows", "gpt2": "rows", "gpt_neox": "rows", "mixtral": "experts", "qwen3_moe": "experts"}


def ids(seed=0, shape=(4, 16)):
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(seed))


def steps(model, optimizer, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        batch = torch.randint(3, 96, (4, 16), generator=gen)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trains_exactly(model, handle, optimizer, run=None) -> None:
    """Attach ``optimizer``, take two steps through ``run`` (default the model), check the frozen
    elements bit for bit and that every trainable tensor moved, and remove the handle."""
    handle.attach(optimizer)
    before = snapshot(model)
    steps(model if run is None else run, optimizer, 2)
    assert_frozen_and_trained(handle.selection, before, snapshot(model))
    handle.remove()


@pytest.mark.parametrize("family", sorted(MECHANISMS))
def test_mechanism_per_family_and_the_optimizer_owns_the_trainable_share(family):
    model = tiny_model(family)
    selection = select_half(model, round=0)
    handle = apply_selection(model, selection)
    assert set(handle.mechanisms().values()) == {MECHANISMS[family]}
    assert MECHANISMS[family] in handle.mechanism_summary()
    count = len(handle.mechanisms())  # a count of tensors, named as such (not "8 experts")
    assert handle.mechanism_summary().startswith(f"{count} tensors train in part: {count} through the "
                                                 f"{MECHANISMS[family]} mechanism")
    owned = sum(p.numel() for p in handle.parameters())
    assert owned == selection.stats()["trainable_params"]  # exactly the trainable elements
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    handle.attach(optimizer)
    steps(model, optimizer, 1)
    state = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k == "exp_avg")
    assert state == selection.stats()["trainable_params"]
    handle.remove()


@pytest.mark.parametrize("family", sorted(MECHANISMS))
def test_outputs_unchanged_and_frozen_weight_gradients_never_formed(family):
    """Outputs bit-identical to the model without HFT; the partly trained tensor's gradient is the
    full gradient on its trainable boxes and exactly zero elsewhere (never computed); each region's
    gradient is the view of its box."""
    model = tiny_model(family).eval()
    reference = copy.deepcopy(model)
    batch = ids()
    reference(input_ids=batch, labels=batch).loss.backward()
    full = {n: p.grad for n, p in reference.named_parameters()}
    handle = apply_selection(model, select_half(model, round=0))
    out = model(input_ids=batch, labels=batch)
    assert torch.equal(out.logits, reference(input_ids=batch).logits)
    out.loss.backward()
    names = dict(model.named_parameters())
    checked = 0
    for tensor in handle.regions:
        grad = names[tensor].grad
        trainable = torch.zeros_like(grad, dtype=torch.bool)
        for index, region in handle.region_parameters(tensor):
            trainable[index] = True
            torch.testing.assert_close(region.grad, full[tensor][index], atol=1e-6, rtol=1e-5)
            assert region.grad.data_ptr() == grad[index].data_ptr()  # a view: what DDP reduces, the optimizer steps
            checked += 1
        assert not grad[~trainable].any()
    assert checked > 0
    handle.remove()


def test_checkpoints_are_those_of_the_model_without_hft(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("phi3")
    keys = list(model.state_dict())
    handle = apply_selection(model, select_half(model))
    assert list(model.state_dict()) == keys
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    steps(model, optimizer, 2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # Loading writes into the partly trained tensors in place: the regions see the loaded values.
    fresh = tiny_model("phi3", seed=1)
    result = model.load_state_dict(fresh.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for tensor in handle.regions:
        for index, region in handle.region_parameters(tensor):
            assert torch.equal(region, fresh.state_dict()[tensor][index])
    handle.remove()


@pytest.mark.parametrize("convert", ["to_float64", "half_then_float", "upcast_trainable"])
def test_regions_follow_conversions_after_the_optimizer_is_attached(convert):
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    optimizer = torch.optim.SGD(handle.parameters(), lr=1e-1, momentum=0.9)
    handle.attach(optimizer)
    if convert == "to_float64":
        model.to(torch.float64)
    elif convert == "half_then_float":
        model.half().float()
    else:  # what a framework does to make trainable weights fp32 in a bf16 model
        model.to(torch.bfloat16)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    before = snapshot(model)
    # mixed dtypes (fp32 trainable, bf16 frozen) run under autocast, as frameworks that upcast do
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=convert == "upcast_trainable")
    with autocast:
        steps(model, optimizer, 2)
    after = snapshot(model)
    if convert == "upcast_trainable":  # a partly trained tensor requires grad: upcast with the trainable ones
        assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    plan = selection.plan()
    assert all(torch.equal(before[n], after[n]) for n in plan.frozen)
    assert_frozen_and_trained(selection, before, after)
    for tensor in handle.regions:
        for index, region in handle.region_parameters(tensor):
            assert region.data_ptr() == model.get_parameter(tensor).data[index].data_ptr()
    handle.remove()


def test_a_deep_copy_runs_and_the_original_keeps_training():
    model = tiny_model("mixtral").eval()
    handle = apply_selection(model, select_half(model))
    clone = copy.deepcopy(model)
    batch = ids()
    assert torch.equal(clone(input_ids=batch).logits, model(input_ids=batch).logits)
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2))


@pytest.mark.parametrize("family", ["phi3", "gpt2", "mixtral"])
def test_remove_puts_the_model_back(family):
    model = tiny_model(family)
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    implementation = getattr(model.config, "_experts_implementation", None)
    handle = apply_selection(model, select_half(model))
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    handle.attach(optimizer)
    steps(model, optimizer, 1)
    trained = snapshot(model)
    handle.remove()
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert getattr(model.config, "_experts_implementation", None) == implementation
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())  # the regions' values stay
    # A stale optimizer steps nothing of them: its regions are gone and have no gradient.
    batch = ids()
    model(input_ids=batch, labels=batch).loss.backward()
    stale = [p for g in optimizer.param_groups for p in g["params"] if not any(p is q for q in model.parameters())]
    assert stale and all(p.grad is None for p in stale)


def test_same_selection_twice_gives_the_same_handle_and_another_round_a_new_one():
    model = tiny_model("phi3")
    first = apply_selection(model, select_half(model, round=0))
    assert apply_selection(model, select_half(model, round=0)) is first
    second = apply_selection(model, select_half(model, round=1))
    assert first.removed and second is not first
    assert select_half(model, round=1).fingerprint == second.selection.fingerprint  # regions are not structure
    second.remove()


def test_on_remove_runs_before_the_flags_change():
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model))
    seen = []
    handle.on_remove(lambda: seen.append(sum(p.requires_grad for p in model.parameters())))
    trainable_then = sum(p.requires_grad for p in model.parameters())
    handle.remove()
    assert seen == [trainable_then]


def test_strided_regions_refuse_a_fused_optimizer():
    """GPT-2's Conv1D c_attn regions are column blocks: strided views that a fused kernel would write
    outside of. attach refuses fused=True for them; foreach is exact."""
    model = tiny_model("gpt2")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    strided = [n for n, p in handle.named_parameters() if not p.is_contiguous()]
    assert strided and all("c_attn.weight_hft" in n for n in strided)
    with pytest.raises(HFTError, match="fused=False"):
        handle.attach(torch.optim.AdamW(handle.parameters(), lr=1e-2, fused=True))
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2, foreach=True, weight_decay=0.1))


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(family, reentrant):
    model = tiny_model(family)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    selection = select_half(model)
    handle = apply_selection(model, selection)
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1))


def test_torch_compile_with_rows():
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    compiled = torch.compile(model, backend="aot_eager")
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1), run=compiled)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_experts_wrap_the_configured_implementation(implementation):
    model = tiny_model("mixtral").eval()
    model.set_experts_implementation(implementation)
    batch = ids()
    expected = model(input_ids=batch).logits
    selection = select_half(model)
    handle = apply_selection(model, selection)
    assert model.config._experts_implementation == implementation  # the user's configuration is left alone
    torch.testing.assert_close(model(input_ids=batch).logits, expected, atol=1e-5, rtol=1e-5)
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2))
    assert model.config._experts_implementation == implementation


def test_an_expert_without_tokens_gets_a_zero_gradient():
    model = tiny_model("mixtral")
    handle = apply_selection(model, select_half(model))
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(5, model.config.hidden_size)
    top_k_index = torch.zeros(5, 2, dtype=torch.long)
    top_k_index[:, 1] = 1  # experts 0 and 1 only
    out = experts(hidden, top_k_index, torch.full((5, 2), 0.5))
    out.sum().backward()
    checked, unrouted, routed_with_gradient = 0, 0, 0
    for tensor in handle.regions:
        if not tensor.startswith("model.layers.0.mlp.experts."):
            continue
        for index, region in handle.region_parameters(tensor):
            checked += 1
            assert region.grad is not None
            if index[0] not in (0, 1):
                assert not region.grad.any()
                unrouted += 1
            elif region.grad.any():
                routed_with_gradient += 1
    assert checked > 0 and unrouted > 0  # the loop saw regions, some of experts that got no tokens
    assert routed_with_gradient > 0  # an expert that got tokens has a non-zero gradient
    handle.remove()


def test_an_implementation_hft_cannot_reproduce_keeps_the_mask():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

    ALL_EXPERTS_FUNCTIONS.register("custom_for_test", grouped_mm_experts_forward)
    model = tiny_model("mixtral")
    model.set_experts_implementation("custom_for_test")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    assert set(handle.mechanisms().values()) == {"mask"}
    assert "custom_for_test" in handle.mechanism_summary()
    trains_exactly(model, handle, torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1))
    assert model.config._experts_implementation == "custom_for_test"


def test_partial_mask_everywhere():
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model), partial="mask")
    assert set(handle.mechanisms().values()) == {"mask"} and not handle.regions
    assert set(handle.masked_parameters) == set(handle.mechanisms())
    handle.remove()


def test_cast_trainable_keeps_regions_shared():
    model = tiny_model("phi3").to(torch.bfloat16)
    selection = select_half(model)
    handle = apply_selection(model, selection)
    handle.cast_trainable_(torch.float32)
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    frozen = dict(model.named_parameters())[selection.plan().frozen[0]]
    assert frozen.dtype == torch.bfloat16
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float32
    regions = handle.region_parameters("model.layers.0.self_attn.qkv_proj.weight")
    assert all(r.data_ptr() == qkv.weight.data[index].data_ptr() for index, r in regions)
    handle.remove()


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
def test_optimizer_checkpoints_resume_exactly(family):
    """The optimizer's state_dict holds the regions in model order: saved after 2 steps and loaded
    into a fresh model with the same selection, 2 more steps end where 4 uninterrupted steps end."""
    def run(model, steps_before, state=None):
        handle = apply_selection(model, select_half(model, round=1))
        optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
        handle.attach(optimizer)
        if state is not None:
            optimizer.load_state_dict(state)
        return handle, optimizer

    straight = tiny_model(family).eval()
    handle, optimizer = run(straight, 0)
    steps(straight, optimizer, 2, seed=0)
    saved_model = copy.deepcopy(snapshot(straight))
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    steps(straight, optimizer, 2, seed=1)
    expected = snapshot(straight)
    handle.remove()

    resumed = tiny_model(family).eval()
    assert not resumed.load_state_dict(saved_model, strict=False).unexpected_keys
    handle, optimizer = run(resumed, 2, saved_optimizer)
    steps(resumed, optimizer, 2, seed=1)
    got = snapshot(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    handle.remove()


def test_tensors_outside_the_model_are_not_the_handles_business():
    """An optimizer may also own tensors that are not the model's (a value head): attach accepts it."""
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    optimizer = torch.optim.AdamW([*handle.parameters(), *head.parameters()], lr=1e-2)
    handle.attach(optimizer)
    batch = ids()
    out = model(input_ids=batch, labels=batch, output_hidden_states=True)
    (out.loss + head(out.hidden_states[-1]).sum()).backward()
    before = head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, head.weight)
    handle.remove()


def test_a_tensor_unfrozen_by_hand_may_be_owned_with_a_warning(caplog):
    """requires_grad=True set by hand after HFT froze a tensor is the user's choice: an optimizer may
    own it (attach warns, naming it); frozen tensors still may not be owned."""
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    name = selection.plan().frozen[0]
    model.get_parameter(name).requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        handle.attach(torch.optim.AdamW([*handle.parameters(), model.get_parameter(name)], lr=1e-2))
    assert "by hand" in caplog.text and name in caplog.text
    other = selection.plan().frozen[1]
    with pytest.raises(HFTError, match="do not train in this round"):
        handle.attach(torch.optim.AdamW([*handle.parameters(), model.get_parameter(other)], lr=1e-2))
    handle.remove()


def test_an_optimizer_over_the_models_trainable_tensors_gets_the_regions_on_attach():
    """[p for p in model.parameters() if p.requires_grad] owns each partly trained tensor whole; attach
    puts its regions in its place (same group) while the optimizer holds no state, so the common idiom
    trains exactly; once it holds state for a whole tensor, attach refuses."""
    model = tiny_model("phi3")
    handle = apply_selection(model, select_half(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} != {id(p) for p in handle.parameters()}
    handle.attach(optimizer)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in handle.parameters()}
    handle.remove()

    handle = apply_selection(model, select_half(model))
    stale = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids()
    model(input_ids=batch, labels=batch).loss.backward()
    stale.step()  # state for the fused tensors, whole: their frozen elements may have moved already
    with pytest.raises(HFTError, match="do not train in this round"):
        handle.attach(stale)
    handle.remove()


def test_expert_forward_runs_on_transformers_without_post_expert_norm():
    # transformers before 5.20 builds experts modules without `has_post_expert_norm` (the LLaMA-Factory,
    # Axolotl and ms-swift cells pin 5.6 to 5.19): HFT's expert forward must not require it.
    from hft_plugin import apply_selection, select_half
    from hft_plugin.testing import tiny_model

    model = tiny_model("mixtral")
    for module in model.modules():
        if "has_post_expert_norm" in vars(module):
            del module.has_post_expert_norm
    handle = apply_selection(model, select_half(model, round=0))
    try:
        ids = torch.randint(3, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        handle.remove()
