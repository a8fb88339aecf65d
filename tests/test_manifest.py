"""hft_selection.json: a damaged or hand-edited file is an HFTError that names the file and what is
wrong; the fingerprint covers how fused tensors are split; format 1 files still read."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hft_plugin import HFTError, ManifestError, SelectionMismatchError, apply_selection, enable_hft, select_half
from hft_plugin.layouts.base import fingerprint_shapes
from hft_plugin.selection import MANIFEST_NAME, Selection
from hft_plugin.testing import tiny_model

from .helpers import flags, plain_trainer


@pytest.fixture
def saved(tmp_path):
    selection = select_half(tiny_model("phi3"), round=1, seed=2)
    selection.save(str(tmp_path))
    return tmp_path / MANIFEST_NAME, json.loads((tmp_path / MANIFEST_NAME).read_text())


def edit(data, change):
    data = json.loads(json.dumps(data))
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("name, text, match", [
    ("truncated", lambda raw, d: raw[: len(raw) // 2], "is not valid JSON"),
    ("empty", lambda raw, d: "", "is not valid JSON"),
    ("binary", lambda raw, d: b"\xff\xfe\x00garbage", "is not valid JSON"),
    ("a list", lambda raw, d: "[1, 2]", "holds a JSON list, not an object"),
    ("no config", lambda raw, d: edit(d, lambda x: x.pop("config")), "has no 'config'"),
    ("no layers", lambda raw, d: edit(d, lambda x: x.pop("layers")), "has no 'layers'"),
    ("no fingerprint", lambda raw, d: edit(d, lambda x: x.pop("fingerprint")), "has no 'fingerprint'"),
    ("round a string", lambda raw, d: edit(d, lambda x: x["config"].update(round="1")), "'config' is invalid"),
    ("unknown option", lambda raw, d: edit(d, lambda x: x["config"].update(rnd=1)), "'config' is invalid"),
    ("next in a manifest", lambda raw, d: edit(d, lambda x: x["config"].update(round="next")), "round='next'"),
    ("shapes wrong type", lambda raw, d: edit(d, lambda x: x.update(shapes=[1])), r"\['shapes'\] is list"),
    ("shape of strings", lambda raw, d: edit(d, lambda x: x["shapes"].update({"lm_head.weight": ["a"]})),
     "not a list of integers"),
    ("trainable not bool", lambda raw, d: edit(d, lambda x: x["layers"][0][0].update(trainable="yes")),
     r"layers\[0\]\[0\]\['trainable'\] is str"),
    ("part without param", lambda raw, d: edit(d, lambda x: x["layers"][0][0]["parts"][0].pop("param")),
     r"layers\[0\]\[0\]\.parts\[0\] has no 'param'"),
    ("bad box", lambda raw, d: edit(d, lambda x: [p.update(boxes=[[1, 2]]) for u in x["layers"][0]
                                                    for p in u["parts"] if p["boxes"]]), "not a list of"),
    ("unknown param", lambda raw, d: edit(d, lambda x: x["layers"][0][0]["parts"][0].update(param="nope")),
     "'nope', which is not in 'shapes'"),
    ("edited shape", lambda raw, d: edit(d, lambda x: x["shapes"].update({"lm_head.weight": [1, 1]})),
     "does not match its own contents"),
    ("edited split", lambda raw, d: edit(d, lambda x: [p.update(boxes=[[[0, 0, 1]]]) for u in x["layers"][0]
                                                      for p in u["parts"] if p["boxes"]]),
     "does not match its own contents"),
    ("history not a list", lambda raw, d: edit(d, lambda x: x.update(history={"round": 0})), "'history'"),
    ("format unknown", lambda raw, d: edit(d, lambda x: x.update(format="2")), "'format' is '2'"),
])
def test_damaged_manifest_is_an_hft_error_naming_the_file(saved, name, text, match):
    path, data = saved
    raw = path.read_text()
    content = text(raw, data)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ManifestError, match=match) as info:
        Selection.load(str(path.parent))
    assert str(path) in str(info.value)
    assert isinstance(info.value, SelectionMismatchError) and isinstance(info.value, HFTError)


def test_newer_format_says_to_upgrade(saved):
    path, data = saved
    path.write_text(edit(data, lambda x: x.update(format=99)))
    with pytest.raises(ManifestError, match="format 99, written by a newer hft-plugin.*Upgrade hft-plugin"):
        Selection.load(str(path))


def test_unreadable_manifest_names_the_file(tmp_path):
    os.mkdir(tmp_path / "dir")
    os.mkdir(tmp_path / "dir" / MANIFEST_NAME)  # a directory where the file should be
    with pytest.raises(ManifestError, match=MANIFEST_NAME):
        Selection.load(str(tmp_path / "dir" / MANIFEST_NAME))


def test_format_1_files_still_read(saved):
    """Format 1 hashed names and shapes only; its parts carry the splits, so it upgrades as it is read."""
    path, data = saved
    old = dict(data, format=1, fingerprint=fingerprint_shapes({n: tuple(s) for n, s in data["shapes"].items()}))
    old.pop("history")
    path.write_text(json.dumps(old))
    loaded = Selection.load(str(path))
    assert loaded.fingerprint == data["fingerprint"] and loaded.history == ()
    assert loaded.trainable_units == Selection.from_json(json.dumps(data)).trainable_units
    path.write_text(json.dumps(dict(old, fingerprint="0" * 16)))
    with pytest.raises(ManifestError, match="does not match"):
        Selection.load(str(path))


def test_save_writes_the_history_and_is_atomic(tmp_path):
    selection = select_half(tiny_model("llama"))
    selection.history = ({"round": 0, "seed": 0, "strategy": "category", "ratio": 0.5, "train_embeddings": True,
                          "fingerprint": selection.fingerprint},)
    selection.save(str(tmp_path))
    assert Selection.load(str(tmp_path)).history == selection.history
    assert os.listdir(tmp_path) == [MANIFEST_NAME]  # no temporary file left beside it


# -- the fingerprint covers how fused tensors are split -------------------------------------------------
# GPT-NeoX's query_key_value interleaves q/k/v per head: the head count decides the rows of each part,
# and no shape shows it. (Phi-3's q/kv sizes and MoE expert counts also decide splits, but there every
# change of them also changes a shape: o_proj's columns, the stacked experts' first dimension.)
@pytest.mark.parametrize("family, other", [("gpt_neox", dict(num_attention_heads=2)),
                                           ("gpt_neox", dict(num_attention_heads=8))])
def test_same_names_and_shapes_split_differently_are_another_model(family, other):
    model, different = tiny_model(family), tiny_model(family, **other)
    same_shapes = {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in different.named_parameters()}
    assert same_shapes, "the test needs two models that differ only in how fused tensors split"
    selection = select_half(model)
    assert select_half(different).fingerprint != selection.fingerprint
    before = flags(different)
    with pytest.raises(SelectionMismatchError, match="split into parts differently"):
        apply_selection(different, selection)
    assert flags(different) == before
    apply_selection(model, selection).remove()  # the model it was made for: fine


def test_separate_projection_fingerprint_is_unchanged():
    # nothing is split in Llama: its fingerprint is the names-and-shapes hash of format 1 (docs show it)
    model = tiny_model("llama")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert select_half(model).fingerprint == fingerprint_shapes(shapes) == "24189fc2d77aad75"


def test_resume_from_a_checkpoint_of_a_differently_split_model_is_refused(tmp_path):
    trainer = plain_trainer(tmp_path, model=tiny_model("gpt_neox"), max_steps=2, save_strategy="steps", save_steps=2)
    enable_hft(trainer)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other = plain_trainer(tmp_path, model=tiny_model("gpt_neox", num_attention_heads=2), max_steps=2)
    enable_hft(other)
    weights = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    with pytest.raises(SelectionMismatchError, match="another model"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(weights[n], p) for n, p in other.model.named_parameters())


def test_resume_from_a_damaged_checkpoint_manifest_is_an_hft_error(tmp_path):
    trainer = plain_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    enable_hft(trainer)
    trainer.train()
    manifest = tmp_path / "out" / "checkpoint-2" / MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:100])
    again = plain_trainer(tmp_path, max_steps=2)
    enable_hft(again)
    with pytest.raises(ManifestError, match=f"{manifest}.*not valid JSON"):
        again.train(resume_from_checkpoint=True)
