"""hft half-reset's output: a symlinked --out, a signal during the write (a real one, in a
subprocess) leaves nothing behind, and a tuned folder trained with HFT is reset by its own manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from hft_plugin import ConfigError, select_half
from hft_plugin.cli import main as hft_main
from hft_plugin.reset import half_reset, half_reset_checkpoint
from hft_plugin.selection import MANIFEST_NAME, Selection

from .helpers import snapshot
from .test_half_reset import check_reset, pair, reference, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".hft-half-reset-"))


def test_out_that_is_a_symlink_to_an_empty_directory(tmp_path, capsys):
    base_dir, tuned_dir, selection, base, tuned, expected = reference(tmp_path)
    (tmp_path / "target").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", str(link)]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(tmp_path / "target")
    written = load_file(str(link / "model.safetensors"))
    assert check_reset(selection, base, tuned, written)["frozen"] > 0
    assert leftovers(tmp_path) == []
    # A symlink to a directory that is not empty is refused before any work, naming both.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "link2").symlink_to(tmp_path / "full", target_is_directory=True)
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", str(tmp_path / "link2")]) == 2
    err = capsys.readouterr().err
    assert "link2" in err and "full" in err and "not empty" in err
    assert os.listdir(tmp_path / "full") == ["mine.txt"] and leftovers(tmp_path) == []
    # A symlink to the tuned directory is the tuned directory.
    (tmp_path / "link3").symlink_to(tuned_dir, target_is_directory=True)
    with pytest.raises(ConfigError, match="is the tuned directory"):
        half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "link3"))


# The child stops inside the write of model.safetensors (after its header and two tensors), says so
# through a marker file, and waits there for the parent's signal.
CHILD = textwrap.dedent("""
    import sys, time
    import hft_plugin.reset as reset
    real, calls = reset._uint8, [0]
    def slow():
        calls[0] += 1
        if calls[0] == 3:
            open(sys.argv[1], "w").close()
            time.sleep(120)
        return real()
    reset._uint8 = slow
    from hft_plugin.cli import main
    sys.exit(main(["half-reset", "--base", sys.argv[2], "--tuned", sys.argv[3], "--out", sys.argv[4]]))
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_write_leaves_nothing_behind(tmp_path, signum):
    base, tuned = pair()
    base_dir, tuned_dir = save(base, str(tmp_path / "base")), save(tuned, str(tmp_path / "tuned"))
    work_parent = tmp_path / "results"
    work_parent.mkdir()
    out, marker = work_parent / "out", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), base_dir, tuned_dir, str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never reached the write"
            time.sleep(0.05)
        # Mid-write: a hidden directory with a partial safetensors file is there now.
        (hidden,) = leftovers(work_parent)
        partial = work_parent / hidden / "model.safetensors"
        assert partial.is_file() and partial.stat().st_size > 0
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "nothing was written" in err
    assert leftovers(work_parent) == [] and not out.exists()
    assert sorted(os.listdir(work_parent)) == []


def tuned_by_hft(tmp_path, round=1, seed=3, strategy="category"):
    """A tuned folder whose manifest says an HFT run of ``round`` produced it."""
    base, tuned = pair()
    base_dir, tuned_dir = save(base, str(tmp_path / "base")), save(tuned, str(tmp_path / "tuned"))
    recorded = select_half(tuned, round=round, seed=seed, strategy=strategy)
    recorded.save(tuned_dir)
    return base_dir, tuned_dir, recorded, snapshot(base), snapshot(tuned)


def test_tuned_folder_from_a_later_round_is_reset_by_its_manifest(tmp_path, capsys):
    base_dir, tuned_dir, recorded, base, tuned = tuned_by_hft(tmp_path)
    manifest_before = open(os.path.join(tuned_dir, MANIFEST_NAME), "rb").read()
    out = str(tmp_path / "out")
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", out]) == 0
    written = load_file(os.path.join(out, "model.safetensors"))
    assert check_reset(recorded, base, tuned, written)["frozen"] > 0  # round 1's frozen half, seed 3
    saved = Selection.load(out)
    assert saved.config == recorded.config and saved.trainable_units == recorded.trainable_units
    assert open(os.path.join(tuned_dir, MANIFEST_NAME), "rb").read() == manifest_before
    # Options that agree with the manifest are fine; a contradiction is refused before any work.
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", str(tmp_path / "o2"),
                     "--round", "1", "--seed", "3"]) == 0
    capsys.readouterr()
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", str(tmp_path / "o3"),
                     "--round", "0"]) == 2
    err = capsys.readouterr().err
    assert "--round 0 but the tuned run used --round 1" in err and MANIFEST_NAME in err
    assert not (tmp_path / "o3").exists() and leftovers(tmp_path) == []
    with pytest.raises(ConfigError, match="strategy='layer' but the tuned run used strategy='category'"):
        half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "o4"), strategy="layer")
    assert open(os.path.join(tuned_dir, MANIFEST_NAME), "rb").read() == manifest_before


def test_in_memory_reset_reads_the_tuned_folder_manifest(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, tuned_dir, recorded, base, tuned = tuned_by_hft(tmp_path, round=2, seed=1)
    model = AutoModelForCausalLM.from_pretrained(tuned_dir)
    selection = half_reset(model, AutoModelForCausalLM.from_pretrained(base_dir))
    assert selection.config == recorded.config
    assert check_reset(recorded, base, tuned, snapshot(model))["frozen"] > 0
    with pytest.raises(ConfigError, match="round=0 but the tuned run used round=2"):
        half_reset(AutoModelForCausalLM.from_pretrained(tuned_dir), base, round=0)


def test_reset_output_continues_the_history(tmp_path):
    base_dir, tuned_dir, recorded, *_ = tuned_by_hft(tmp_path, round=1)
    data = json.loads(open(os.path.join(tuned_dir, MANIFEST_NAME)).read())
    data["history"] = [{**recorded.config.to_dict(), "round": 0, "fingerprint": recorded.fingerprint}]
    open(os.path.join(tuned_dir, MANIFEST_NAME), "w").write(json.dumps(data))
    out = str(tmp_path / "out")
    half_reset_checkpoint(base_dir, tuned_dir, out)
    assert [h["round"] for h in Selection.load(out).history] == [0]
