"""The ``hft`` command: the plan table, JSON, the heatmap, errors (exit 2, one line) and help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hft_plugin import Selection, select_half
from hft_plugin.cli import parse_rounds
from hft_plugin.report import layer_grid, render_table
from hft_plugin.testing import tiny_config, tiny_model

from .helpers import run_hft


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_config("llama").save_pretrained(folder)
    return str(folder)


def test_plan_prints_the_layer_table_and_the_shares(model_dir, capsys):
    code, out, err = run_hft(capsys, "plan", model_dir, "--round", "1")
    assert code == 0, err
    assert "meta device, no weights read" in out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert header.split()[:8] == ["layer", "q", "k", "v", "o", "gate", "up", "down"]
    expected = select_half(tiny_model("llama"), 1)
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == 4
    # every cell of the table says what the selection says
    for layer, row in enumerate(rows):
        assert row[-1].endswith("%")  # the layer's trained share
        for column, mark in zip(header.split()[1:-1], row[1:-1]):
            proj = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                    "input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm"}[column]
            assert (mark == "T") == expected.is_trainable(f"model.layers.{layer}.{proj}"), (layer, column)
    assert "layers (HFT ratio)" in out and "50.00%" in out


def test_plan_json_is_the_selection(model_dir, capsys):
    code, out, _ = run_hft(capsys, "plan", os.path.join(model_dir, "config.json"), "--json", "--ratio", "0.3",
                        "--strategy", "layer", "--seed", "3", "--freeze-embeddings")
    assert code == 0
    selection = Selection.from_json(out)
    expected = select_half(tiny_model("llama"), 0, strategy="layer", ratio=0.3, seed=3, train_embeddings=False)
    assert selection.trainable_units == expected.trainable_units
    assert selection.fingerprint == expected.fingerprint
    assert selection.config == expected.config


def test_plan_rounds_json_is_a_list_and_the_plot_is_written(model_dir, tmp_path, capsys):
    picture = tmp_path / "rounds.png"
    code, out, err = run_hft(capsys, "plan", model_dir, "--rounds", "0-2", "--json", "--plot", str(picture))
    assert code == 0, err
    rounds = json.loads(out)
    assert [r["config"]["round"] for r in rounds] == [0, 1, 2]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000
    assert "wrote" in err  # stdout stays pure JSON


def test_fused_and_expert_columns():
    phi3 = layer_grid(select_half(tiny_model("phi3"), 0))
    assert phi3.columns[:7] == ["q", "k", "v", "o", "gate", "up", "down"]
    mixtral = select_half(tiny_model("mixtral"), 0)
    grid = layer_grid(mixtral)
    assert {"experts.gate", "experts.up", "experts.down", "router"} <= set(grid.columns)
    cell = grid.rows[0][grid.columns.index("experts.gate")]
    trained = sum(mixtral.is_trainable(f"model.layers.0.mlp.experts:{e}.gate") for e in range(4))
    assert (cell.units, cell.trained_units) == (4, trained)
    assert f"{trained}/4" in render_table(grid)
    gpt2 = layer_grid(select_half(tiny_model("gpt2"), 0))
    assert "attn.c_proj" in gpt2.columns and "mlp.c_proj" in gpt2.columns  # same leaf name, told apart


@pytest.mark.parametrize("argv, message", [
    (["plan", "/no/such/model"], "no such file or directory"),
    (["plan", "{tmp}"], "has no config.json"),
    (["plan", "{tmp}/bad.json"], "unknown model type 'not-a-model'"),
    (["plan", "{tmp}/broken.json"], "not a readable JSON model config"),
    (["plan", "{model}", "--strategy", "nope"], "unknown strategy 'nope'"),
])
def test_errors_are_one_line_and_exit_2(argv, message, model_dir, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "not-a-model"}))
    (tmp_path / "broken.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    code, out, err = run_hft(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("hft plan: error: ") and message in err


def test_bad_option_values_exit_2(model_dir, capsys):
    assert run_hft(capsys, "plan", model_dir, "--ratio", "1.5")[0] == 2
    assert run_hft(capsys, "plan", model_dir, "--rounds", "3-1")[0] == 2
    assert run_hft(capsys, "plan", model_dir, "--round", "1", "--rounds", "0-1")[0] == 2
    assert run_hft(capsys)[0] == 2  # no command: usage on stderr


def test_parse_rounds():
    assert parse_rounds("0-3") == [0, 1, 2, 3]
    assert parse_rounds("0,2,5") == [0, 2, 5]
    assert parse_rounds("4") == [4]


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"]])
def test_help(argv, capsys):
    code, out, _ = run_hft(capsys, *argv)
    assert code == 0 and "usage: hft" in out
    if argv[0] == "plan":
        for option in ("--strategy", "--ratio", "--seed", "--round", "--rounds", "--json", "--plot", "--freeze-embeddings"):
            assert option in out
    else:
        for command in ("plan", "half-reset", "run"):
            assert command in out


def test_half_reset_and_run_are_subcommands(capsys, tmp_path):
    code, out, _ = run_hft(capsys, "half-reset", "--help")
    assert code == 0 and "usage: hft half-reset" in out and "--base" in out
    code, out, err = run_hft(capsys, "half-reset", "--base", str(tmp_path / "a"), "--tuned", str(tmp_path / "b"),
                          "--out", str(tmp_path / "c"))
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("hft half-reset: error: ")
    code, out, err = run_hft(capsys, "run", "--help")
    assert code == 0 and "COMMAND" in out + err


def test_run_delegates_to_hft_run(capsys):
    # a bad value is refused before anything runs, with hft-run's own message and exit code
    code, _, err = run_hft(capsys, "run", "--ratio", "2", "--", sys.executable, "-c", "pass")
    assert code == 2 and "ratio" in err.lower()


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_python_dash_m(model_dir):
    done = subprocess.run([sys.executable, "-m", "hft_plugin", "plan", model_dir, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Selection.from_json(done.stdout).config.round == 0
    done = subprocess.run([sys.executable, "-m", "hft_plugin", "plan", "/no/such/model"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("hft plan: error: no such file or directory: /no/such/model;")


@pytest.mark.parametrize("option, value", [("--round", "1_0"), ("--round", "+1"), ("--seed", "1_0"), ("--seed", "٣"),
                                           ("--ratio", "0_5"), ("--ratio", "inf")])
def test_flags_are_parsed_as_strictly_as_the_variables(model_dir, tmp_path, capsys, option, value):
    # int("1_0") is 10 and float("0_5") is 0.5: `hft plan --round 1_0` planned round 10, as HFT_ROUND=1_0 once did
    code, out, err = run_hft(capsys, "plan", model_dir, option, value)
    assert code == 2 and out == "" and f"{option}={value!r}" in err
    code, _, err = run_hft(capsys, "half-reset", "--base", model_dir, "--tuned", model_dir, "--out", str(tmp_path / "out"),
                        option, value)
    assert code == 2 and f"{option}={value!r}" in err and not (tmp_path / "out").exists()


def test_round_next_plans_the_round_after_the_folders_manifest(tmp_path, capsys, caplog):
    # as round="next" and HFT_ROUND=next do: the folder's hft_selection.json says round 2 with the
    # layer strategy and seed 7, so "next" is round 3 with those options unless a flag sets one
    folder = tmp_path / "round2"
    tiny_config("llama").save_pretrained(folder)
    select_half(tiny_model("llama"), round=2, strategy="layer", seed=7).save(str(folder))
    code, out, _ = run_hft(capsys, "plan", str(folder), "--round", "next", "--format", "json")
    plan = json.loads(out)["config"]
    assert code == 0 and (plan["round"], plan["strategy"], plan["seed"]) == (3, "layer", 7)
    code, out, _ = run_hft(capsys, "plan", str(folder), "--round", "next", "--seed", "1", "--format", "json")
    assert code == 0 and (json.loads(out)["config"]["round"], json.loads(out)["config"]["seed"]) == (3, 1)
    # a folder without a manifest (a base model) starts at round 0, saying so
    tiny_config("llama").save_pretrained(tmp_path / "base")
    code, out, _ = run_hft(capsys, "plan", str(tmp_path / "base"), "--round", "next", "--format", "json")
    assert code == 0 and json.loads(out)["config"]["round"] == 0 and "starting at round 0" in caplog.text


def test_plan_of_rounds_that_already_ran_notes_it_and_warns_of_no_training(tmp_path, capsys, caplog):
    """`hft plan --rounds 0-1` on a round-0 folder warned that "training it again trains the same
    half": a plan trains nothing. It says, once, which rounds ran and which is next."""
    import logging

    tiny_config("llama").save_pretrained(tmp_path)
    select_half(tiny_model("llama"), round=0).save(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        code, out, err = run_hft(capsys, "plan", str(tmp_path), "--rounds", "0-1")
    assert code == 0, err
    assert "trains the same half" not in caplog.text + err
    assert err.count("note:") == 1 and "says round 0 already ran on these weights (rounds run: 0); the next round " \
                                       "is 1 (--round next)." in err
    assert out.count("HFT selection:") == 2 and "note:" not in out
    code, out, err = run_hft(capsys, "plan", str(tmp_path), "--round", "1", "--json")
    assert code == 0 and err == "" and json.loads(out)["history"][0]["round"] == 0
