"""The examples in examples/ run end to end (with fewer steps) and report what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_sft_example(tmp_path):
    out = run("sft.py", "--family", "phi3", "--steps", "2", "--output-dir", str(tmp_path))
    assert "frozen tensors bit-identical after training: True" in out and "HFT selection:" in out
    assert json.loads((tmp_path / "hft_selection.json").read_text())["layout"].startswith("phi3")


@pytest.mark.slow
def test_dpo_example(tmp_path):
    out = run("dpo.py", "--steps", "2", "--output-dir", str(tmp_path))
    assert "reference model unchanged: True, its requires_grad flags as TRL set them: True" in out


@pytest.mark.slow
def test_continual_example(tmp_path):
    out = run("continual.py", "--steps", "2", "--output-dir", str(tmp_path))
    for round in range(3):
        assert f"round {round} (" in out and f"(manifest round={round})" in out
    assert "every round trained another half" in out
