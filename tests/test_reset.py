"""hft_plugin.reset, Half-Reset on models and on checkpoints: the frozen half is the base's, bit for
bit; the rest is the tuned model's; bad input changes and writes nothing. Its output: a symlinked
--out, a signal during the write (a real one, in a subprocess) leaves nothing behind, and a tuned
folder trained with HFT is reset by its own manifest."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from hft_plugin import ConfigError, SelectionMismatchError, select_half
from hft_plugin.cli import main as hft_main
from hft_plugin.boxes import to_mask
from hft_plugin.reset import RESET_MANIFEST_NAME, _Weights, half_reset, half_reset_checkpoint, main
from hft_plugin.selection import MANIFEST_NAME, Selection
from hft_plugin.testing import tiny_model, tiny_tokenizer

from .helpers import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_reset(selection, base: dict, tuned: dict, result: dict) -> dict:
    """Frozen half == base, trained half == tuned, bit for bit; returns counts so callers see it checked something."""
    plan = selection.plan()
    for name in plan.frozen:
        assert torch.equal(result[name], base[name]), f"{name} was not reset to the base"
        assert not torch.equal(result[name], tuned[name])
    for name in plan.trainable:
        assert torch.equal(result[name], tuned[name]), f"{name} lost its tuned values"
    for name, boxes in plan.partial.items():
        keep = to_mask(tuple(result[name].shape), boxes, device="cpu")
        assert torch.equal(result[name][keep], tuned[name][keep]), f"trained region of {name} changed"
        assert torch.equal(result[name][~keep], base[name][~keep]), f"frozen region of {name} was not reset"
    return {"frozen": len(plan.frozen), "trainable": len(plan.trainable), "partial": len(plan.partial)}


def pair(family="llama", **overrides):
    """A base model and a "tuned" one where every tensor differs (norms too, which start at 1)."""
    base, tuned = tiny_model(family, seed=0, **overrides), tiny_model(family, seed=1, **overrides)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    return base, tuned


# -- in memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, strategy, round", [
    ("llama", "category", 0), ("llama", "layer", 1), ("llama", "model", 2), ("phi3", "category", 1),
    ("gpt2", "category", 0), ("qwen3_moe", "category", 0),
])
def test_half_reset_in_memory(family, strategy, round):
    base, tuned = pair(family)
    base_values, tuned_values = snapshot(base), snapshot(tuned)
    selection = half_reset(tuned, base, strategy=strategy, round=round, seed=3)
    counts = check_reset(selection, base_values, tuned_values, snapshot(tuned))
    assert counts["frozen"] + counts["partial"] > 0 and counts["trainable"] > 0
    same = select_half(tuned, round, strategy=strategy, seed=3)
    assert selection.trainable_units == same.trainable_units  # what `hft plan` shows is what was reset
    assert snapshot(base).keys() == base_values.keys()
    assert all(torch.equal(v, base_values[k]) for k, v in snapshot(base).items())  # the base is untouched
    if family == "phi3":
        assert counts["partial"] > 0  # fused qkv/gate_up reset slice by slice


def test_base_as_a_state_dict_and_embeddings_kept_unless_asked():
    base, tuned = pair()
    tuned_values = snapshot(tuned)
    half_reset(tuned, base.state_dict())
    assert torch.equal(tuned.model.embed_tokens.weight, tuned_values["model.embed_tokens.weight"])
    selection = half_reset(tuned, base.state_dict(), train_embeddings=False)
    assert "model.embed_tokens.weight" in selection.plan().frozen
    assert torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_mismatched_base_changes_nothing():
    tuned = tiny_model("llama", seed=1)
    before = snapshot(tuned)
    other = tiny_model("llama", seed=0, intermediate_size=96)
    with pytest.raises(SelectionMismatchError, match=r"mlp\..*shape"):
        half_reset(tuned, other)
    partial = {k: v for k, v in tiny_model("llama").state_dict().items() if "layers.3." not in k}
    with pytest.raises(SelectionMismatchError, match=r"no parameter 'model\.layers\.3\."):
        half_reset(tuned, partial)
    with pytest.raises(ConfigError, match="state dict"):
        half_reset(tuned, 42)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(tuned).items())


def test_package_export_is_the_function_in_either_import_order():
    import hft_plugin
    import hft_plugin.reset  # noqa: F401 - the module has its own name, so it shadows nothing

    base, tuned = pair()
    selection = hft_plugin.half_reset(tuned, base, round=1)
    name = selection.plan().frozen[0]
    assert torch.equal(dict(tuned.named_parameters())[name], dict(base.named_parameters())[name])
    code = ("import hft_plugin, inspect; f = hft_plugin.half_reset; "
            "print(inspect.isfunction(f), f.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split() == ["True", "hft_plugin.reset"], done.stderr


def save(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def reference(tmp_path, family="llama", **kwargs):
    """Base and tuned checkpoints, and what the in-memory reset makes of them."""
    base, tuned = pair(family)
    base_dir = save(base, str(tmp_path / "base"), **kwargs)
    tuned_dir = save(tuned, str(tmp_path / "tuned"), **kwargs)
    expected_model = pair(family)[1]
    selection = half_reset(expected_model, base)
    return base_dir, tuned_dir, selection, snapshot(base), snapshot(tuned), expected_model.state_dict()


def test_checkpoint_single_file(tmp_path):
    base_dir, tuned_dir, selection, base, tuned, expected = reference(tmp_path)
    out = str(tmp_path / "out")
    result_selection = half_reset_checkpoint(base_dir, tuned_dir, out)
    written = load_file(os.path.join(out, "model.safetensors"))
    assert written.keys() == load_file(os.path.join(tuned_dir, "model.safetensors")).keys()
    for name, value in written.items():
        assert torch.equal(value, expected[name]), name
    assert check_reset(result_selection, base, tuned, written)["frozen"] > 0
    assert result_selection.trainable_units == selection.trainable_units
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            MANIFEST_NAME, RESET_MANIFEST_NAME} <= names
    assert Selection.load(out).trainable_units == selection.trainable_units
    record = json.load(open(os.path.join(out, RESET_MANIFEST_NAME)))
    assert record["tensors"]["reset"] == len(selection.plan().frozen)
    assert record["tensors"]["kept"] == len(written) - len(selection.plan().frozen)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)  # a normal checkpoint again
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, expected["model.layers.0.mlp.down_proj.weight"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".hft-half-reset-")]


def test_checkpoint_sharded_with_index_and_fused_tensors(tmp_path):
    base_dir, tuned_dir, selection, base, tuned, expected = reference(tmp_path, family="phi3", max_shard_size="100KB")
    shards = sorted(n for n in os.listdir(tuned_dir) if n.endswith(".safetensors"))
    assert len(shards) > 3 and "model.safetensors.index.json" in os.listdir(tuned_dir)
    out = str(tmp_path / "out")
    half_reset_checkpoint(base_dir, tuned_dir, out, round=0)
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == shards
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index == json.load(open(os.path.join(tuned_dir, "model.safetensors.index.json")))
    written = {}
    for shard in shards:
        written.update(load_file(os.path.join(out, shard)))
    assert check_reset(selection, base, tuned, written)["partial"] > 0
    for name, value in written.items():
        assert torch.equal(value, expected[name]), name


def test_base_sharded_differently_from_tuned(tmp_path):
    base, tuned = pair()
    base_dir = save(base, str(tmp_path / "base"), max_shard_size="100KB")
    tuned_dir = save(tuned, str(tmp_path / "tuned"))
    selection = half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "out"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert check_reset(selection, snapshot(base), snapshot(tuned), written)["frozen"] > 0


def test_checkpoint_keeps_dtype_and_metadata(tmp_path):
    for name, model in zip(("base", "tuned"), pair()):
        model.config.save_pretrained(tmp_path / name)
        save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
                  str(tmp_path / name / "model.safetensors"), metadata={"format": "pt", "note": name})
    half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "out"), round=1, seed=5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "tuned"}
        tensor = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert tensor.dtype == torch.bfloat16


def test_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    import weakref

    base_dir, tuned_dir, *_ = reference(tmp_path, max_shard_size="100KB")
    alive: list[tuple[str, weakref.ref]] = []
    original = _Weights.get

    def get(self, name):
        others = [n for n, ref in alive if ref() is not None and n != name]
        assert not others, f"reading {name} while {others} are still held"
        value = original(self, name)
        alive.append((name, weakref.ref(value)))
        return value

    monkeypatch.setattr(_Weights, "get", get)
    half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "out"))
    assert len(alive) > 20


def test_mismatched_checkpoints_write_nothing(tmp_path):
    save(tiny_model("llama", seed=0), str(tmp_path / "base"))
    save(tiny_model("llama", seed=1, intermediate_size=96), str(tmp_path / "tuned"))
    out = tmp_path / "out"
    with pytest.raises(SelectionMismatchError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 128\] "
                                                     r"in the base checkpoint but \[64, 96\]"):
        half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"), str(out))
    assert not out.exists()
    save(tiny_model("llama", seed=1, num_hidden_layers=2), str(tmp_path / "short"))
    with pytest.raises(SelectionMismatchError, match=r"tensor 'model\.layers\.2\.[^']+' is in the base checkpoint but not in the tuned"):
        half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "short"), str(out))
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["base", "short", "tuned"]


def test_out_must_be_new_and_inputs_must_exist(tmp_path):
    base_dir, tuned_dir, *_ = reference(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with pytest.raises(ConfigError, match="is the tuned directory"):
        half_reset_checkpoint(base_dir, tuned_dir, tuned_dir)
    with pytest.raises(ConfigError, match="no such directory"):
        half_reset_checkpoint(str(tmp_path / "nope"), tuned_dir, str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        half_reset_checkpoint(str(tmp_path / "empty"), tuned_dir, str(tmp_path / "o"))
    (tmp_path / "new").mkdir()  # an empty existing directory is fine
    half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "new"))
    assert "model.safetensors" in os.listdir(tmp_path / "new")


def test_config_that_does_not_match_the_weights(tmp_path):
    base_dir, tuned_dir, *_ = reference(tmp_path)
    config = json.load(open(os.path.join(tuned_dir, "config.json")))
    config["intermediate_size"] = 96
    json.dump(config, open(os.path.join(tuned_dir, "config.json"), "w"))
    with pytest.raises(SelectionMismatchError, match="config does not match the weights"):
        half_reset_checkpoint(base_dir, tuned_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def write_pickle_checkpoint(model, directory, payload=None):
    os.makedirs(directory)
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if payload is not None:
        state["evil"] = payload
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))


def test_pickled_checkpoints_need_the_flag_and_load_weights_only(tmp_path):
    base, tuned = pair()
    write_pickle_checkpoint(base, str(tmp_path / "base"))
    write_pickle_checkpoint(tuned, str(tmp_path / "tuned"))
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="pickled .*--allow-pickle"):
        half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"), out)
    assert not os.path.exists(out)
    selection = half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "tuned"), out, allow_pickle=True)
    written = load_file(os.path.join(out, "model.safetensors"))  # pickles come out as safetensors
    assert check_reset(selection, snapshot(base), snapshot(tuned), written)["frozen"] > 0
    write_pickle_checkpoint(tuned, str(tmp_path / "evil"), payload=Boom())
    with pytest.raises(ConfigError, match="weights_only=True"):
        half_reset_checkpoint(str(tmp_path / "base"), str(tmp_path / "evil"), str(tmp_path / "out2"), allow_pickle=True)
    assert not os.path.exists(tmp_path / "out2")


# -- the command ----------------------------------------------------------------------------------------

def test_hft_half_reset_command(tmp_path, capsys):
    base_dir, tuned_dir, *_ = reference(tmp_path)
    out = str(tmp_path / "out")
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", out, "--round", "2",
                     "--strategy", "layer", "--seed", "4"]) == 0
    assert "reset to base" in capsys.readouterr().out
    saved = Selection.load(out)
    assert (saved.config.round, saved.config.strategy, saved.config.seed) == (2, "layer", 4)
    assert hft_main(["half-reset", "--base", base_dir, "--tuned", tuned_dir, "--out", out]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--base", base_dir, "--tuned", tuned_dir, "--out", out]) == 2  # python -m form, same errors


def test_python_m_half_reset(tmp_path):
    base_dir, tuned_dir, *_ = reference(tmp_path)
    out = str(tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "hft_plugin.reset", "--base", base_dir, "--tuned", tuned_dir,
                           "--out", out, "--ratio", "0.3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "reset to base" in done.stdout
    assert Selection.load(out).config.ratio == 0.3


# -- the output: where it goes, and a write a signal stops ----------------------------------------------

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
    import hft_plugin.weights as weights
    real, calls = weights._uint8, [0]
    def slow():
        calls[0] += 1
        if calls[0] == 3:
            open(sys.argv[1], "w").close()
            time.sleep(120)
        return real()
    weights._uint8 = slow
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
