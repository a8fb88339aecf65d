"""The reference model of TRL's DPOTrainer under DDP (2 processes) and DeepSpeed ZeRO-2 and ZeRO-3
(1 process, not shared: the reference is DeepSpeed's own engine, and under ZeRO-3 partitioned), on
CPU ranks (gloo): the reference stays bit-identical and the policy trains its half.

This file is also the worker: the tests launch it under torchrun, each rank writes what it saw to
OUT/rank<N>.json. The first DeepSpeed launch on a machine compiles a communication op (about a
minute).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(mode: str, nproc: int, out) -> list[dict]:
    from tests.test_distributed import launch as launch_ranks

    results = [case for rank in launch_ranks(mode, nproc, out, worker=os.path.abspath(__file__)) for case in rank]
    for case in results:
        assert case["ok"], f"{case['case']}: {case.get('error')}\n{case.get('trace')}"
    return results


@pytest.mark.slow
def test_ddp_two_processes_keep_the_reference_bit_identical(tmp_path):
    results = launch("ddp", 2, tmp_path)
    raw = [r for r in results if r["case"] == "raw-ddp"]
    results = [r for r in results if r["case"] == "ddp"]
    assert len(results) == len(raw) == 2
    for r in raw:  # the tensors stay shared through DDP's broadcast and training
        assert r["shared_tensors"] > 0 and r["unshared_by_check"] == 0 and r["still_shared"]
        assert r["reference_unchanged"] and r["frozen_unchanged"] and r["trained_moved"], r["frozen_and_trained"]
        assert r["checked_counts"]["frozen"] > 0 and r["checked_counts"]["trained"] > 0
    assert len({r["policy_digest"] for r in raw}) == 1
    for r in results:
        assert r["wrapper"] == "DistributedDataParallel" and r["shared_at_start"] > 0 == r["shared_tensors"]
        assert "were replaced in the policy (moved or cast)" in r["summary"]
        # On CPU ranks accelerate moves the policy to "cpu:0" before wrapping it in DDP, which copies every
        # tensor: the sharing ends there (the check after preparing says so) and the reference keeps its
        # storage. On GPUs the policy is already on its device and stays shared.
        assert r["shared_after_training"] == 0 and not r["still_shared"]
        assert r["reference_unchanged"] and r["frozen_unchanged"] and r["trained_moved"], r["frozen_and_trained"]
        assert r["checked_counts"]["frozen"] > 0 and r["checked_counts"]["trained"] > 0
    assert len({r["policy_digest"] for r in results}) == 1  # both ranks end on the same weights


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_do_not_share(tmp_path):
    pytest.importorskip("deepspeed")
    cases = {r["case"]: r for r in launch("deepspeed", 1, tmp_path)}
    zero2, zero3 = cases["zero2"], cases["zero3"]
    assert zero2["reference_type"] == "DeepSpeedEngine" and "own engine" in zero2["summary"]
    assert "ZeRO-3 partitions" in zero3["summary"]
    for r in (zero2, zero3):
        assert r["shared_tensors"] == 0 and r["reference_unchanged"] and r["wrapper"] == "DeepSpeedEngine"


# -- the worker ---------------------------------------------------------------------------------------------
def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode() + p.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _frozen_and_trained(selection, before: dict, after: dict) -> dict:
    """hft_plugin.testing.assert_frozen_and_trained on the policy, as JSON: ``frozen_and_trained`` is
    None or the first tensor that breaks the promise; ``frozen_unchanged``: every frozen tensor and
    region bit-identical (the frozen ones are checked first); ``trained_moved``: every trainable tensor
    and region moved, and the frozen ones still."""
    from hft_plugin.testing import assert_frozen_and_trained

    try:
        counts = assert_frozen_and_trained(selection, before, after)
    except AssertionError as exc:
        error = str(exc)
        return dict(frozen_and_trained=error, checked_counts=None, trained_moved=False,
                    frozen_unchanged=error.endswith("did not move"))
    return dict(frozen_and_trained=None, checked_counts=counts, frozen_unchanged=True, trained_moved=True)


def _dpo_case(out: str, **overrides) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from hft_plugin import enable_hft
    from hft_plugin.adapters.transformers import hft_session
    from hft_plugin.testing import tiny_model, tiny_tokenizer
    from tests._workers.common import dpo_dataset, full_parameters, snapshot

    base = os.path.join(out, "base")
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.isdir(base):
        tiny_model("llama").save_pretrained(base)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    args = DPOConfig(output_dir=os.path.join(out, "run"), max_steps=2, per_device_train_batch_size=2, max_length=48,
                     learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                     save_strategy="no", disable_tqdm=True, seed=0, **overrides)  # before the model: ZeRO-3 partitions it
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dpo_dataset(), processing_class=tiny_tokenizer())
    probe = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))

    def ref_logits():
        with torch.no_grad():
            return trainer.ref_model(input_ids=probe).logits.clone()

    zero3 = hasattr(next(model.parameters()), "ds_id")
    reference = getattr(trainer.ref_model, "module", trainer.ref_model)
    # A forward of TRL's ZeRO-3 reference engine before train() breaks TRL's fused LM head later
    # ("Cannot partition a param in flight"), with or without HFT: compare its gathered weights there.
    ref_before = snapshot(reference) if zero3 else ref_logits()
    handle = enable_hft(trainer)
    sharing = hft_session(trainer).sharing
    shared_at_start = len(sharing.shared_names)
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    ref_after = snapshot(reference) if zero3 else ref_logits()
    checked = _frozen_and_trained(handle.selection, before, after)
    with full_parameters(model):
        digest = _digest(model)
    still = all(sharing.reference is not None and
                trainer.model.get_parameter(n).untyped_storage().data_ptr()
                == sharing.reference.get_parameter(n).untyped_storage().data_ptr() for n in sharing.shared_names)
    return dict(
        summary=sharing.report.summary(), shared_tensors=sharing.report.shared_tensors,
        shared_at_start=shared_at_start, shared_after_training=len(sharing.shared_names),
        still_shared=bool(sharing.shared_names) and still,
        reference_type=type(trainer.ref_model).__name__, wrapper=type(trainer.model_wrapped).__name__,
        reference_unchanged=all(torch.equal(ref_before[n].view(torch.int32), ref_after[n].view(torch.int32))
                                for n in ref_before) if zero3 else
        bool(torch.equal(ref_after.view(torch.int32), ref_before.view(torch.int32))),
        **checked, policy_digest=digest,
    )


def _raw_ddp_case() -> dict:
    """torch's DDP on a shared policy, without accelerate's move: DDP's start-up broadcast writes rank
    0's tensors into every rank's policy in place, shared ones included (the same bits: one checkpoint)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from hft_plugin import apply_selection, select_half
    from hft_plugin.sharing import share_reference
    from hft_plugin.testing import snapshot, tiny_model

    policy, reference = tiny_model("llama"), tiny_model("llama").eval()
    handle = apply_selection(policy, select_half(policy, round=0))
    shared = share_reference(handle, reference)
    probe = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_before = reference(input_ids=probe).logits
    before = snapshot(policy)
    model = DistributedDataParallel(policy)
    unshared = shared.check()
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))  # each rank its own batch
    for _ in range(2):
        ids = torch.randint(3, 96, (2, 16), generator=gen)
        with torch.no_grad():
            ref_logp = torch.log_softmax(reference(input_ids=ids).logits, -1)
        logp = torch.log_softmax(model(input_ids=ids).logits, -1)
        loss = (logp.exp() * (logp - ref_logp)).sum(-1).mean() + model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = snapshot(policy)
    with torch.no_grad():
        ref_after = reference(input_ids=probe).logits
    checked = _frozen_and_trained(handle.selection, before, after)
    return dict(
        shared_tensors=shared.report.shared_tensors, unshared_by_check=len(unshared),
        still_shared=len(shared.shared_names) == shared.report.shared_tensors and all(
            policy.get_parameter(n).untyped_storage().data_ptr()
            == reference.get_parameter(n).untyped_storage().data_ptr() for n in shared.shared_names),
        reference_unchanged=bool(torch.equal(ref_before.view(torch.int32), ref_after.view(torch.int32))),
        **checked, policy_digest=_digest(policy),
    )


def _run(results: list, name: str, fn) -> None:
    try:
        results.append({"case": name, "ok": True, **fn()})
    except Exception as exc:  # recorded for the test to report
        results.append({"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-3000:]})
    gc.collect()


def _worker(mode: str, out: str) -> None:
    import torch

    sys.path.insert(0, ROOT)
    results: list = []
    if mode == "ddp":
        _run(results, "ddp", lambda: _dpo_case(out, ddp_backend="gloo"))
        _run(results, "raw-ddp", _raw_ddp_case)
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate.state import AcceleratorState, PartialState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        PartialState(backend="gloo")
        for stage in (2, 3):
            config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                      "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
            _run(results, f"zero{stage}", lambda: _dpo_case(f"{out}/z{stage}", deepspeed=config,
                                                            accelerator_config={"use_configured_state": True}))
            unset_hf_deepspeed_config()
            AcceleratorState._reset_state(reset_partial_state=False)
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
