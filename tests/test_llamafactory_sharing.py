"""LLaMA-Factory's DPO and KTO stages: the reference model built by ``create_ref_model`` shares the
policy's frozen half through the zero-code path, with no patch of LLaMA-Factory beyond its model
set-up (the transformers adapter shares ``trainer.ref_model`` when the stage's trainer starts).
Runs in the LLaMA-Factory environment: bash .ci/llamafactory.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llamafactory", reason="LLaMA-Factory tests run in their own environment: bash .ci/llamafactory.sh")

# LLaMA-Factory makes transformers' package checks return a falsy value for a missing package when
# llamafactory.extras.packages is imported; TRL 0.24 binds that check when it is first imported, and
# imported before it (as `import llamafactory.model.adapter` in another test does), `from trl import
# DPOTrainer` fails looking for mergekit. Imported here, at collection, before any test runs.
import llamafactory.extras.packages  # noqa: E402,F401
import torch  # noqa: E402

from hft_plugin import Selection  # noqa: E402
from hft_plugin.selection import MANIFEST_NAME  # noqa: E402

from .helpers import assert_frozen_and_trained  # noqa: E402
from .test_cli_e2e import load_weights  # noqa: E402

pytestmark = pytest.mark.slow

ROWS = [{"instruction": f"what is {i} plus one?", "input": "", "chosen": f"it is {i + 1}.",
         "rejected": f"it is {i + 7}!", "output": f"it is {i + 1}.", "kto_tag": i % 2 == 0} for i in range(16)]
DATASETS = {
    "pairs": {"file_name": "data.json", "ranking": True,
              "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "tagged": {"file_name": "data.json",
               "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}},
}
PROBE = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def workdir(tmp_path: Path) -> tuple[Path, Path]:
    from hft_plugin.testing import tiny_model, tiny_tokenizer

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    if not model_dir.exists():
        tiny_model("llama").save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        data_dir.mkdir()
        (data_dir / "data.json").write_text(json.dumps(ROWS))
        (data_dir / "dataset_info.json").write_text(json.dumps(DATASETS))
    return model_dir, data_dir


def stage_args(tmp_path: Path, stage: str, out: str) -> dict:
    model_dir, data_dir = workdir(tmp_path)
    return dict(model_name_or_path=str(model_dir), stage=stage, do_train=True, finetuning_type="full",
                dataset="pairs" if stage == "dpo" else "tagged", dataset_dir=str(data_dir), template="default",
                cutoff_len=64, overwrite_cache=True, preprocessing_num_workers=1, output_dir=str(tmp_path / out),
                overwrite_output_dir=True, logging_steps=1, save_strategy="no", per_device_train_batch_size=2,
                learning_rate=1.0e-3, max_steps=3, lr_scheduler_type="constant", report_to="none", pref_beta=0.1)


def base_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=PROBE).logits


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_in_process_the_reference_shares_and_stays_bit_identical(tmp_path, stage):
    """Both adapters armed as the start-up hook arms them; a callback looks at the trainer's session."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    from hft_plugin.adapters import transformers as hf_adapter
    from hft_plugin.adapters.llamafactory import LlamaFactoryAdapter
    from hft_plugin.sharing import same_bits

    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            session = next(s for s in list(hf_adapter._SESSIONS.values()) if s.handle.model is model)
            seen["session"], seen["report"] = session, session.sharing.report
            seen["before"] = self.logits(session)

        def on_train_end(self, args, state, control, **kwargs):
            seen["after"] = self.logits(seen["session"])
            seen["still_shared"] = len(seen["session"].sharing.shared_names)

        @staticmethod
        def logits(session):
            with torch.no_grad():
                return session.trainer.ref_model(input_ids=PROBE).logits.clone()

    lf = LlamaFactoryAdapter(config={"round": 1})
    hf = hf_adapter.TransformersAdapter(config={"round": 1})
    lf.instrument()
    hf.instrument()
    try:
        run_exp(stage_args(tmp_path, stage, "out"), callbacks=[Look()])
    finally:
        hf.uninstrument()
        lf.uninstrument()
    model_dir = tmp_path / "model"
    report = seen["report"]
    assert report.shared_tensors > 0 and seen["still_shared"] == report.shared_tensors
    expected = base_logits(model_dir)  # the reference is the base checkpoint, bit for bit
    assert same_bits(seen["before"], expected) and same_bits(seen["after"], expected)
    selection = Selection.load(str(tmp_path / "out" / MANIFEST_NAME))
    counts = assert_frozen_and_trained(selection, load_weights(model_dir), load_weights(tmp_path / "out"))
    assert counts["frozen"] == report.shared_tensors  # every wholly frozen tensor was shared


# A sitecustomize that shows hft_plugin's INFO lines, as a user's logging set-up would.
SITECUSTOMIZE = """import logging, sys
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
logging.getLogger("hft_plugin").addHandler(handler)
logging.getLogger("hft_plugin").setLevel(logging.INFO)
"""


def cli_train(tmp_path: Path, out: str, **variables) -> str:
    import yaml

    config = tmp_path / f"{out}.yaml"
    config.write_text(yaml.safe_dump(stage_args(tmp_path, "dpo", out)))
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cli = shutil.which("llamafactory-cli", path=os.path.dirname(sys.executable))
    assert cli, "llamafactory-cli is not installed beside this interpreter"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    environ.update(PATH=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(tmp_path / "site") + os.pathsep + environ.get("PYTHONPATH", ""), **variables)
    result = subprocess.run([cli, "train", str(config)], cwd=tmp_path, env=environ, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_zero_code_dpo_shares_and_the_variable_turns_it_off(tmp_path):
    log = cli_train(tmp_path, "on", HFT_ENABLE="1", HFT_ROUND="1")
    assert "hft_plugin: LLaMA-Factory dpo stage, round 1" in log
    assert "tensors share the policy's frozen half" in log and "CustomDPOTrainer" in log
    off = cli_train(tmp_path, "off", HFT_ENABLE="1", HFT_ROUND="1", HFT_SHARE_REFERENCE="0")
    assert "reference model: nothing shared: turned off" in off
