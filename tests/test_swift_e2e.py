"""`swift sft` end to end on a tiny local Llama and a local messages file: with HFT_ENABLE=1 (`swift sft`
runs the training in a child interpreter, reached only by the start-up hook; every step trains under
the model's HFTRun), without it (the
control: every tensor moves), and with ms-swift's default tuner, LoRA (refused before training).
Runs in the ms-swift environment: bash .ci/swift.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("swift.pipelines", reason="ms-swift tests run in their own environment: bash .ci/swift.sh")

from hft_plugin import Selection  # noqa: E402
from hft_plugin.selection import MANIFEST_NAME  # noqa: E402

from ._workers import run_probe  # noqa: E402
from .helpers import assert_frozen_and_trained  # noqa: E402
from .test_cli_e2e import load_weights  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("swift-inputs")
    model_dir, data = root / "model", root / "tiny.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus one?"},
                          {"role": "assistant", "content": f"it is {i + 1}."}]} for i in range(16)]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    return model_dir, data


def swift_sft(tmp_path: Path, inputs, *flags: str, expect_ok: bool = True, **variables):
    model_dir, data = inputs
    out = tmp_path / "out"
    cli = shutil.which("swift", path=os.path.dirname(sys.executable))
    assert cli, "swift is not installed beside this interpreter"
    # --model_type/--template: a bare local Llama matches several of ms-swift's registered types;
    # --check_model false: no look-up of the model on the ModelScope hub.
    command = [cli, "sft", "--model", str(model_dir), "--model_type", "llama", "--template", "default",
               "--dataset", str(data), "--output_dir", str(out), "--add_version", "false", "--check_model", "false",
               "--max_length", "128", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
               "--max_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
               "--warmup_ratio", "0", "--save_strategy", "steps", "--save_steps", str(STEPS), "--logging_steps", "1",
               "--dataloader_num_workers", "0", "--torch_dtype", "float32", "--report_to", "none", *flags]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    environ.update(PATH=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **variables)
    result = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, log, result.returncode


def test_hft_enable_trains_one_half(tmp_path, inputs):
    # the probe callback records, at every step, whether the trainer's model has its HFTRun
    out, log, _ = swift_sft(tmp_path, inputs, "--tuner_type", "full", "--external_plugins", run_probe.__file__,
                            "--callbacks", run_probe.NAME, HFT_ENABLE="1", HFT_ROUND="1")
    assert "run sh: `" in log  # swift sft ran the training in a child interpreter
    steps = run_probe.read(out)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(s["run"] and s["claimed"] and s["handle_active"] and s["round"] == 1 for s in steps), steps
    checkpoint = out / f"checkpoint-{STEPS}"
    selection = Selection.load(str(out / MANIFEST_NAME))
    assert selection.config.round == 1
    assert Selection.load(str(checkpoint / MANIFEST_NAME)).to_dict() == selection.to_dict()
    counts = assert_frozen_and_trained(selection, load_weights(inputs[0]), load_weights(checkpoint))
    assert counts["frozen"] > 0 and counts["trained"] > 0


def test_without_hft_enable_every_tensor_moves(tmp_path, inputs):
    import torch

    out, log, _ = swift_sft(tmp_path, inputs, "--tuner_type", "full")
    assert "hft_plugin" not in log and "hft/" not in log
    assert not (out / MANIFEST_NAME).exists()
    before, after = load_weights(inputs[0]), load_weights(out / f"checkpoint-{STEPS}")
    assert sorted(before) == sorted(after)
    assert [name for name in before if torch.equal(before[name], after[name])] == []


def test_default_lora_is_refused_before_training(tmp_path, inputs):
    out, log, code = swift_sft(tmp_path, inputs, expect_ok=False, HFT_ENABLE="1")
    assert code != 0
    assert "IntegrationError: HFT_ENABLE is set but ms-swift was given --tuner_type lora" in log
    assert "'loss'" not in log and not list(out.glob("checkpoint-*"))
