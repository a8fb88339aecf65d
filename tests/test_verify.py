"""hft verify: a checkpoint an HFT run saved holds its promise (frozen half bit-identical to the
base), one frozen element changed breaks it, and bad input gets a typed error. Models are trained
through transformers.Trainer with enable_hft and saved as users save them (dense, fused, and MoE
experts stored one key per expert)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._workers.common import collate, lm_dataset, train_args
from hft_plugin import ConfigError, ManifestError, SelectionMismatchError, enable_hft
from hft_plugin.cli import main
from hft_plugin.boxes import to_mask
from hft_plugin.selection import MANIFEST_NAME, Selection
from hft_plugin.testing import tiny_model, tiny_tokenizer
from hft_plugin.verify import EXIT_BROKEN, verify_checkpoint
from hft_plugin.weights import CheckpointWeights, ConvertedCheckpoint, meta_model

FAMILIES = ["llama", "phi3", "mixtral", "qwen3_moe"]  # dense; fused qkv_proj/gate_up_proj; two MoE storages
MOE = {"mixtral": ("w1", "w3"), "qwen3_moe": ("gate_proj", "up_proj")}  # each expert's gate and up, as stored
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> (base folder, tuned folder, the tuned model's in-memory tensors), trained once."""
    done = {}

    def run(family):
        if family not in done:
            root = tmp_path_factory.mktemp(family)
            model, tokenizer = tiny_model(family), tiny_tokenizer()
            # the llama base sharded (with an index), the tuned folder one file: both layouts are read
            model.save_pretrained(root / "base", **({"max_shard_size": "100KB"} if family == "llama" else {}))
            from transformers import Trainer

            trainer = Trainer(model=model, args=train_args(root / "out", max_steps=2),
                              train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
            enable_hft(trainer)
            trainer.train()
            trainer.save_model(str(root / "tuned"))
            memory = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            done[family] = (str(root / "base"), str(root / "tuned"), memory)
        return done[family]
    return run


def cli(capsys, *argv):
    capsys.readouterr()  # what came before (the fixture's training and saving) is not the command's
    code = main(["verify", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rewrite(folder: str, change) -> None:
    """Rewrite ``folder``'s model.safetensors with ``change(tensors)`` applied, metadata kept."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def copy_of(tuned: str, tmp_path) -> str:
    target = str(tmp_path / "tuned-copy")
    shutil.copytree(tuned, target)
    return target


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_checkpoint_holds(runs, family, capsys):
    base, tuned, _ = runs(family)
    code, out, err = cli(capsys, base, tuned)
    assert code == 0 and err == ""
    assert "verdict: the promise holds" in out and "all bit-identical to the base" in out
    report = verify_checkpoint(base, tuned)
    selection = Selection.load(tuned)
    plan = selection.plan()
    totals = report.totals()
    # every tensor of the manifest judged, none vacuous: frozen elements seen, trainable ones moved
    assert [t.name for t in report.tensors] == list(selection.layout.shapes)
    assert totals["changed_elements"] == 0 and totals["frozen_elements"] > 0 and totals["moved_elements"] > 0
    assert totals["frozen_tensors"] == len(plan.frozen) and totals["partial_tensors"] == len(plan.partial)
    for check in report.tensors:
        assert check.frozen + check.trainable == check.numel
        if check.half == "trains":
            assert check.moved > 0, check.name
    if family == "phi3":
        assert totals["partial_tensors"] > 0 and "qkv_proj" in out
    if family in MOE:  # stored one key per expert, judged as the stacked in-memory tensor
        row = next(t for t in report.tensors if t.name == EXPERTS)
        assert len(row.stored) == 2 * 4 and all(".experts." in key for key in row.stored)
        assert "conversion mapping" in report.conversion and f"{EXPERTS} " in out
        if row.half == "in part":
            assert row.moved == row.trainable > 0 and row.frozen > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_per_expert_keys_build_the_in_memory_tensor(runs, family):
    """transformers' conversion rebuilds exactly the stacked tensor the model trained (same bits)."""
    _, tuned, memory = runs(family)
    with CheckpointWeights(tuned) as weights:
        stored = ConvertedCheckpoint(weights, meta_model(tuned))
        assert EXPERTS not in weights and EXPERTS in stored
        for name in (EXPERTS, EXPERTS.replace("gate_up_proj", "down_proj")):
            assert torch.equal(stored.load(stored.group(name))[name], memory[name])


def _frozen_element(tuned: str, family: str):
    """A frozen element of the tuned checkpoint: (in-memory tensor, its index there, the stored key
    that holds it, its index in that key)."""
    plan = Selection.load(tuned).plan()
    if family == "llama":
        name = next(n for n in plan.frozen if n.endswith("proj.weight"))
        return name, (1, 2), name, (1, 2)
    name = EXPERTS if family in MOE else next(n for n in plan.partial if "qkv_proj" in n)
    shape = Selection.load(tuned).layout.shapes[name]
    frozen = ~to_mask(tuple(shape), plan.partial[name], device="cpu")
    index = tuple(int(i) for i in frozen.nonzero()[-1])  # the last frozen element
    if family not in MOE:
        return name, index, name, index
    expert, row, column = index  # gate rows first, then up rows, in each expert's slice of gate_up_proj
    rows = shape[1] // 2
    gate, up = MOE[family]
    suffix, row = (gate, row) if row < rows else (up, row - rows)
    layer = "block_sparse_moe" if family == "mixtral" else "mlp"
    return name, index, f"model.layers.0.{layer}.experts.{expert}.{suffix}.weight", (row, column)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_changed_frozen_element_breaks_it(runs, family, tmp_path, capsys):
    base, tuned, _ = runs(family)
    name, where, key, index = _frozen_element(tuned, family)
    broken = copy_of(tuned, tmp_path)

    def nudge(tensors):
        tensors[key][index] += 1e-3
    rewrite(broken, nudge)
    code, out, err = cli(capsys, base, broken)
    assert code == EXIT_BROKEN and code != 0
    assert "THE PROMISE DOES NOT HOLD: 1 frozen tensor differs from the base" in out
    assert f"e.g. {name} (1 of " in out and name in err
    row = next(line for line in out.splitlines() if line.startswith(name + " "))
    assert "CHANGED (1 frozen element differs from the base)" in row
    report = verify_checkpoint(base, broken)
    (bad,) = report.broken
    assert bad.name == name and bad.changed == 1 and bad.first_changed == where
    assert bad.base_value != bad.tuned_value


def test_a_tuned_checkpoint_that_did_not_move_is_pointed_out(runs, capsys):
    """TUNED given as BASE too holds (nothing frozen moved), but nothing trained either: say so."""
    _, tuned, _ = runs("llama")
    code, out, _ = cli(capsys, tuned, tuned)
    assert code == 0 and "no trainable element moved: is TUNED the base itself" in out
    base, tuned, _ = runs("llama")
    assert "no trainable element moved" not in cli(capsys, base, tuned)[1]


def test_json_format(runs, capsys):
    base, tuned, _ = runs("mixtral")
    code, out, _ = cli(capsys, base, tuned, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["holds"] is True and data["fingerprint"] == Selection.load(tuned).fingerprint
    assert {t["name"] for t in data["tensors"]} == set(Selection.load(tuned).layout.shapes)
    experts = next(t for t in data["tensors"] if t["name"] == EXPERTS)
    assert experts["holds"] and len(experts["stored"]) == 8 and experts["changed"] == 0


def test_each_stored_tensor_is_read_once(runs, monkeypatch):
    """Streaming: every stored key of both checkpoints is read once, one group at a time."""
    base, tuned, _ = runs("mixtral")
    reads: dict[tuple[str, str], int] = {}
    original = CheckpointWeights.get

    def get(self, name):
        reads[(self.directory, name)] = reads.get((self.directory, name), 0) + 1
        return original(self, name)
    monkeypatch.setattr(CheckpointWeights, "get", get)
    verify_checkpoint(base, tuned)
    for folder in (base, tuned):
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert {k for d, k in reads if d == folder} == keys
    assert set(reads.values()) == {1}


def test_without_a_manifest_it_says_so(runs, tmp_path, capsys):
    base, tuned, _ = runs("llama")
    bare = copy_of(tuned, tmp_path)
    os.remove(os.path.join(bare, MANIFEST_NAME))
    with pytest.raises(ManifestError, match=f"has no {MANIFEST_NAME}.*--manifest FILE"):
        verify_checkpoint(base, bare)
    code, out, err = cli(capsys, base, bare)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("hft verify: error: TUNED ")
    # the run's manifest given by hand
    code, out, _ = cli(capsys, base, bare, "--manifest", os.path.join(tuned, MANIFEST_NAME))
    assert code == 0 and "the promise holds" in out
    with pytest.raises(ManifestError, match="--manifest .*: no such file"):
        verify_checkpoint(base, bare, manifest=str(tmp_path / "nothing.json"))


def test_a_manifest_of_another_model_is_refused(runs):
    base, tuned, _ = runs("llama")
    _, phi3, _ = runs("phi3")
    with pytest.raises(SelectionMismatchError, match=r"written for another model \(fingerprint [0-9a-f]{16}\)"):
        verify_checkpoint(base, tuned, manifest=os.path.join(phi3, MANIFEST_NAME))


def test_missing_tensors_are_named(runs, tmp_path):
    base, tuned, _ = runs("llama")
    broken = copy_of(tuned, tmp_path)
    rewrite(broken, lambda tensors: tensors.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(SelectionMismatchError, match=r"TUNED .* lacks 1 tensor .*model\.layers\.1\.self_attn\.q_proj\.weight"):
        verify_checkpoint(base, broken)
    with pytest.raises(SelectionMismatchError, match=r"BASE .* lacks 1 tensor "):
        verify_checkpoint(broken, tuned)


def test_a_missing_expert_is_named(runs, tmp_path):
    base, tuned, _ = runs("mixtral")
    broken = copy_of(tuned, tmp_path)
    rewrite(broken, lambda tensors: tensors.pop("model.layers.0.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(SelectionMismatchError, match=r"holds model\.layers\.0\.mlp\.experts\.down_proj with shape "
                                                     r"\[3, 64, 96\], but .* records \[4, 64, 96\]"):
        verify_checkpoint(base, broken)


def test_bad_folders(tmp_path, capsys):
    with pytest.raises(ConfigError, match="TUNED .*: no such directory"):
        verify_checkpoint(str(tmp_path), str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, str(tmp_path / "empty"), str(tmp_path / "empty"))
    assert code == 2 and "has no model.safetensors" in err


def test_a_base_in_another_dtype_is_compared_after_casting(tmp_path):
    """A bf16 base trained in fp32: the frozen half is the base's values, exactly, in fp32."""
    from hft_plugin import select_half

    base = tiny_model("llama").to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_model("llama").to(torch.bfloat16).float()
    selection = select_half(tuned, round=0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name in selection.plan().trainable:
                param.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    selection.save(str(tmp_path / "tuned"))
    report = verify_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"))
    assert report.holds and all(t.cast == "BF16 -> F32" for t in report.tensors)
    assert "base cast BF16 -> F32" in report.table()


def test_a_later_round_names_the_folder_it_started_from(tmp_path):
    """Round 1's BASE is round 0's output, which the manifest's history records: said when BASE differs."""
    from hft_plugin import select_half

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "tuned")
    round1 = select_half(model, round=1)
    history = ({**round1.config.to_dict(), "round": 0, "fingerprint": round1.fingerprint, "folder": "/runs/round0"},)
    Selection(round1.config, round1.layout, round1.trainable_units, history).save(str(tmp_path / "tuned"))
    report = verify_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"))
    assert report.holds and report.started_from() == "/runs/round0"
    assert "note: the manifest says round 1 started from /runs/round0" in report.text()
    assert report.totals()["moved_elements"] == 0 and len(report.totals()["unmoved_tensors"]) > 0
    assert "ok (did not move)" in report.table()


def test_verify_is_a_subcommand(capsys):
    assert main(["--help"]) == 0 and "verify" in capsys.readouterr().out
    assert main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: hft verify" in out and "--manifest" in out and "--format" in out
