"""The examples in examples/ run end to end (with fewer steps) and report what they promise.

Run in this process (runpy) rather than in subprocesses: importing transformers and TRL again for
each script would cost more than the scripts themselves."""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, capsys, caplog, *args: str) -> str:
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with caplog.at_level(logging.INFO, logger="hft_plugin"):
            runpy.run_path(os.path.join(ROOT, "examples", script), run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out + caplog.text


@pytest.mark.slow
def test_sft_example(tmp_path, capsys, caplog):
    out = run("sft.py", capsys, caplog, "--family", "phi3", "--steps", "2", "--output-dir", str(tmp_path))
    assert "frozen tensors bit-identical after training: True" in out and "HFT selection:" in out
    assert json.loads((tmp_path / "hft_selection.json").read_text())["layout"].startswith("phi3")


@pytest.mark.slow
def test_dpo_example(tmp_path, capsys, caplog):
    out = run("dpo.py", capsys, caplog, "--steps", "2", "--output-dir", str(tmp_path))
    assert "reference model unchanged: True, its requires_grad flags as TRL set them: True" in out


@pytest.mark.slow
def test_continual_example(tmp_path, capsys, caplog):
    out = run("continual.py", capsys, caplog, "--steps", "2", "--output-dir", str(tmp_path))
    for round in range(3):
        assert f"round {round} (" in out and f"(manifest round={round})" in out
    assert "every round trained another half" in out
