"""HFT under FSDP2 on 2 CPU ranks (gloo): ``fully_shard`` in a plain loop, and the HF Trainer's
FSDP2 path (reached on CPU through the documented shim in :mod:`hft_plugin.testing_fsdp`). One
torchrun launch per mode runs many cases (tests/_workers/train_fsdp.py); every rank gathers the
full tensors and checks frozen bits, trained tensors and what the optimizer owns.
"""

from __future__ import annotations

import os

import pytest

from .test_distributed import by_case
from .test_distributed import launch as launch_ranks

WORKER = os.path.join(os.path.dirname(__file__), "_workers", "train_fsdp.py")
NPROC = 2


def launch(mode: str, out) -> dict[str, list[dict]]:
    return by_case(launch_ranks(mode, NPROC, out, worker=WORKER))


def assert_sharded_training(results: list[dict], family: str) -> None:
    assert len(results) == NPROC
    for r in results:
        assert r["frozen"] > 0 and r["trained"] > 0
        assert r["dtensor_params"] > 0  # the model really was sharded
        assert r["optimizer_tensors"] == r["trainable_tensors"]
        assert r["partial"] > 0 if family == "phi3" else r["partial"] == 0
        assert len(set(r["rank_digests"])) == 1 and len(r["rank_digests"]) == NPROC  # ranks end equal


@pytest.mark.slow
def test_fsdp2_plain_loop(tmp_path):
    cases = launch("plain", tmp_path)
    for family in ("llama", "phi3"):
        for when in ("before", "after"):
            assert_sharded_training(cases[f"plain-{family}-{when}"], family)
    for r in cases["plain-phi3-before"]:
        assert r["restore"]  # weight decay: frozen rows put back after each step
    assert_sharded_training(cases["plain-phi3-before-model-params"], "phi3")
    for r in cases["plain-phi3-no-decay"]:
        assert not r["restore"]  # masking alone keeps them still
    assert_sharded_training(cases["plain-phi3-no-decay"], "phi3")
    assert_sharded_training(cases["plain-phi3-shard-dim1"], "phi3")
    for r in cases["plain-phi3-layer-strategy"]:
        assert r["frozen"] > 0 and r["trained"] > 0 and r["partial"] == 0
    for r in cases["plain-phi3-remove"]:
        assert r["flags_restored"]


@pytest.mark.slow
def test_fsdp2_trainer(tmp_path):
    cases = launch("trainer", tmp_path)
    for family in ("llama", "phi3"):
        results = cases[f"trainer-{family}"]
        assert_sharded_training(results, family)
        for rank, r in enumerate(results):
            assert r["fsdp_version"] == 2 and r["world_size"] == NPROC and r["manifest"]
            assert (r["manifest_writes"] > 0) == (rank == 0)  # the main process writes hft_selection.json
    for variant in ("bf16", "cpu_ram_efficient_loading", "activation_checkpointing"):
        assert_sharded_training(cases[f"trainer-phi3-{variant}"], "phi3")
    for r in cases["trainer-phi3-activation_checkpointing"]:
        assert r["checkpoint_wrapped"]  # the handle followed parameters whose names changed
    for r in cases["trainer-rank-mismatch"]:
        assert r["raised"] == "SelectionMismatchError" and "rank 0" in r["message"] and "rank 1" in r["message"]
        assert r["weights_unchanged"] and not r["sharded"]
    for r in cases["trainer-resume-phi3"]:
        assert r["manifest_in_checkpoint"] and r["resumed_step"] == 3
        assert r["frozen"] > 0 and r["partial"] > 0  # frozen (and frozen rows) equal to the fresh model
        assert "trained in HFT round 0, but this run is round 1" in r["other_round"]
    for r in cases["trainer-fsdp1-flat-refused"]:
        assert r["raised"] == "IntegrationError"
        assert "FSDP2" in r["message"] and "use_orig_params=True" in r["message"]
    for r in cases["trainer-fsdp1-fused-refused"]:
        assert r["raised"] == "IntegrationError" and "qkv_proj" in r["message"] and "FSDP2" in r["message"]
