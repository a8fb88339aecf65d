"""The shielded strategy: importance scores in a checked file, the most important units frozen with
the category rule's shares, and every bad input refused before anything changes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hft_plugin import CalibrationError, ConfigError, ScoresError, UnsupportedModelError, enable_hft, select_half
from hft_plugin.cli import main
from hft_plugin.importance import MIN_TEXTS, SCORES_NAME, Scores, compute_scores
from hft_plugin.selection import MANIFEST_NAME, Selection, read_layout
from hft_plugin.testing import assert_frozen_and_trained, snapshot, tiny_config, tiny_model, tiny_tokenizer

from .helpers import flags

FAST = dict(num_samples=MIN_TEXTS, length=8)  # the smallest accepted calibration: tiny models, fast


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """family -> (model, path of its scores file)."""
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_model(family)
            path = compute_scores(model, **FAST).save(str(tmp_path_factory.mktemp(family)))
            cache[family] = (model, path)
        return cache[family]

    return get


def synthetic(model, values, round=0, **fields) -> Scores:
    """Scores with chosen importances: unit key -> value(key)."""
    layout = read_layout(model)
    return Scores(fingerprint=layout.fingerprint(), round=round, units={u.key: values(u.key) for u in layout.units()},
                  **fields)


# -- the ratio rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "phi3", "gpt_neox", "qwen3_moe"])
def test_exactly_half_of_every_role_at_ratio_one_half(scored, family):
    model, path = scored(family)
    selection = select_half(model, strategy="shielded", scores=path)
    assert selection.trainable_ratio == 0.5
    assert all(g["ratio"] == 0.5 for g in selection.stats()["roles"].values())


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_other_ratios_land_within_one_point(scored, family, ratio):
    model, path = scored(family)
    selection = select_half(model, strategy="shielded", scores=path, ratio=ratio)
    category = select_half(model, ratio=ratio)
    assert abs(selection.trainable_ratio - ratio) <= 0.01 + abs(category.trainable_ratio - ratio)


def test_the_most_important_units_are_frozen(tmp_path):
    model = tiny_model("llama")
    # q and k (attention), gate (mlp) carry the importance: q+k is exactly half of GQA attention.
    weights = {"q_proj": 100.0, "k_proj": 50.0, "gate_proj": 80.0, "up_proj": 10.0, "down_proj": 1.0}
    path = synthetic(model, lambda key: weights.get(key.rsplit(".", 1)[-1], 5.0)
                     if key.endswith("proj") else None).save(str(tmp_path))
    selection = select_half(model, strategy="shielded", scores=path)
    for layer in selection.layout.layers:
        trains = {u.key.rsplit(".", 1)[-1] for u in layer if selection.is_trainable(u.key)}
        assert {"q_proj", "k_proj", "gate_proj"}.isdisjoint(trains)
        assert {"v_proj", "o_proj", "down_proj"} <= trains
    assert selection.trainable_ratio == 0.5


def test_layers_train_the_larger_mlp_subset_where_it_costs_least(tmp_path):
    model = tiny_model("llama")  # 4 layers: 2 train 2 of the 3 MLP matrices, 2 train 1
    cheap = {1, 2}  # in these layers the second-cheapest MLP matrix matters least

    def value(key):
        if not key.endswith("proj"):
            return None
        layer = int(key.split(".")[2])
        return {"gate_proj": 100.0, "up_proj": 1.0 if layer in cheap else 50.0, "down_proj": 0.5}.get(
            key.rsplit(".", 1)[-1], 1.0)

    path = synthetic(model, value).save(str(tmp_path))
    selection = select_half(model, strategy="shielded", scores=path)
    two = [i for i, layer in enumerate(selection.layout.layers)
           if sum(1 for u in layer if u.role == "mlp" and selection.is_trainable(u.key)) == 2]
    assert set(two) == cheap


# -- determinism -------------------------------------------------------------------------------------

def test_same_scores_same_half_and_no_global_random_state_touched(scored):
    model, path = scored("llama")
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    halves = {select_half(model, strategy="shielded", scores=path).trainable_units for _ in range(3)}
    again = compute_scores(model, **FAST)
    assert len(halves) == 1
    assert again.sha256 == Scores.load(path).sha256  # the same seed draws the same samples
    assert torch.equal(torch_state, torch.random.get_rng_state()) and python_state == random.getstate()


def test_scores_do_not_change_the_model():
    model = tiny_model("llama").train()
    before = snapshot(model)
    compute_scores(model, **FAST)
    after = snapshot(model)
    assert model.training and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(m._forward_pre_hooks for m in model.modules())


# -- the scores file ---------------------------------------------------------------------------------

def test_round_trip(scored):
    _, path = scored("llama")
    loaded = Scores.load(path)
    assert Scores.from_json(loaded.to_json()) == loaded
    assert Scores.load(path.rsplit("/", 1)[0]).sha256 == loaded.sha256  # the folder works too
    assert path.endswith(SCORES_NAME)


def test_an_edited_file_is_refused(scored, tmp_path):
    model, path = scored("llama")
    data = json.loads(open(path).read())
    key = next(k for k, v in data["units"].items() if v is not None)
    data["units"][key] *= 1000  # make a unit look important
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(ScoresError, match="edited or damaged"):
        select_half(model, strategy="shielded", scores=str(edited))
    edited.write_text("{not json")
    with pytest.raises(ScoresError, match="not JSON"):
        select_half(model, strategy="shielded", scores=str(edited))


def test_scores_of_another_model_or_round_are_refused(scored):
    _, path = scored("llama")
    other = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(ScoresError, match="another model"):
        select_half(other, strategy="shielded", scores=path)
    model, _ = scored("llama")
    with pytest.raises(ScoresError, match="round 0, but this is round 1"):
        select_half(model, strategy="shielded", scores=path, round=1)


def test_missing_scores_say_how_to_compute_them(tmp_path, scored):
    model, _ = scored("llama")
    with pytest.raises(ScoresError, match="compute_scores"):
        select_half(model, strategy="shielded")
    with pytest.raises(ScoresError, match="does not exist.*compute_scores"):
        select_half(model, strategy="shielded", scores=str(tmp_path / "nowhere.json"))


def test_scores_with_a_strategy_that_reads_none_is_a_config_error(scored):
    model, path = scored("llama")
    with pytest.raises(ConfigError, match="strategy='shielded'"):
        select_half(model, scores=path)


# -- hft plan, the manifest, the Trainer ---------------------------------------------------------------

def test_hft_plan_shows_the_shielded_half(tmp_path, scored, capsys):
    model, path = scored("llama")
    folder = tmp_path / "model"
    tiny_config("llama").save_pretrained(folder)
    assert main(["plan", str(folder), "--strategy", "shielded", "--scores", path]) == 0
    out = capsys.readouterr().out
    assert "strategy=shielded" in out and "importance scores:" in out
    assert main(["plan", str(folder), "--strategy", "shielded", "--scores", path, "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["scores"] == {"file": path, "sha256": Scores.load(path).sha256}
    in_memory = select_half(model, strategy="shielded", scores=path)
    assert {u["key"] for layer in planned["layers"] for u in layer if u["trainable"]} == in_memory.trainable_units
    assert main(["plan", str(folder), "--strategy", "shielded"]) == 2
    assert "compute_scores" in capsys.readouterr().err


def test_trainer_trains_the_shielded_half_and_the_manifest_names_the_scores(tmp_path, scored):
    from ._workers.common import collate, lm_dataset, train_args
    from transformers import Trainer

    _, path = scored("llama")
    model = tiny_model("llama")  # the same weights the scores were computed on
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=model, args=train_args(tmp_path / "out"), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer))
    handle = enable_hft(trainer, strategy="shielded", scores=path)
    assert handle.selection.trainable_units == select_half(model, strategy="shielded", scores=path).trainable_units
    before = snapshot(trainer.model)
    trainer.train()
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(trainer.model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    saved = Selection.load(str(tmp_path / "out"))
    assert saved.config.scores == path and saved.scores_sha256 == Scores.load(path).sha256


def test_trainer_refuses_an_edited_scores_file_before_anything_changes(tmp_path, scored):
    from ._workers.common import collate, lm_dataset, train_args
    from transformers import Trainer

    _, path = scored("llama")
    data = json.loads(open(path).read())
    data["round"] = 3
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=model, args=train_args(tmp_path / "out"), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer))
    with pytest.raises(ScoresError):
        enable_hft(trainer, strategy="shielded", scores=str(edited))
    assert all(flags(model).values())


# -- rounds --------------------------------------------------------------------------------------------

def _round_zero_folder(tmp_path, path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    round0 = select_half(model, strategy="shielded", scores=path)
    folder = tmp_path / "round0"
    model.save_pretrained(folder)
    round0.save(str(folder))
    return round0, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_a_round_can_avoid_what_earlier_rounds_trained(tmp_path, scored):
    _, path = scored("llama")
    round0, loaded = _round_zero_folder(tmp_path, path)
    scores = compute_scores(loaded, round="next", avoid_trained=True, **FAST)
    assert scores.round == 1 and set(scores.trained_before) == round0.trainable_units
    round1_path = scores.save(str(tmp_path / "round1"))
    round1 = select_half(loaded, round="next", scores=round1_path)  # strategy inherited from the manifest
    assert round1.config.round == 1 and round1.config.strategy == "shielded"
    assert round1.trainable_units.isdisjoint(round0.trainable_units)  # at 0.5: exactly what round 0 froze
    assert round1.trainable_ratio == 0.5


def test_a_round_never_repeats_the_previous_half(tmp_path, scored):
    _, path = scored("llama")
    round0, loaded = _round_zero_folder(tmp_path, path)
    # The same importances as round 0's: without the rule, round 1 would freeze the same half again.
    same = Scores.load(path)
    repeat = Scores(fingerprint=same.fingerprint, round=1, units=same.units,
                    previous_trainable=tuple(sorted(round0.trainable_units)))
    round1 = select_half(loaded, strategy="shielded", round=1, scores=repeat.save(str(tmp_path / "r1")))
    assert round1.trainable_units != round0.trainable_units
    assert round1.trainable_ratio == 0.5


# -- bad calibration input -----------------------------------------------------------------------------

def test_bad_calibration_texts_are_refused_before_the_model_runs():
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    before = snapshot(model)
    enough = ["a short text about cats"] * MIN_TEXTS
    with pytest.raises(CalibrationError, match=r"texts=\[\]"):
        compute_scores(model, [], tokenizer)
    with pytest.raises(CalibrationError, match=r"texts\[3\] is ''"):
        compute_scores(model, enough[:3] + [""] + enough[4:], tokenizer)
    with pytest.raises(CalibrationError, match=f"below the minimum of {MIN_TEXTS}"):
        compute_scores(model, enough[:5], tokenizer)
    with pytest.raises(CalibrationError, match="below the minimum"):
        compute_scores(model, num_samples=4)
    with pytest.raises(CalibrationError, match="without a tokenizer"):
        compute_scores(model, enough)
    with pytest.raises(CalibrationError, match="unknown token"):  # a script the tokenizer does not have
        compute_scores(model, ["Привет, как дела у тебя сегодня"] * MIN_TEXTS, tokenizer)
    with pytest.raises(CalibrationError, match="not this model's"):  # ids beyond a 64-token vocabulary
        compute_scores(tiny_model("llama", vocab_size=64), ["zzz ~~~ zzz"] * MIN_TEXTS, tokenizer)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_texts_given_score_the_model():
    model = tiny_model("llama")
    texts = [f"text number {i}: the quick brown fox" for i in range(MIN_TEXTS)]
    scores = compute_scores(model, texts, tiny_tokenizer())
    assert scores.calibration["source"] == "texts" and scores.calibration["num_texts"] == MIN_TEXTS
    assert sum(v is not None for v in scores.units.values()) == 4 * 7  # every projection scored; norms not


def test_a_meta_model_cannot_be_scored():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(UnsupportedModelError, match="meta device"):
        compute_scores(model)


def test_scores_variable_is_checked():
    from hft_plugin.bootstrap.env import load_config

    with pytest.raises(ConfigError, match="HFT_SCORES"):
        load_config({"HFT_STRATEGY": "shielded", "HFT_SCORES": " "})
    assert load_config({"HFT_STRATEGY": "shielded", "HFT_SCORES": "/x/hft_scores.json"}).scores == "/x/hft_scores.json"


def test_ranks_agree_on_the_scores_content_not_only_the_path(tmp_path, scored):
    from hft_plugin.checkpoints import selection_digest

    model, path = scored("llama")
    copy = tmp_path / SCORES_NAME
    copy.write_text(open(path).read())
    first = selection_digest(select_half(model, strategy="shielded", scores=str(copy)))
    rescored = Scores.load(path)
    copy.write_text(Scores(**{**rescored.__dict__, "calibration": {"source": "another rank's copy"}}).to_json())
    assert selection_digest(select_half(model, strategy="shielded", scores=str(copy))) != first
