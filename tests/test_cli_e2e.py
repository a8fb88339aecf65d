"""End to end through a third-party CLI: `HFT_ENABLE=1 trl sft ...` (which runs under accelerate
launch) on a tiny model saved to disk and a local dataset. The saved model must equal the input on
every frozen element and differ on every trained one, with hft_selection.json beside it; the same
run without HFT_ENABLE must show the plugin did nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hft_plugin import Selection
from hft_plugin.selection import MANIFEST_NAME

from .helpers import assert_frozen_and_trained

pytestmark = pytest.mark.slow


def write_tiny_run(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """A tiny model + tokenizer saved with save_pretrained, and a local chat dataset."""
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    model_dir, data_dir = root / "model", root / "data"
    tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as handle:
        for i in range(16):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                                                  {"role": "assistant", "content": f"it is {i + 1}."}]}) + "\n")
    return model_dir, data_dir


def load_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def run_cli(command: list[str], cwd: Path, expect: int = 0, **variables) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", **variables)
    result = subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=900)
    assert (result.returncode == 0) == (expect == 0), result.stdout[-3000:] + result.stderr[-5000:]
    return result


def trl_sft(tmp_path: Path, model_dir: Path, data_dir: Path, out: str, *options: str, expect: int = 0,
            **variables) -> tuple[Path, subprocess.CompletedProcess]:
    trl = shutil.which("trl")
    assert trl, "the trl CLI is not on PATH"
    done = run_cli([trl, "sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
                    "--output_dir", out, "--max_steps", "3", "--per_device_train_batch_size", "2",
                    "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
                    "--logging_steps", "1", *options], tmp_path, expect=expect, **variables)
    return tmp_path / out, done


def test_trl_sft_cli_trains_one_half(tmp_path):
    model_dir, data_dir = write_tiny_run(tmp_path)
    out, done = trl_sft(tmp_path, model_dir, data_dir, "out-hft", "--log_level", "info", HFT_ENABLE="1",
                        HFT_ROUND="1")
    selection = Selection.load(str(out / MANIFEST_NAME))
    assert selection.config.round == 1
    counts = assert_frozen_and_trained(selection, load_weights(model_dir), load_weights(out))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    # the summary block, once, overall share first; the hft/* metrics still in the logged metrics
    output = done.stdout + done.stderr
    assert output.count("hft_plugin: SFTTrainer trains with Half Fine-Tuning") == 1, output[-3000:]
    block = output[output.index("hft_plugin: SFTTrainer trains"):].splitlines()
    assert "round=1" in block[1] and block[2].startswith("trainable params: ")
    assert "'hft/overall_ratio'" in output


def test_trl_sft_cli_with_peft_says_hft_and_lora_are_alternatives(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    model_dir, data_dir = write_tiny_run(tmp_path)
    _, done = trl_sft(tmp_path, model_dir, data_dir, "out-peft", "--use_peft", expect=1, HFT_ENABLE="1")
    assert "HFT and LoRA are alternatives: drop peft_config (in `trl sft`, drop --use_peft)" in done.stderr
    assert "unset HFT_ENABLE" in done.stderr


def test_trl_sft_cli_without_hft_enable_is_untouched(tmp_path):
    model_dir, data_dir = write_tiny_run(tmp_path)
    out, _ = trl_sft(tmp_path, model_dir, data_dir, "out-full")
    assert not (out / MANIFEST_NAME).exists()
    before, after = load_weights(model_dir), load_weights(out)
    import torch

    # every tensor with a gradient path moved, the half HFT would have frozen included
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], unchanged


def test_trl_sft_cli_with_a_misspelt_variable_stops_with_one_short_error(tmp_path):
    """`HFT_ENABLE=1 HFT_RATO=0.25 trl sft` trained at ratio 0.5 with no word; a malformed value was
    then printed three times in 86 lines of tracebacks (the worker's, and accelerate's with the
    worker's stderr attached). Now: the error once, two one-line pointers, no traceback."""
    model_dir, data_dir = write_tiny_run(tmp_path)
    out, done = trl_sft(tmp_path, model_dir, data_dir, "out-typo", expect=1, HFT_ENABLE="1", HFT_RATO="0.25")
    assert not out.exists() or not any(out.iterdir())
    assert done.stderr.count("HFT_RATO='0.25' is not a variable hft-plugin reads") == 1, done.stderr[-3000:]
    assert "Did you mean HFT_RATIO?" in done.stderr and "Traceback" not in done.stderr
    stopped, worker = [line for line in done.stderr.splitlines() if line.startswith("hft_plugin:")][1:]
    assert stopped == "hft_plugin: stopped before training on the configuration error above (ConfigError)."
    # accelerate starts the worker with sys.executable: python, python3 or python3.11 by the venv
    assert re.fullmatch(r"hft_plugin: the worker \(python[\d.]* sft\.py \.\.\.\) stopped on the configuration "
                        r"error above \(exit status 1\)\.", worker), worker
