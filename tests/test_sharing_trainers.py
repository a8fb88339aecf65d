"""enable_hft lets the reference model of TRL's DPO, KTO and GRPO trainers (and of any trainer exposing
``ref_model``) share the policy's frozen half: the bytes shared, the reference's logits bit-identical
before sharing, after sharing and after training, the policy the same bits with and without sharing,
the settings and trainer set-ups that must not share, and the reference's own copy coming back
before a shared tensor could move (disable_hft, a new round, flags changed by hand, a resumed
checkpoint with other values)."""

from __future__ import annotations

import logging

import pytest
import torch

from ._workers.common import TEXTS, dpo_dataset, snapshot
from .helpers import logits, storage
from hft_plugin import ConfigError, disable_hft, enable_hft
from hft_plugin.adapters.transformers import hft_session
from hft_plugin.sharing import same_bits
from hft_plugin.testing import assert_frozen_and_trained, tiny_model, tiny_tokenizer


COMMON = dict(per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
              use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, weight_decay=0.1)


def base(tmp_path, family="llama") -> str:
    """A checkpoint on disk: TRL loads the reference fresh from the policy's path, as for users."""
    path = tmp_path / f"base-{family}"
    if not path.exists():
        tiny_model(family).save_pretrained(path)
    return str(path)


def dpo_trainer(tmp_path, family="llama", out="out", max_steps=3, **overrides):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(base(tmp_path, family))
    config = DPOConfig(output_dir=str(tmp_path / out), max_steps=max_steps, max_length=48,
                       **{**COMMON, **overrides})
    return DPOTrainer(model=model, args=config, train_dataset=dpo_dataset(), processing_class=tiny_tokenizer())


def kto_trainer(tmp_path, family="llama"):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    model = AutoModelForCausalLM.from_pretrained(base(tmp_path, family))
    data = Dataset.from_list([{"prompt": f"q{i}: ", "completion": TEXTS[i % 8], "label": i % 2 == 0} for i in range(16)])
    config = KTOConfig(output_dir=str(tmp_path / "out"), max_steps=3, max_length=48, **COMMON)
    return KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())


def grpo_trainer(tmp_path, family="llama"):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    def longer_is_better(completions, **_):
        return [float(len(c)) for c in completions]

    model = AutoModelForCausalLM.from_pretrained(base(tmp_path, family))
    config = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, num_generations=4, max_completion_length=8,
                        beta=0.1, **COMMON)  # beta > 0: GRPO keeps a reference model
    return GRPOTrainer(model=model, args=config, reward_funcs=longer_is_better, processing_class=tiny_tokenizer(),
                       train_dataset=Dataset.from_list([{"prompt": f"q{i}: "} for i in range(8)]))


def check_shared_run(trainer) -> dict:
    """enable_hft, then train; the reference shares exactly the frozen half and never moves."""
    reference = trainer.ref_model
    ids = {n: id(p) for n, p in reference.named_parameters()}
    flags = {n: p.requires_grad for n, p in reference.named_parameters()}
    training = reference.training
    before = logits(reference)
    handle = enable_hft(trainer)
    report = hft_session(trainer).sharing.report
    plan = handle.selection.plan()
    frozen = set(plan.frozen) | set()
    policy = dict(trainer.model.named_parameters())
    assert report.shared_tensors == len(frozen) > 0
    assert report.shared_bytes == sum(policy[n].numel() * policy[n].element_size() for n in frozen)
    for name, param in reference.named_parameters():
        assert (storage(param) == storage(policy[name])) == (name in frozen), name
    assert same_bits(logits(reference), before)  # after sharing
    trainer.train()
    assert same_bits(logits(reference), before)  # after training
    assert {n: id(p) for n, p in reference.named_parameters()} == ids
    assert {n: p.requires_grad for n, p in reference.named_parameters()} == flags and reference.training == training
    for name in frozen:  # still shared after training: nothing unshared it
        assert storage(reference.get_parameter(name)) == storage(policy[name])
    return dict(shared_tensors=report.shared_tensors, shared_bytes=report.shared_bytes,
                reference_bytes=report.reference_bytes, summary=report.summary())


@pytest.mark.parametrize("family", ["llama", pytest.param("phi3", marks=pytest.mark.slow)])
def test_dpo_reference_shares_the_frozen_half(tmp_path, family, capsys):
    result = check_shared_run(dpo_trainer(tmp_path, family))
    with capsys.disabled():
        print(f"\nDPO {family}: {result['summary']}")


def test_kto_reference_shares_the_frozen_half(tmp_path, capsys):
    result = check_shared_run(kto_trainer(tmp_path))
    with capsys.disabled():
        print(f"\nKTO llama: {result['summary']}")


@pytest.mark.slow
def test_grpo_reference_shares_the_frozen_half(tmp_path, capsys):
    result = check_shared_run(grpo_trainer(tmp_path))
    with capsys.disabled():
        print(f"\nGRPO llama: {result['summary']}")


def test_dpo_policy_trains_to_the_same_bits_with_and_without_sharing(tmp_path):
    runs = {}
    for share in (True, False):
        trainer = dpo_trainer(tmp_path, out=f"out-{share}")
        before = logits(trainer.ref_model)
        handle = enable_hft(trainer, share_reference=share)
        assert hft_session(trainer).sharing.active is share
        start = snapshot(trainer.model)
        trainer.train()
        assert same_bits(logits(trainer.ref_model), before)
        runs[share] = snapshot(trainer.model)
        # every frozen element bit-identical, every trainable tensor moved, with and without sharing
        assert_frozen_and_trained(handle.selection, start, runs[share])
    for name in runs[True]:
        assert same_bits(runs[True][name], runs[False][name]), name


def test_the_summary_at_train_start_says_how_much_was_shared(tmp_path, caplog):
    trainer = dpo_trainer(tmp_path, max_steps=1)
    enable_hft(trainer)
    with caplog.at_level(logging.INFO, logger="hft_plugin"):
        trainer.train()
    assert "HFT selection:" in caplog.text and "tensors share the policy's frozen half" in caplog.text


# -- turned off, and trainer set-ups that must not share ----------------------------------------------
def test_share_reference_false_and_the_variable_turn_it_off(tmp_path, monkeypatch):
    trainer = dpo_trainer(tmp_path)
    enable_hft(trainer, share_reference=False)
    sharing = hft_session(trainer).sharing
    assert not sharing.active and "turned off" in sharing.report.summary()
    disable_hft(trainer)

    monkeypatch.setenv("HFT_SHARE_REFERENCE", "0")
    enable_hft(trainer)
    assert not hft_session(trainer).sharing.active
    disable_hft(trainer)
    enable_hft(trainer, share_reference=True)  # the argument wins over the variable
    assert hft_session(trainer).sharing.active


def test_a_malformed_variable_fails_before_anything_changes(tmp_path, monkeypatch):
    trainer = dpo_trainer(tmp_path)
    flags = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    monkeypatch.setenv("HFT_SHARE_REFERENCE", "sometimes")
    with pytest.raises(ConfigError, match="HFT_SHARE_REFERENCE='sometimes'"):
        enable_hft(trainer)
    assert {n: p.requires_grad for n, p in trainer.model.named_parameters()} == flags
    assert hft_session(trainer) is None
    with pytest.raises(ConfigError, match="share_reference='yes'"):
        enable_hft(trainer, share_reference="yes")


def test_sync_ref_model_is_not_shared(tmp_path):
    trainer = dpo_trainer(tmp_path, sync_ref_model=True, ref_model_sync_steps=1, max_steps=2)
    before = logits(trainer.ref_model)
    enable_hft(trainer)
    sharing = hft_session(trainer).sharing
    assert not sharing.active and "sync_ref_model" in sharing.report.summary()
    trainer.train()
    assert not same_bits(logits(trainer.ref_model), before)  # synced from the policy, as TRL means it to


def test_fsdp_is_not_shared(tmp_path):
    """Stub: the Trainer's ``is_fsdp_enabled`` flag (HF-Trainer FSDP cannot run on CPU); a real FSDP2
    reference is refused in test_sharing.py."""
    trainer = dpo_trainer(tmp_path)
    trainer.is_fsdp_enabled = True
    enable_hft(trainer)
    assert "FSDP shards the tensors" in hft_session(trainer).sharing.report.summary()


def test_a_trainer_whose_reference_is_the_policy_says_so_and_trains(tmp_path, caplog):
    trainer = dpo_trainer(tmp_path, max_steps=1)
    trainer.ref_model = trainer.model  # a trainer of one's own, exposing the policy as its reference
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        enable_hft(trainer)
    summary = hft_session(trainer).sharing.report.summary()
    assert "nothing shared" in summary and "the policy itself" in summary and "the policy itself" in caplog.text


def test_a_peft_wrapped_reference_says_so(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = dpo_trainer(tmp_path, max_steps=1)
    trainer.ref_model = peft.get_peft_model(trainer.ref_model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n: storage(p) for n, p in trainer.ref_model.named_parameters()}
    enable_hft(trainer)
    assert "PEFT-wrapped" in hft_session(trainer).sharing.report.summary()
    assert {n: storage(p) for n, p in trainer.ref_model.named_parameters()} == before


# -- the reference's own copy comes back before a shared tensor could move ---------------------------------
@pytest.mark.slow
def test_disable_hft_gives_the_reference_its_copy_back(tmp_path):
    trainer = dpo_trainer(tmp_path)
    before = logits(trainer.ref_model)
    enable_hft(trainer)
    sharing = hft_session(trainer).sharing
    assert sharing.active
    disable_hft(trainer)
    assert not sharing.active
    policy = dict(trainer.model.named_parameters())
    assert all(storage(p) != storage(policy[n]) for n, p in trainer.ref_model.named_parameters())
    trainer.train()  # the whole model trains now
    assert same_bits(logits(trainer.ref_model), before)


def test_flags_changed_by_hand_before_training_unshare_that_tensor(tmp_path, caplog):
    trainer = dpo_trainer(tmp_path)
    before = logits(trainer.ref_model)
    handle = enable_hft(trainer)
    name = handle.selection.plan().frozen[0]
    trainer.model.get_parameter(name).requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    assert "got its own copy of them first" in caplog.text and name in caplog.text
    sharing = hft_session(trainer).sharing
    assert name not in sharing.shared_names and sharing.active
    assert same_bits(logits(trainer.ref_model), before)


@pytest.mark.slow
def test_a_new_round_on_the_same_policy_unshares_and_shares_what_still_matches(tmp_path):
    first = dpo_trainer(tmp_path, out="r0")
    before = logits(first.ref_model)
    enable_hft(first, round=0)
    first.train()
    old = hft_session(first).sharing
    second = dpo_trainer(tmp_path, out="r1")
    second.model = first.model  # round 1 on the model round 0 trained, reference from the base checkpoint
    handle = enable_hft(second, round=1)
    assert not old.active  # applying round 1 removed round 0's handle: its reference got its copy back
    assert same_bits(logits(first.ref_model), before)
    report = hft_session(second).sharing.report
    moved = set(report.not_shared.get("have other values", []))
    assert moved and report.shared_tensors == len(handle.selection.plan().frozen) - len(moved)
    second.train()
    assert same_bits(logits(second.ref_model), before)


@pytest.mark.slow
def test_resuming_a_checkpoint_keeps_the_reference_bit_identical(tmp_path):
    from safetensors.torch import load_file, save_file

    trainer = dpo_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    enable_hft(trainer)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    # A frozen tensor with other values in the checkpoint: the load would write them into the policy.
    state = load_file(str(checkpoint / "model.safetensors"))
    changed = next(n for n in hft_session(trainer).selection.plan().frozen if n in state)
    state[changed] = state[changed] + 1.0
    save_file(state, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})

    resumed = dpo_trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    before = logits(resumed.ref_model)
    enable_hft(resumed)
    shared = hft_session(resumed).sharing
    assert changed in shared.shared_names
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert changed not in shared.shared_names and shared.active  # unshared before the load, the rest kept
    assert same_bits(logits(resumed.ref_model), before)
    assert torch.equal(resumed.model.get_parameter(changed).detach(), state[changed])


# -- zero-code activation -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_code_activation_shares_and_the_variable_turns_it_off(tmp_path, monkeypatch):
    from hft_plugin.adapters.transformers import TransformersAdapter

    adapter = TransformersAdapter(config={"round": 0})
    adapter.instrument()
    try:
        trainer = dpo_trainer(tmp_path, out="auto", max_steps=1)
        before = logits(trainer.ref_model)
        trainer.train()
        assert hft_session(trainer).sharing.report.shared_tensors > 0
        assert same_bits(logits(trainer.ref_model), before)
        monkeypatch.setenv("HFT_SHARE_REFERENCE", "0")
        off = dpo_trainer(tmp_path, out="auto-off", max_steps=1)
        off.train()
        assert not hft_session(off).sharing.active
    finally:
        adapter.uninstrument()


@pytest.mark.slow
def test_the_benchmark_runs_at_tiny_size_and_proves_the_same_result():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import reference_sharing

    assert reference_sharing.main(["--model", "tiny", "--steps", "1", "--no-write"]) == 0


def test_a_dpo_trainer_dropped_after_training_is_collected_with_both_models(tmp_path):
    import gc
    import weakref

    trainer = dpo_trainer(tmp_path, max_steps=1)
    enable_hft(trainer, round=0)
    trainer.train()
    gone = weakref.ref(trainer), weakref.ref(trainer.model), weakref.ref(trainer.ref_model)
    del trainer
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]
