"""`llamafactory-cli train tiny.yaml` end to end with HFT_ENABLE=1, in one process and re-launched
under torchrun by FORCE_TORCHRUN=1 NPROC_PER_NODE=2 (the workers are fresh interpreters reached
only by the start-up hook), and without HFT_ENABLE. Runs in the LLaMA-Factory environment:
bash .ci/llamafactory.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="LLaMA-Factory tests run in their own environment: bash .ci/llamafactory.sh")

from hft_plugin import Selection  # noqa: E402
from hft_plugin.selection import MANIFEST_NAME  # noqa: E402

from .helpers import assert_frozen_and_trained  # noqa: E402
from .test_cli_e2e import load_weights  # noqa: E402

pytestmark = pytest.mark.slow

YAML = """model_name_or_path: {model}
stage: sft
do_train: true
finetuning_type: full
dataset: tiny
dataset_dir: {data}
template: default
cutoff_len: 64
overwrite_cache: true
preprocessing_num_workers: 1
output_dir: {out}
overwrite_output_dir: true
logging_steps: 1
save_strategy: "no"
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_steps: 3
lr_scheduler_type: constant
report_to: none
"""


def llamafactory_train(tmp_path: Path, out: str, **variables) -> tuple[Path, Path, str]:
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    if not model_dir.exists():
        tiny_model("llama").save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        data_dir.mkdir()
        rows = [{"instruction": f"what is {i} plus one?", "input": "", "output": f"it is {i + 1}."} for i in range(16)]
        (data_dir / "tiny.json").write_text(json.dumps(rows))
        (data_dir / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    config = tmp_path / f"{out}.yaml"
    config.write_text(YAML.format(model=model_dir, data=data_dir, out=tmp_path / out))
    cli = shutil.which("llamafactory-cli", path=os.path.dirname(sys.executable))
    assert cli, "llamafactory-cli is not installed beside this interpreter"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    environ.update(PATH=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **variables)
    result = subprocess.run([cli, "train", str(config)], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return model_dir, tmp_path / out, result.stdout + result.stderr


def check_one_half(model_dir: Path, out: Path, round: int) -> None:
    selection = Selection.load(str(out / MANIFEST_NAME))
    assert selection.config.round == round
    counts = assert_frozen_and_trained(selection, load_weights(model_dir), load_weights(out))
    assert counts["frozen"] > 0 and counts["trained"] > 0


def test_single_process(tmp_path):
    model_dir, out, log = llamafactory_train(tmp_path, "out", HFT_ENABLE="1", HFT_ROUND="1")
    assert log.count("hft_plugin: LLaMA-Factory sft stage, round 1") == 1
    check_one_half(model_dir, out, round=1)


def test_force_torchrun_two_workers(tmp_path):
    model_dir, out, log = llamafactory_train(tmp_path, "out", HFT_ENABLE="1", HFT_ROUND="2", FORCE_TORCHRUN="1",
                                             NPROC_PER_NODE="2")
    assert "world size: 2" in log
    assert log.count("hft_plugin: LLaMA-Factory sft stage, round 2") == 2  # one per worker
    check_one_half(model_dir, out, round=2)


def test_without_hft_enable_the_plugin_does_nothing(tmp_path):
    import torch

    model_dir, out, log = llamafactory_train(tmp_path, "out")
    assert "hft_plugin" not in log
    assert not (out / MANIFEST_NAME).exists()
    before, after = load_weights(model_dir), load_weights(out)
    assert [name for name in before if torch.equal(before[name], after[name])] == []
