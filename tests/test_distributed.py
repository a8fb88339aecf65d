"""enable_hft under DDP (2 processes) and DeepSpeed ZeRO-2/3 (1 and 2 processes), through the HF
Trainer, on CPU ranks (gloo). Each test is one torchrun launch running many cases (see
tests/_workers/train_distributed.py); every rank checks frozen bits, trained tensors and what the
optimizer owns, and writes its findings for the assertions here.

The first DeepSpeed launch on a machine compiles a communication op (about a minute).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_workers", "train_distributed.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, nproc: int, out, worker: str = WORKER) -> list[list[dict]]:
    """Run ``worker`` under torchrun on ``nproc`` CPU ranks; each rank's results, as it wrote them.
    The workers configure HFT themselves: no HFT_* variable of this process reaches them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), worker, mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = []
    for rank in range(nproc):
        with open(out / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return ranks


def by_case(ranks: list[list[dict]]) -> dict[str, list[dict]]:
    cases: dict[str, list[dict]] = {}
    for results in ranks:
        for result in results:
            assert result["ok"], f"{result['case']}: {result.get('error')}\n{result.get('trace')}"
            cases.setdefault(result["case"], []).append(result)
    return cases


def assert_trained(results: list[dict], family: str, nproc: int, wrapper: str) -> None:
    assert len(results) == nproc
    for r in results:
        assert r["world_size"] == nproc and r["wrapper"] == wrapper and r["manifest"]
        assert r["frozen"] > 0 and r["trained"] > 0
        assert r["optimizer_tensors"] == r["trainable_tensors"]
        if family == "llama":
            assert r["partial"] == 0 and r["mechanisms"] == []
        else:
            assert r["partial"] > 0  # fused tensors, trained in part
        if wrapper == "DeepSpeedEngine":  # flat partitions: partly trained tensors keep the mask
            assert r["mechanisms"] in ([], ["mask"])
        else:  # DDP reduces region parameters' gradients: the optimizer owns exactly the trainable elements
            assert r["mechanisms"] == {"llama": [], "phi3": ["rows"], "mixtral": ["experts"]}[family]
            assert r["optimizer_numel"] == r["trainable_numel_expected"]
        # every rank ends with the same weights
        assert len(set(r["rank_digests"])) == 1 and len(r["rank_digests"]) == nproc


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    cases = by_case(launch("ddp", 2, tmp_path))
    for r in cases["ddp-rank-mismatch"]:
        # a rank with another seed is refused on every rank, before any step
        assert r["raised"] == "SelectionMismatchError" and "rank 0" in r["message"] and "rank 1" in r["message"]
        assert r["weights_unchanged"]
    for family in ("llama", "phi3", "mixtral"):
        assert_trained(cases[f"ddp-{family}"], family, 2, "DistributedDataParallel")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_deepspeed_zero2_and_zero3(tmp_path, nproc):
    pytest.importorskip("deepspeed")
    cases = by_case(launch("deepspeed", nproc, tmp_path))
    for stage in (2, 3):
        for path in ("create-optimizer", "ds-optimizer"):
            for family in ("llama", "phi3"):
                assert_trained(cases[f"zero{stage}-{path}-{family}"], family, nproc, "DeepSpeedEngine")
    for r in cases["zero2-phi3-weight-decay-refused"]:
        assert r["raised"] == "IntegrationError" and "weight_decay=0" in r["message"]
    for r in cases["zero3-resume"]:
        assert r["manifest_in_checkpoint"] and r["resumed_step"] == 3 and r["frozen_equal_to_fresh_model"]
        assert "trained in HFT round 0, but this run is round 1" in r["other_round"]


@pytest.mark.slow
def test_fsdp2_plain_loop(tmp_path):
    """fully_shard per layer, 2 gloo ranks, a plain loop: whole tensors frozen before sharding train
    exactly; region parameters that fully_shard sharded are refused with the remedy (never frozen
    slices that move); applied after sharding, fused tensors get the mask on each shard."""
    cases = by_case(launch("fsdp2", 2, tmp_path))
    for r in cases["fsdp2-llama"]:
        assert r["frozen"] > 0 and r["trained"] > 0 and r["optimizer_owns_dtensors"]
    for r in cases["fsdp2-phi3-before"]:
        for where in ("attach", "forward"):
            assert r[where] is not None and "IntegrationError" in r[where] and "partial='mask'" in r[where], r
            assert r[where + "_unchanged"]
    for r in cases["fsdp2-phi3-after"]:
        assert r["mechanisms"] == ["mask"] and r["partial"] > 0
