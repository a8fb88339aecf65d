"""Issue 19: wherever the model goes, a model under HFT looks like the same model with the same half
frozen by hand.

One test per row of the issue's table, plus the Trainer's resume of a Mixtral checkpoint and the
log lines, on tiny Phi-3 (fused ``qkv_proj``/``gate_up_proj``, rows of ``nn.Linear``), GPT-2
(``Conv1D`` ``c_attn``: columns), Mixtral (stacked experts) and Llama. Every Llama tensor trains or
is frozen whole, so Llama is the control that passes before the fix too, except where a copy of an
applied model goes into the next round (rows 2 and 6): there the copy's round-0 flags keep half of
round 1 frozen on Llama as well (the issue's row 2).

Only the public API is used (``select_half``, ``apply_selection``, the handle's ``parameters()``,
``attach``, ``mask_gradients`` (the README's loop), ``remove``; ``enable_hft``) and plain torch /
transformers / TRL: nothing here depends on
how the plugin represents a partly trained tensor inside the model. What the model's own tensors
are is read from ``state_dict()``.

References (tests/hand_frozen.py): ``HandFrozen`` (one leaf tensor per trainable box, as separate
matrices) where only the trained values matter, to float tolerance; ``frozen_by_hand`` (a plain
module, per-tensor flags, frozen gradient elements zeroed) where other code iterates the model
itself (EMA, counts). Frozen elements are compared bit for bit.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import re
from types import SimpleNamespace

import pytest
import torch

from hft_plugin import HFTError, apply_selection, enable_hft, select_half
from hft_plugin.testing import tiny_model

from .hand_frozen import HandFrozen, frozen_by_hand, frozen_mask
from .helpers import assert_frozen_and_trained, flags, logits, state
from .test_exact import batches, compare, train

FAMILIES = ["llama", "phi3", "gpt2", "mixtral"]  # llama: the control (no partly trained tensor)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and leaves the machine's other cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family, seed=0):
    """A 2-layer tiny model of ``family`` (hft_plugin.testing's config otherwise), in eval mode:
    no dropout, so two models with the same weights compute the same function."""
    layers = {"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2}
    return tiny_model(family, seed=seed, **layers).eval()


def adamw(params, weight_decay=0.1):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)


def applied(model, round=0):
    selection = select_half(model, round=round)
    return selection, apply_selection(model, selection)


def clipped(model, handle):
    """What the README's loop clips: ``model.parameters()``, after ``handle.mask_gradients()``."""
    def params():
        handle.mask_gradients()
        return model.parameters()
    return params


def trains_by_handle(model, handle, steps=3, seed=0):
    """The README's loop: an optimizer over ``handle.parameters()``, attached; clipping over
    ``model.parameters()``. Returns the batches, so a reference can train on the same."""
    optimizer = adamw(handle.parameters())
    handle.attach(optimizer)
    data = batches(steps, 1, seed=seed)
    train(model, clipped(model, handle), optimizer, data, 1.0)
    return data


def by_hand_after(model_like, selection, data) -> dict[str, torch.Tensor]:
    """``model_like``'s weights (a plain model) trained on ``data`` with ``selection``'s half frozen
    by hand, exactly as :func:`trains_by_handle` trains the applied model."""
    reference = HandFrozen(model_like, selection.plan())
    train(reference, reference.parameters, adamw(reference.parameters()), data, 1.0)
    return reference.weights()


def hft_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("hft_plugin") and r.levelno >= logging.WARNING]


# -- 1: cast, load a checkpoint, train ---------------------------------------------------------------


CASTS_AND_LOADS = [("to_bfloat16", "in_place"), ("to_bfloat16", "assign"),
                   ("float_from_bfloat16", "in_place"), ("float_from_bfloat16", "assign_mmap")]


@pytest.mark.parametrize("cast,load", CASTS_AND_LOADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cast_then_load_then_train(family, cast, load, tmp_path):
    """apply_selection; a cast (``to(bfloat16)``, the path of ``cuda()``/``accelerator.prepare``; or
    ``float()`` of a model built in bf16: a cast that replaces every tensor's storage); then
    ``load_state_dict(ckpt)`` to resume: in place, with ``assign=True``, or with ``assign=True`` from
    a file ``torch.load`` maps into memory; then train.

    The first forward computes with the loaded values (its logits are those of a fresh model loaded
    with ckpt, and the model's tensors are still ckpt's after it); after training, every frozen
    element is ckpt's, bit for bit, and the trained ones are where the same half frozen by hand,
    loaded with the same ckpt, ends.
    """
    dtype = torch.bfloat16 if cast == "to_bfloat16" else torch.float32

    def built(seed):  # the same casts for the reference: buffers the checkpoint lacks (RoPE) take them too
        return tiny(family, seed=seed).to(torch.bfloat16 if cast == "float_from_bfloat16" else torch.float32)

    def cast_(model):
        return model.to(torch.bfloat16) if cast == "to_bfloat16" else model.float()

    model = built(0)
    selection, handle = applied(model)
    cast_(model)
    ckpt = state(tiny(family, seed=1).to(dtype))
    if load == "assign_mmap":
        torch.save(ckpt, tmp_path / "ckpt.pt")
        given = torch.load(tmp_path / "ckpt.pt", mmap=True, weights_only=True)
    else:
        given = {name: t.clone() for name, t in ckpt.items()}  # assign=True: the model takes these tensors
    result = model.load_state_dict(given, assign=load != "in_place")
    assert not result.missing_keys and not result.unexpected_keys
    if load != "in_place":
        model.tie_weights()  # assign=True puts a Parameter per key: tied tensors (GPT-2's lm_head) are tied again
    loaded = cast_(built(2))
    loaded.load_state_dict(ckpt)
    torch.testing.assert_close(logits(model), logits(loaded),
                               msg=lambda m: f"the first forward did not use the loaded values: {m}")
    after_forward = state(model)
    stale = [name for name in ckpt if not torch.equal(after_forward[name], ckpt[name])]
    assert not stale, f"after the first forward, {len(stale)} tensors are no longer the loaded ones (e.g. {stale[0]})"
    data = trains_by_handle(model, handle, steps=2)
    compare(selection, state(model), by_hand_after(loaded, selection, data), ckpt,
            atol=1e-2 if dtype == torch.bfloat16 else 2e-5)
    handle.remove()


# -- 2: deepcopy of a trained applied model, then the next round ---------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_then_the_next_round(family, caplog):
    """``copy.deepcopy`` of a model trained in round 0, its handle still applied (what TRL's
    ``create_reference_model`` and many scripts do), then round 1 applied to the copy and trained:
    every round-1 trainable tensor trains, as the same half frozen by hand from the copy's values
    does; every round-1 frozen element is bit-identical; nothing says the user froze parameters;
    the original (and its round-0 handle) is untouched by training the copy."""
    original = tiny(family)
    selection0, handle0 = applied(original)
    optimizer0 = adamw(handle0.parameters())
    handle0.attach(optimizer0)
    train(original, clipped(original, handle0), optimizer0, batches(2, 1, seed=5), 1.0)
    original_before = state(original)

    twin = copy.deepcopy(original)
    selection1 = select_half(twin, round=1)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        handle1 = apply_selection(twin, selection1)
    before = state(twin)
    assert before.keys() == original_before.keys()
    assert all(torch.equal(before[n], original_before[n]) for n in before)
    plain = tiny(family, seed=1)
    plain.load_state_dict(before)
    data = trains_by_handle(twin, handle1)
    assert_frozen_and_trained(selection1, before, state(twin))
    compare(selection1, state(twin), by_hand_after(plain, selection1, data), before, atol=2e-5)
    froze = [m for m in hft_warnings(caplog) if "froze" in m]
    assert not froze, f"the user froze nothing, yet: {froze[0]}"

    after = state(original)
    moved = [n for n in original_before if not torch.equal(original_before[n], after[n])]
    assert not moved, f"training the copy moved the original's {moved[0]}"
    train(original, clipped(original, handle0), optimizer0, batches(1, 1, seed=6), 1.0)  # round 0 goes on, exactly
    assert_frozen_and_trained(selection0, original_before, state(original))
    handle1.remove()
    handle0.remove()


# -- 3: EMA with AveragedModel, evaluated between updates ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ema_is_that_of_the_model_frozen_by_hand(family):
    """``AveragedModel`` with ``get_ema_multi_avg_fn(0.5)`` of an applied model, updated after each
    step and evaluated between updates, averages exactly what it averages on the same model frozen by
    hand trained the same way: the averaged weights agree to 1e-6, the averaged model's outputs too."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = tiny(family)
    selection = select_half(model, round=0)
    by_hand = frozen_by_hand(model, selection.plan())
    handle = apply_selection(model, selection)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ema_by_hand = AveragedModel(by_hand, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    optimizer = adamw(handle.parameters(), weight_decay=0.0)  # by hand: a zero gradient leaves an element still
    handle.attach(optimizer)
    optimizer_by_hand = adamw([p for p in by_hand.parameters() if p.requires_grad], weight_decay=0.0)
    for step, batch in enumerate(batches(3, 1)):
        train(model, clipped(model, handle), optimizer, [batch], 1.0)
        train(by_hand, by_hand.parameters, optimizer_by_hand, [batch], 1.0)
        ema.update_parameters(model)
        ema_by_hand.update_parameters(by_hand)
        torch.testing.assert_close(logits(ema), logits(ema_by_hand), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"step {step}, the averaged model's logits: {m}")
        averaged, expected = state(ema.module), state(ema_by_hand.module)
        assert averaged.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(averaged[name], expected[name], atol=1e-6, rtol=0,
                                       msg=lambda m: f"step {step}, averaged {name}: {m}")
    handle.remove()


# -- 4: TRL's reference sync ---------------------------------------------------------------------------


def _sync_trainer(kind, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from .test_sharing_trainers import COMMON, base, dpo_trainer

    if kind == "dpo":
        return dpo_trainer(tmp_path, family, sync_ref_model=True, ref_model_sync_steps=1, max_steps=2)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hft_plugin.testing import tiny_tokenizer

    def longer_is_better(completions, **_):
        return [float(len(c)) for c in completions]

    model = AutoModelForCausalLM.from_pretrained(base(tmp_path, family))
    config = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, num_generations=4, max_completion_length=8,
                        beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, **COMMON)
    return GRPOTrainer(model=model, args=config, reward_funcs=longer_is_better, processing_class=tiny_tokenizer(),
                       train_dataset=Dataset.from_list([{"prompt": f"q{i}: "} for i in range(8)]))


SYNC_CASES = [("dpo", family) for family in FAMILIES] + [
    pytest.param("grpo", family, marks=pytest.mark.slow) for family in ("llama", "phi3", "mixtral")]


@pytest.mark.parametrize("kind,family", SYNC_CASES)
def test_reference_sync_mixes_the_policy_by_name(kind, family, tmp_path):
    """TRL's ``sync_ref_model=True`` (``ref_model_sync_steps=1``) with ``enable_hft`` on the policy:
    training runs, and after every step every reference tensor is exactly (bit for bit, the same
    ops) ``ref.mul_(1 - alpha).add_(policy, alpha=alpha)`` of the same-named tensors, computed by hand
    from the reference before the step and the policy after it. The policy's frozen half stays
    bit-identical. (TRL zips ``parameters()`` of both models: an extra or reordered tensor in the
    policy mixes wrong pairs or crashes.)"""
    from transformers import TrainerCallback

    trainer = _sync_trainer(kind, tmp_path, family)
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model

    class Record(TrainerCallback):  # added after TRL's SyncRefModelCallback: sees the reference after the sync
        def __init__(self):
            self.steps = []

        def on_train_begin(self, args, state_, control, model=None, **kwargs):
            self.start = (state(model), state(reference))

        def on_step_end(self, args, state_, control, model=None, **kwargs):
            self.steps.append((state(model), state(reference)))

    handle = enable_hft(trainer)
    record = Record()
    trainer.add_callback(record)
    trainer.train()
    assert len(record.steps) == trainer.args.max_steps
    alpha = trainer.args.ref_model_mixup_alpha
    policy_start, previous = record.start
    names = [name for name, _ in reference.named_parameters()]  # what TRL mixes (buffers are not)
    assert set(names) <= previous.keys() and set(names) <= policy_start.keys()
    for step, (policy, ref) in enumerate(record.steps, 1):
        for name in names:
            expected = previous[name].clone().mul_(1.0 - alpha).add_(policy[name], alpha=alpha)
            assert torch.equal(ref[name], expected), \
                f"step {step}: reference {name} is not the mix of the same-named tensors"
        previous = ref
    plan = handle.selection.plan()
    policy_end = record.steps[-1][0]
    synced = [n for n in plan.trainable if not torch.equal(previous[n], record.start[1][n])]
    assert synced, "the reference never moved: nothing was synced"
    if kind == "dpo":
        assert_frozen_and_trained(handle.selection, policy_start, policy_end)
    else:  # GRPO: a step may leave a trainable tensor still (rewards tie); the frozen half must not move
        for name in plan.frozen:
            assert torch.equal(policy_start[name], policy_end[name]), f"frozen {name} moved"
        for name, boxes in plan.partial.items():
            frozen = frozen_mask(policy_start[name].shape, boxes)
            assert torch.equal(policy_start[name][frozen], policy_end[name][frozen]), f"frozen part of {name} moved"


# -- 5: torch.compile(fullgraph=True) -------------------------------------------------------------------


def _lm_loss(logits_, ids):
    # the loss outside the compiled graph: GPT-2's own loss logs a warning ("loss_type=None") that
    # fullgraph refuses, with or without HFT
    return torch.nn.functional.cross_entropy(logits_[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_forward_and_backward(family):
    """``torch.compile(model, fullgraph=True)`` (backend aot_eager: forward and backward graphs, fast
    on CPU) of an applied model compiles; its loss and the gradients of every tensor in
    ``handle.parameters()`` match the uncompiled applied model's; two compiled steps keep the frozen
    half bit-identical and move the trained one. (All four families compile fullgraph without HFT
    on torch 2.13 / transformers 5.25, Mixtral's experts included, when the loss is taken outside.)"""
    torch._dynamo.reset()
    compiled_model = tiny(family)
    eager_model = tiny(family)
    selection, handle = applied(compiled_model)
    _, eager_handle = applied(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    ids = batches(1, 1)[0][0]
    loss = _lm_loss(compiled(input_ids=ids).logits, ids)
    loss.backward()
    eager_loss = _lm_loss(eager_model(input_ids=ids).logits, ids)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    params, eager_params = handle.parameters(), eager_handle.parameters()
    assert len(params) == len(eager_params)
    for i, (p, q) in enumerate(zip(params, eager_params)):
        assert p.grad is not None and q.grad is not None, f"handle.parameters()[{i}] got no gradient"
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"gradient of handle.parameters()[{i}]: {m}")
    optimizer = adamw(params)
    handle.attach(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = state(compiled_model)
    for ids in (b[0] for b in batches(2, 1, seed=1)):
        _lm_loss(compiled(input_ids=ids).logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert_frozen_and_trained(selection, before, state(compiled_model))
    handle.remove()
    eager_handle.remove()
    torch._dynamo.reset()


# -- 6: torch.save(model) and pickle -------------------------------------------------------------------


def _round_trip(model, how):
    if how == "torch_save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("how", ["torch_save", "pickle"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_pickle_an_applied_model(family, how, caplog):
    """``torch.save(model)``/``torch.load(weights_only=False)`` and ``pickle`` of an applied model
    trained a few steps work; the copy's ``state_dict`` equals the original's bit for bit and its
    parameters and flags are the original's; the copy trains as a plain model (everything unfrozen:
    as a plain model with the same values does), and a new selection applies to it cleanly (every
    trainable tensor trains, every frozen element stays, nothing says the user froze parameters)."""
    model = tiny(family)
    _, handle = applied(model)
    trains_by_handle(model, handle, steps=2)
    saved = state(model)
    names = [n for n, _ in model.named_parameters()]

    whole = _round_trip(model, how)
    assert state(whole).keys() == saved.keys()
    assert all(torch.equal(t, saved[n]) for n, t in state(whole).items())
    assert [n for n, _ in whole.named_parameters()] == names
    assert flags(whole) == flags(model)
    for param in whole.parameters():  # a plain full fine-tune of the copy
        param.requires_grad_(True)
    plain = tiny(family, seed=1)
    plain.load_state_dict(saved)
    data = batches(2, 1)
    train(whole, whole.parameters, adamw(whole.parameters()), data, 1.0)
    train(plain, plain.parameters, adamw(plain.parameters()), data, 1.0)
    got, expected = state(whole), state(plain)
    for name, _ in plain.named_parameters():
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(got[name], saved[name]), f"{name} did not train"

    again = _round_trip(model, how)
    selection1 = select_half(again, round=1)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        handle1 = apply_selection(again, selection1)
    before = state(again)
    trains_by_handle(again, handle1, steps=2)
    assert_frozen_and_trained(selection1, before, state(again))
    froze = [m for m in hft_warnings(caplog) if "froze" in m]
    assert not froze, f"the user froze nothing, yet: {froze[0]}"
    handle1.remove()
    handle.remove()


# -- 7: counts, sizes and FLOPs ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_sizes_and_flops_are_those_of_the_model(family):
    """``parameters()`` (how many, which names, how many elements), ``num_parameters()``,
    ``get_memory_footprint()`` and the Trainer's ``floating_point_ops()`` (its ``total_flos``:
    6 x tokens x ``num_parameters(exclude_embeddings=True)`` on transformers 5.25) of an
    applied model are those of the model before applying; ``num_parameters(only_trainable=True)``
    and the ``requires_grad`` flags are those of the same half frozen by hand, where a partly trained
    tensor keeps ``requires_grad=True`` as a whole (the flag is per tensor) and so counts whole."""
    from transformers import Trainer

    model = tiny(family)
    inputs = {"input_ids": batches(1, 1)[0][0]}

    def counts():
        return dict(
            names=[n for n, _ in model.named_parameters()],
            count=len(list(model.parameters())),
            numel=sum(p.numel() for p in model.parameters()),
            num_parameters=model.num_parameters(),
            footprint=model.get_memory_footprint(),
            num_parameters_without_embeddings=model.num_parameters(exclude_embeddings=True),
            flops=Trainer.floating_point_ops(SimpleNamespace(model=model), inputs),
        )

    before = counts()
    selection = select_half(model, round=0)
    by_hand = frozen_by_hand(model, selection.plan())
    handle = apply_selection(model, selection)
    optimizer = adamw(handle.parameters())
    handle.attach(optimizer)
    train(model, clipped(model, handle), optimizer, batches(1, 1), 1.0)  # counted after a step too
    after = counts()
    assert after == before
    assert flags(model) == flags(by_hand)
    assert model.num_parameters(only_trainable=True) == by_hand.num_parameters(only_trainable=True)
    handle.remove()


# -- 8: the Trainer's resume of a Mixtral checkpoint (transformers 5.25 saves experts per expert) ------


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_trainer_resume_restores_the_frozen_half_or_says_which_tensors(family, tmp_path):
    """A run with ``enable_hft`` saves a checkpoint; a new run (a model with other values, so a
    tensor the resume does not load shows) resumes from it with ``enable_hft``. transformers 5.25
    writes Mixtral's experts per expert and its resume does not load them (nor the routers) back,
    with or without HFT, logging only "missing keys". HFT promises a frozen half equal to the
    checkpoint's: at the first resumed step and after training, every frozen element is the
    checkpoint's, bit for bit; or the resume stops with a typed HFTError that names the tensors, and
    trains nothing."""
    from transformers import Trainer, TrainerCallback

    from hft_plugin.testing import tiny_tokenizer

    from ._workers.common import collate, lm_dataset, train_args

    tokenizer = tiny_tokenizer()
    first = Trainer(model=tiny(family), args=train_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                    train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
    handle = enable_hft(first)
    first.train()
    checkpoint = state(first.model)
    selection = handle.selection

    class AtFirstStep(TrainerCallback):
        def on_step_begin(self, args, state_, control, model=None, **kwargs):
            if not hasattr(self, "weights"):
                self.weights = state(model)

    model = tiny(family, seed=1)
    seen = AtFirstStep()
    second = Trainer(model=model, args=train_args(tmp_path, max_steps=3), train_dataset=lm_dataset(tokenizer),
                     data_collator=collate(tokenizer), callbacks=[seen])
    enable_hft(second)
    try:
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    except HFTError as error:
        named = re.search(r"model\.layers\.\d+\.(mlp|block_sparse_moe)\.", str(error))
        assert named, f"the error names no tensor: {error}"
        assert not hasattr(seen, "weights"), "the error came after training had started"
        return
    plan = selection.plan()
    for when, weights in (("at the first resumed step", seen.weights), ("after training", state(model))):
        wrong = [n for n in plan.frozen if not torch.equal(weights[n], checkpoint[n])]
        assert not wrong, f"{when}, {len(wrong)} frozen tensors are not the checkpoint's (e.g. {wrong[0]})"
    for name, boxes in plan.partial.items():
        frozen = frozen_mask(checkpoint[name].shape, boxes)
        for when, weights in (("at the first resumed step", seen.weights), ("after training", state(model))):
            assert torch.equal(weights[name][frozen], checkpoint[name][frozen]), \
                f"{when}, the frozen elements of {name} are not the checkpoint's"


# -- log lines name module paths --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_log_lines_name_module_paths_not_classes(family, caplog):
    """Converting an applied model (``to(bfloat16)``, a forward, then ``float()``) and training
    it: a line the plugin logs about it names the tensor by its path in the model (e.g.
    ``model.layers.0.self_attn.qkv_proj.weight``), never as ``Linear.weight``; logging nothing is
    fine."""
    model = tiny(family)
    _, handle = applied(model)
    classes = {type(m).__name__ for m in model.modules()}
    paths = set(model.state_dict())
    with caplog.at_level(logging.INFO, logger="hft_plugin"):
        model.to(torch.bfloat16)
        logits(model)
        model.float()
        trains_by_handle(model, handle, steps=1)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hft_plugin")]
    for line in lines:
        named_by_class = [c for c in classes if re.search(rf"\b{re.escape(c)}\.\w", line)]
        assert not named_by_class, f"names a class ({named_by_class[0]}) where a module path belongs: {line}"
        if re.search(r"storage|linked|alias|convert", line):
            assert any(path in line for path in paths), f"names no tensor of the model: {line}"
    handle.remove()
