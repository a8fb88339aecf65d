"""`axolotl train cfg.yml` end to end on a tiny local Llama and a local alpaca file: with
HFT_ENABLE=1 (Axolotl re-launches itself under `accelerate launch`, so the trainer runs in a fresh
interpreter reached only by the start-up hook; every step trains under the model's HFTRun), without
it (the control: every tensor moves), and with `adapter: lora` (refused before training). Runs in the
Axolotl environment: bash .ci/axolotl.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl", reason="Axolotl tests run in their own environment: bash .ci/axolotl.sh")

from hft_plugin import Selection  # noqa: E402
from hft_plugin.selection import MANIFEST_NAME  # noqa: E402

from ._workers import run_probe  # noqa: E402
from .helpers import assert_frozen_and_trained  # noqa: E402
from .test_cli_e2e import load_weights  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# fp16/bf16 off: Axolotl defaults to fp16 without a bf16 GPU, which CPU matmuls reject; fp32 also
# makes the saved weights comparable bit for bit with the input.
YAML = """base_model: {model}
datasets:
  - path: {data}
    ds_type: json
    type: alpaca
dataset_prepared_path: {prepared}
sequence_len: 256
micro_batch_size: 2
gradient_accumulation_steps: 1
max_steps: 3
learning_rate: 0.001
optimizer: adamw_torch
lr_scheduler: constant
bf16: false
fp16: false
output_dir: {out}
save_strategy: "no"
logging_steps: 1
{extra}"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("axolotl-inputs")
    model_dir, data = root / "model", root / "tiny.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rows = [{"instruction": f"what is {i} plus one?", "input": "", "output": f"it is {i + 1}."} for i in range(16)]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return model_dir, data


def axolotl_train(tmp_path: Path, inputs, extra: str = "", expect_ok: bool = True, **variables):
    model_dir, data = inputs
    out = tmp_path / "out"
    config = tmp_path / "cfg.yml"
    config.write_text(YAML.format(model=model_dir, data=data, prepared=tmp_path / "prepared", out=out, extra=extra))
    cli = shutil.which("axolotl", path=os.path.dirname(sys.executable))
    assert cli, "axolotl is not installed beside this interpreter"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    environ.update(PATH=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", **variables)
    result = subprocess.run([cli, "train", str(config)], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=900)
    log = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, log, result.returncode


def test_hft_enable_trains_one_half(tmp_path, inputs):
    # the probe plugin records, at every step, whether the trainer's model has its HFTRun
    probe = "plugins:\n  - tests._workers.run_probe.RunProbePlugin\n"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out, log, _ = axolotl_train(tmp_path, inputs, extra=probe, HFT_ENABLE="1", HFT_ROUND="1", PYTHONPATH=pythonpath)
    assert "accelerate" in log  # the default launcher: the trainer ran in a fresh interpreter
    selection = Selection.load(str(out / MANIFEST_NAME))
    assert selection.config.round == 1
    steps = run_probe.read(out)
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[0]["trainer"] == "AxolotlTrainer"
    assert all(s["run"] and s["claimed"] and s["handle_active"] and s["round"] == 1 for s in steps), steps
    counts = assert_frozen_and_trained(selection, load_weights(inputs[0]), load_weights(out))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    assert "'hft/round': '1'" in log


def test_without_hft_enable_every_tensor_moves(tmp_path, inputs):
    import torch

    out, log, _ = axolotl_train(tmp_path, inputs)
    assert "hft_plugin" not in log and "hft/" not in log
    assert not (out / MANIFEST_NAME).exists()
    before, after = load_weights(inputs[0]), load_weights(out)
    assert sorted(before) == sorted(after)
    assert [name for name in before if torch.equal(before[name], after[name])] == []


def test_lora_is_refused_before_training(tmp_path, inputs):
    lora = "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlora_target_linear: true\n"
    out, log, code = axolotl_train(tmp_path, inputs, extra=lora, expect_ok=False, HFT_ENABLE="1")
    assert code != 0
    assert "IntegrationError: HFT_ENABLE is set but the Axolotl config has adapter: lora" in log
    assert "train_runtime" not in log and "'loss'" not in log  # no step was taken
    assert not list(out.glob("*.safetensors")) and not (out / MANIFEST_NAME).exists()
