"""benchmarks/gpu_check.py, the one script for a CUDA GPU, run here in its --cpu-check mode: the
same code paths on CPU with tiny models (FSDP2 through the HF Trainer, DeepSpeed ZeRO-3, the speed
measurement on a dense and an MoE config, and OpenRLHF's train_sft command line with HFT armed).
What only a GPU can show (a real OpenRLHF step, CUDA kernels, GPU memory) is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def run_check(tmp_path, parts: str) -> dict:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-check", "--only", parts, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.exists() else {}
    failures = {p: (r.get("error"), r.get("trace", r.get("output_tail", ""))[-1500:])
                for p, r in report.get("parts", {}).items() if not r["ok"]}
    assert proc.returncode == 0 and not failures, (failures or proc.stdout[-2000:] + proc.stderr[-3000:])
    assert report["mode"] == "cpu-check" and report["ok"]
    return report["parts"]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    parts = run_check(tmp_path, "fsdp2,zero3,speed-llama-1b,speed-moe")
    for family, figures in parts["fsdp2"]["figures"].items():
        assert figures["param_type"] == "DTensor" and figures["distributed_type"].endswith("FSDP")
        assert figures["frozen"] > 0 and figures["trained"] > 0 and figures["mixed_precision"] == "bf16"
        assert figures["partial"] > 0 if family == "phi3" else figures["partial"] == 0
    assert len(parts["zero3"]["figures"]) == 4
    for figures in parts["zero3"]["figures"].values():
        assert figures["distributed_type"].endswith("DEEPSPEED") and figures["frozen"] > 0
    assert parts["speed-llama-1b"]["figures"]["model"] == "tiny"
    assert parts["speed-moe"]["figures"]["model"] == "tiny-moe"
    for part in ("speed-llama-1b", "speed-moe"):
        (row,) = parts[part]["figures"]["rows"]
        assert row["ratio"] == 0.5 and 0 < row["state_ratio"] < 1


@pytest.mark.slow
def test_gpu_check_openrlhf_cpu_mode(tmp_path):
    setup = subprocess.run(["bash", os.path.join(ROOT, ".ci", "openrlhf.sh"), "--setup-only"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHON=sys.executable))
    if setup.returncode != 0:
        pytest.skip(f"no OpenRLHF environment (bash .ci/openrlhf.sh failed): {setup.stderr[-300:]}")
    record = run_check(tmp_path, "openrlhf")["openrlhf"]
    assert record["hft_armed"] and record["parsed_attn_implementation"] == record["attn_implementation"]
    assert record["mode"].startswith("dry run") and record["sft_samples"] == 8


def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, SCRIPT, "--only", "speed-moe", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr and not (tmp_path / "x.json").exists()
