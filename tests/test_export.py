"""``hft plan --format axolotl|spectrum``: the selection in each tool's own ``unfrozen_parameters``
form, exactly or refused; fed back through Axolotl's own ``freeze_layers_except``, the same tensors
and rows train as under HFT."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from hft_plugin import apply_selection, select_half
from hft_plugin.boxes import ranges, to_mask
from hft_plugin.cli import main
from hft_plugin.export import ExportError, axolotl, spectrum
from hft_plugin.testing import tiny_config, tiny_model

from .helpers import assert_frozen_and_trained, snapshot, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for family in ("llama", "phi3", "gpt2"):
        folder = tmp_path_factory.mktemp(family)
        tiny_config(family).save_pretrained(folder)
        made[family] = str(folder)
    return made


def hft_masks(selection, expressible=None) -> dict[str, torch.Tensor]:
    """Per parameter, the elements HFT trains (only the tensors in ``expressible``, when given)."""
    plan = selection.plan()
    masks = {}
    for name, shape in selection.layout.shapes.items():
        if name in plan.partial:
            mask = to_mask(shape, plan.partial[name], device="cpu")
        else:
            mask = torch.full(shape, name in plan.trainable, dtype=torch.bool)
        masks[name] = mask if expressible is None or name in expressible else torch.zeros_like(mask)
    return masks


# -- the forms -------------------------------------------------------------------------------------------
def test_whole_tensors_are_anchored_regexes_in_both_forms(folders, capsys):
    selection = select_half(tiny_model("llama"), 0)
    for fmt in ("axolotl", "spectrum"):
        code, out, err = _run(capsys, "plan", folders["llama"], "--format", fmt)
        assert code == 0, err
        assert out.startswith("# Half Fine-Tuning, round 0: hft plan ")
        entries = yaml.safe_load(out)["unfrozen_parameters"]
        expected = [n for n in selection.layout.shapes if n in selection.plan().trainable]
        assert entries == [f"^{n}$" for n in expected]


def test_fused_slices_are_axolotl_row_ranges_and_spectrum_refuses_them(folders, capsys):
    selection = select_half(tiny_model("phi3"), 0)
    plan = selection.plan()
    code, out, err = _run(capsys, "plan", folders["phi3"], "--format", "axolotl")
    assert code == 0, err
    entries = yaml.safe_load(out)["unfrozen_parameters"]
    ranged = [e for e in entries if e.endswith("]")]
    assert {e[1:e.index("$")] for e in ranged} == set(plan.partial)
    assert "weight_decay: 0" in out  # says how Axolotl keeps the other rows still
    # Spectrum has no ranges: exit 2, every fused tensor named on its own line, nothing on stdout
    code, out, err = _run(capsys, "plan", folders["phi3"], "--format", "spectrum")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("hft plan: error: Spectrum cannot express the trainable part of 6 tensor(s)")
    assert "--expressible-only" in lines[0]
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == sorted(plan.partial)
    # on request, the rest, with the left-out tensors listed as comments
    code, out, err = _run(capsys, "plan", folders["phi3"], "--format", "spectrum", "--expressible-only")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["unfrozen_parameters"] == [f"^{n}$" for n in selection.layout.shapes if n in plan.trainable]
    assert all(f"#   {name}: trains only" in out for name in plan.partial)


def test_axolotl_refuses_columns_and_names_each_tensor(folders, capsys):
    export = axolotl(select_half(tiny_model("gpt2"), 0))
    # GPT-2's Conv1D c_attn weight is (in, out): q/k/v are columns, which Axolotl's dim-0 ranges cannot
    # carry; its bias (dim 0) can
    assert export.inexpressible and all(n.endswith("attn.c_attn.weight") for n in export.inexpressible)
    assert all("[:, " in why and "dimension 0" in why for why in export.inexpressible.values())
    assert any(re.search(r"c_attn\.bias\$\[\d+:\d+\]$", e) for e in export.entries)
    code, out, err = _run(capsys, "plan", folders["gpt2"], "--format", "axolotl")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 + len(export.inexpressible)
    with pytest.raises(ExportError, match="Axolotl cannot express"):
        export.render()


def test_per_expert_blocks_are_refused_whole_experts_are_ranges():
    selection = select_half(tiny_model("mixtral"), 0)
    export = axolotl(selection)
    plan = selection.plan()
    gate_up = {n for n in plan.partial if n.endswith("experts.gate_up_proj")}
    down = {n for n in plan.partial if n.endswith("experts.down_proj")}
    assert gate_up and down
    assert set(export.inexpressible) <= gate_up  # the gate or up half of one expert: not whole dim-0 slices
    assert {e[1:e.index("$")] for e in export.entries if e.endswith("]")} >= down  # whole experts: [e:e+1]


def test_row_ranges_are_exact():
    assert ranges((8, 4), [((0, 2, 4),), ((0, 4, 6),)]) == [(2, 6)]
    # the two halves of rows 0:2 along dimension 1 together make whole rows
    assert ranges((8, 4), [((0, 0, 2), (1, 0, 2)), ((0, 0, 2), (1, 2, 4))]) == [(0, 2)]
    assert ranges((8, 4), [((0, 0, 2), (1, 0, 2))]) is None
    assert ranges((2, 8, 4), [((0, 1, 2), (2, 0, 4))]) == [(1, 2)]  # a constraint spanning its dim
    assert ranges((2, 8, 4), [((0, 1, 2), (1, 0, 4))]) is None


def test_one_round_per_export_and_json_is_the_selection(folders, capsys):
    code, _, err = _run(capsys, "plan", folders["llama"], "--rounds", "0-1", "--format", "axolotl")
    assert code == 2 and "--round N" in err
    code, out, _ = _run(capsys, "plan", folders["llama"], "--format", "json", "--round", "2")
    assert code == 0 and json.loads(out)["config"]["round"] == 2


# -- fed back through Axolotl's own parser ---------------------------------------------------------------
def axolotl_site() -> str:
    """A folder holding Axolotl's package (``pip install --no-deps --target DIR axolotl``), or "" when
    it is importable as installed."""
    site = os.environ.get("HFT_AXOLOTL_SITE", "")
    if site and os.path.isfile(os.path.join(site, "axolotl", "utils", "freeze.py")):
        return site
    if importlib.util.find_spec("axolotl") is not None:
        return ""
    pytest.skip("Axolotl is not installed: pip install --no-deps --target DIR axolotl==0.19.0 and set "
                "HFT_AXOLOTL_SITE=DIR (.ci/run does)")


CASES = {  # family, strategy, expressible only
    "llama-category": ("llama", "category", False),
    "phi3-category": ("phi3", "category", False),       # fused qkv_proj / gate_up_proj: row ranges
    "gpt_neox-category": ("gpt_neox", "category", False),  # q/k/v interleaved per head: many row ranges
    "gpt2-layer": ("gpt2", "layer", False),             # whole layers: every tensor whole
    "gpt2-category": ("gpt2", "category", True),        # c_attn columns left out
    "mixtral-category": ("mixtral", "category", True),  # stacked experts: whole experts as ranges
}


def test_axolotl_freeze_layers_except_trains_exactly_what_hft_trains(tmp_path):
    site = axolotl_site()
    selections, exports = {}, {}
    for key, (family, strategy, partial) in CASES.items():
        selections[key] = select_half(tiny_model(family), 0, strategy=strategy)
        exports[key] = axolotl(selections[key])
        assert bool(exports[key].inexpressible) == partial, key
        # what Axolotl reads is the YAML the command prints
        exports[key] = yaml.safe_load(exports[key].render(expressible_only=partial))["unfrozen_parameters"]
    cases_file, out_file = tmp_path / "cases.json", tmp_path / "out.pt"
    cases_file.write_text(json.dumps({k: {"family": CASES[k][0], "patterns": exports[k]} for k in CASES}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, site) if p))
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_workers", "axolotl_freeze.py"),
                           str(cases_file), str(out_file)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out_file)
    for key, (family, strategy, partial) in CASES.items():
        selection = selections[key]
        left_out = set(axolotl(selection).inexpressible)
        expected = hft_masks(selection, expressible=set(selection.layout.shapes) - left_out)
        got = results[key]["masks"]
        assert set(got) == set(expected), key
        for name in expected:
            assert torch.equal(got[name], expected[name]), (key, name)
        if partial:
            continue
        # trained for a few SGD steps under Axolotl's freezing: frozen elements bit-identical, every
        # trainable tensor and region moved, and the weights where HFT's own run takes them
        assert_frozen_and_trained(selection, results[key]["before"], results[key]["after"])
        model = tiny_model(family)
        handle = apply_selection(model, selection)
        hft_before = snapshot(model)
        assert set(hft_before) == set(results[key]["before"]), key
        for name, tensor in results[key]["before"].items():
            assert torch.equal(tensor, hft_before[name]), (key, name)  # both runs start from the same weights
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.05)
        handle.attach(optimizer)
        torch.manual_seed(0)  # GPT-2's dropout draws from the global generator
        train_steps(model, optimizer, steps=3, handle=handle)
        hft_after = snapshot(model)
        assert_frozen_and_trained(selection, hft_before, hft_after)  # HFT's own run keeps its promise too
        plan = selection.plan()
        frozen = set(plan.frozen)
        assert set(results[key]["after"]) == set(hft_after), key
        for name, tensor in results[key]["after"].items():
            if not plan.partial or name in frozen:
                # no fused tensor trains in part (every sum taken in the same order), or the tensor is
                # frozen: bit for bit
                assert torch.equal(tensor, hft_after[name]), (key, name)
            else:
                # to float tolerance: HFT computes a fused tensor's trainable rows as their own
                # parameter, Axolotl masks the full gradient, so sums are taken in a different order
                torch.testing.assert_close(tensor, hft_after[name], atol=1e-6, rtol=1e-5, msg=f"{key}: {name}")


def test_spectrum_yaml_through_axolotl_and_a_plain_regex_loop(tmp_path):
    site = axolotl_site()
    selection = select_half(tiny_model("llama"), 1)
    entries = yaml.safe_load(spectrum(selection).render())["unfrozen_parameters"]
    expected = hft_masks(selection)
    # a loop that reads the YAML with plain regexes (dots as wildcards) picks the same tensors
    names = list(selection.layout.shapes)
    assert [n for n in names if any(re.match(e, n) for e in entries)] == [n for n in names if expected[n].all()]
    cases_file, out_file = tmp_path / "cases.json", tmp_path / "out.pt"
    cases_file.write_text(json.dumps({"llama": {"family": "llama", "patterns": entries}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, site) if p))
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_workers", "axolotl_freeze.py"),
                           str(cases_file), str(out_file)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out_file)["llama"]["masks"]
    assert all(torch.equal(got[n], expected[n]) for n in names)
