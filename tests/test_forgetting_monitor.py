"""The forgetting monitor: its numbers against a hand computation, a run with it bit-identical to
one without, the budget's stop, the probes file across resumes and rounds, bad input, ``hft
forgetting``, TRL, and zero-code activation."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hft_plugin import (ConfigError, IntegrationError, ProbeTextsError, apply_selection, enable_hft, select_half,
                        watch_forgetting)
from hft_plugin.adapters.watch import forgetting_monitor
from hft_plugin.bootstrap import env
from hft_plugin.cli import main
from hft_plugin.forgetting import (PROBES_FILE, BaseSnapshot, Probes, measure, read_texts, sample_probes,
                                   trained_tensors)
from hft_plugin.testing import tiny_model, tiny_tokenizer

from ._workers.common import collate, lm_dataset, sft_dataset, train_args
from .helpers import clean_env
from .test_bootstrap_startup import PTH_SOURCE, ROOT

SMALL = dict(samples=4, length=16)


def trainer_for(model, output_dir, tokenizer=True, **overrides):
    from transformers import Trainer

    tok = tiny_tokenizer()
    values = dict(max_steps=6)
    values.update(overrides)
    return Trainer(model=model, args=train_args(output_dir, **values), train_dataset=lm_dataset(tok, 32),
                   data_collator=collate(tok), processing_class=tok if tokenizer else None)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logged(trainer, key="forgetting/kl") -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def perturb(model, scale=0.05, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


# -- the measurement -----------------------------------------------------------------------------------
def test_kl_of_a_model_against_its_own_values_is_zero():
    model = tiny_model("llama")
    probes = sample_probes(model, count=4, length=16, start_token_id=1)
    result = measure(model, probes, BaseSnapshot.capture(model))
    assert result.kl == 0.0 and result.nll_delta == 0.0 and result.per_probe_kl == [0.0] * 4
    assert result.tokens == probes.scored_tokens > 0


def hand_kl_and_nll(base, tuned, probes):
    """Probe by probe, unbatched and unpadded, with torch's own kl_div and the model's own loss."""
    kl = nll = base_nll = 0.0
    with torch.no_grad():
        for ids in probes.token_ids:
            x = torch.tensor([ids])
            b, t = base(input_ids=x).logits[0, :-1].log_softmax(-1), tuned(input_ids=x).logits[0, :-1].log_softmax(-1)
            kl += float(F.kl_div(t, b, log_target=True, reduction="sum"))
            n = len(ids) - 1
            nll += float(tuned(input_ids=x, labels=x).loss) * n
            base_nll += float(base(input_ids=x, labels=x).loss) * n
    tokens = probes.scored_tokens
    return kl / tokens, (nll - base_nll) / tokens


def test_values_equal_a_direct_computation():
    base = tiny_model("llama").eval()
    tuned = perturb(copy.deepcopy(base)).eval()
    probes = sample_probes(base, count=5, length=12, start_token_id=1, tokenizer=tiny_tokenizer())
    kl, nll_delta = hand_kl_and_nll(base, tuned, probes)
    separate = measure(tuned, probes, base, batch_size=2)
    assert separate.kl == pytest.approx(kl, rel=1e-5) and kl > 1e-4
    assert separate.nll_delta == pytest.approx(nll_delta, rel=1e-4, abs=1e-6)
    # the same base kept as a snapshot of one model that then moves: the same numbers
    model = copy.deepcopy(base)
    snapshot = BaseSnapshot.capture(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), tuned.parameters()):
            p.copy_(q)
    swapped = measure(model, probes, snapshot, batch_size=3)
    assert swapped.kl == pytest.approx(separate.kl, rel=1e-6)
    assert swapped.nll_delta == pytest.approx(separate.nll_delta, rel=1e-6, abs=1e-9)


def test_right_padding_scores_only_real_tokens():
    base = tiny_model("llama").eval()
    tuned = perturb(copy.deepcopy(base)).eval()
    probes = Probes([[1, 5, 6, 7, 8, 9, 10], [1, 40, 41], [1, 70, 71, 72, 2]], [None] * 3, "texts", 96)
    kl, nll_delta = hand_kl_and_nll(base, tuned, probes)
    result = measure(tuned, probes, base, batch_size=3)
    assert result.tokens == 6 + 2 + 4
    assert result.kl == pytest.approx(kl, rel=1e-5) and result.nll_delta == pytest.approx(nll_delta, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "mixtral"])
def test_measuring_changes_nothing(family):
    model = tiny_model(family)
    handle = apply_selection(model, select_half(model, round=0))
    snapshot = BaseSnapshot.capture(model)
    perturb(model)  # the trained values the exchange must put back
    model.train()
    model.model.layers[1].eval()  # a module in its own mode: restored as it was, not to the model's
    before, flags = weights(model), {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    result = measure(model, sample_probes(model, count=3, length=10, start_token_id=1), snapshot)
    assert result.kl > 0
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(rng, torch.random.get_rng_state())
    handle.remove()


def test_sampling_has_a_generator_of_its_own():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    rng = torch.random.get_rng_state()
    first = sample_probes(model, count=6, length=20, tokenizer=tokenizer)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert sample_probes(model, count=6, length=20, tokenizer=tokenizer).token_ids == first.token_ids
    assert sample_probes(model, count=6, length=20, seed=1, tokenizer=tokenizer).token_ids != first.token_ids
    assert all(ids[0] == tokenizer.bos_token_id and 2 <= len(ids) <= 20 for ids in first.token_ids)
    assert first.texts[0] == tokenizer.decode(first.token_ids[0])


def test_a_sample_ends_at_its_first_end_of_sequence_token():
    model = tiny_model("llama")
    with torch.no_grad():  # make the end-of-sequence token (2) likely
        model.lm_head.weight[2] += 3.0
        model.model.norm.weight.fill_(5.0)
    probes = sample_probes(model, count=8, length=24, start_token_id=1)
    ended = [ids for ids in probes.token_ids if ids[-1] == 2]
    assert ended and all(2 not in ids[1:-1] for ids in ended)
    assert any(len(ids) < 24 for ids in probes.token_ids)


def test_trained_tensors_keep_partly_trained_tensors_whole():
    model = tiny_model("phi3")
    everything = {n for n, _ in model.named_parameters()}
    assert set(trained_tensors(model)) == everything  # no HFT: all that requires grad
    handle = apply_selection(model, select_half(model, round=0))
    plan = handle.selection.plan()
    names = set(trained_tensors(model))
    assert set(plan.partial) and set(plan.partial) <= names
    assert set(plan.trainable) <= names and not names & set(plan.frozen)
    assert names <= everything  # whole tensors of the model by their own names, no region parameters
    snapshot = BaseSnapshot.capture(model)
    assert snapshot.nbytes < sum(p.numel() * 4 for n, p in model.named_parameters() if n in everything) * 0.8
    handle.remove()


# -- in the Trainer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, hft", [("llama", False), ("phi3", True)])
def test_a_run_with_the_monitor_is_bit_identical_to_one_without(tmp_path, family, hft):
    runs = []
    for watched in (False, True):
        model = tiny_model(family)
        trainer = trainer_for(model, tmp_path / f"{watched}")
        if hft:
            enable_hft(trainer)
        if watched:
            watch_forgetting(trainer, every=2, **SMALL)
        trainer.train()
        runs.append((weights(model), logged(trainer, "loss"), trainer))
    (without, losses, _), (with_monitor, watched_losses, trainer) = runs
    assert without.keys() == with_monitor.keys()
    assert all(torch.equal(without[k], with_monitor[k]) for k in without)
    assert losses == watched_losses and len(losses) == 6
    assert sorted(logged(trainer)) == [2, 4, 6]


def test_logged_through_the_trainer_and_recorded(tmp_path, caplog):
    trainer = trainer_for(tiny_model("llama"), tmp_path)
    enable_hft(trainer)
    monitor = watch_forgetting(trainer, every=2, **SMALL)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    kl, delta = logged(trainer), logged(trainer, "forgetting/nll_delta")
    assert kl == {h["step"]: h["forgetting/kl"] for h in monitor.history}
    assert sorted(delta) == [2, 4, 6] and monitor.last.kl == kl[6]
    assert 0 < kl[2] < kl[6]  # the model moves away from its base as it trains
    started = [r.getMessage() for r in caplog.records if "forgetting monitor:" in r.getMessage()]
    assert len(started) == 1 and "every 2 steps" in started[0] and "4 samples" in started[0]


def test_the_last_step_is_measured_between_measurements(tmp_path):
    trainer = trainer_for(tiny_model("llama"), tmp_path, max_steps=5)
    watch_forgetting(trainer, every=3, **SMALL)
    trainer.train()
    assert sorted(logged(trainer)) == [3, 5]


def test_the_budget_stops_training_at_the_first_measurement_above_it(tmp_path, caplog):
    trainer = trainer_for(tiny_model("llama"), tmp_path, save_strategy="steps", save_steps=100)
    monitor = watch_forgetting(trainer, every=2, max_kl=1e-9, **SMALL)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    assert trainer.state.global_step == 2 and monitor.stopped_at == 2
    lines = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
    assert len(lines) == 1
    assert "at step 2" in lines[0] and f"{monitor.last.kl:.6g}" in lines[0] and "max_kl = 1e-09" in lines[0]
    assert (tmp_path / "checkpoint-2").is_dir()  # the Trainer's stop: its save strategy applied


def test_a_budget_not_reached_lets_training_finish(tmp_path):
    trainer = trainer_for(tiny_model("llama"), tmp_path)
    monitor = watch_forgetting(trainer, every=2, max_kl=1e6, **SMALL)
    trainer.train()
    assert trainer.state.global_step == 6 and monitor.stopped_at is None


def test_probes_are_written_and_a_resume_measures_against_the_same_base(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = trainer_for(tiny_model("llama"), out, max_steps=4, save_strategy="steps", save_steps=2)
    watch_forgetting(trainer, every=2, **SMALL)
    trainer.train()
    written = Probes.load(str(out / PROBES_FILE))
    assert written.source == "samples" and len(written) == 4
    assert Probes.load(str(out / "checkpoint-2" / PROBES_FILE)).token_ids == written.token_ids
    uninterrupted = logged(trainer)

    def no_new_samples(*args, **kwargs):
        raise AssertionError("the probes file should have been reused")

    monkeypatch.setattr("hft_plugin.adapters.watch.sample_probes", no_new_samples)
    resumed = trainer_for(tiny_model("llama"), out, max_steps=4, save_strategy="steps", save_steps=2)
    monitor = watch_forgetting(resumed, every=2, **SMALL)  # before train(): the base is the fresh model
    assert monitor.probes.token_ids == written.token_ids
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert [h["step"] for h in monitor.history] == [4]
    assert monitor.history[0]["forgetting/kl"] == pytest.approx(uninterrupted[4], rel=1e-6)


def test_a_later_round_reuses_the_probes_of_the_folder_it_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    first = trainer_for(tiny_model("llama"), tmp_path / "round0", max_steps=2)
    enable_hft(first, round=0)
    watch_forgetting(first, every=2, **SMALL)
    first.train()
    first.save_model()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "round0")
    second = trainer_for(model, tmp_path / "round1", max_steps=2)
    enable_hft(second, round="next")
    monitor = watch_forgetting(second, every=2, **SMALL)
    assert monitor.probes.token_ids == Probes.load(str(tmp_path / "round0" / PROBES_FILE)).token_ids


def test_user_texts_are_measured_and_recorded(tmp_path):
    texts = tmp_path / "general.txt"
    texts.write_text("the sun is hot today.\n\nrain falls on the roof.\n")
    trainer = trainer_for(tiny_model("llama"), tmp_path / "out", max_steps=2)
    monitor = watch_forgetting(trainer, every=2, texts=str(texts))
    trainer.train()
    saved = Probes.load(str(tmp_path / "out" / PROBES_FILE))
    assert saved.source == "texts" and saved.texts == ["the sun is hot today.", "rain falls on the roof."]
    assert saved.token_ids == [tiny_tokenizer()(t)["input_ids"] for t in saved.texts]
    assert sorted(logged(trainer)) == [2] and monitor.probes.texts == saved.texts


def test_without_a_tokenizer_it_says_so_once_and_measures_token_ids(tmp_path, caplog):
    trainer = trainer_for(tiny_model("llama"), tmp_path, tokenizer=False, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        monitor = watch_forgetting(trainer, every=2, **SMALL)
        trainer.train()
    assert sum("no tokenizer" in r.getMessage() for r in caplog.records) == 1
    assert monitor.probes.texts == [None] * 4 and sorted(logged(trainer)) == [2, 4]
    with pytest.raises(ProbeTextsError, match="need a tokenizer"):
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path / "b", tokenizer=False), texts=["some text"])


def test_a_second_call_warns_and_keeps_the_first(tmp_path, caplog):
    trainer = trainer_for(tiny_model("llama"), tmp_path)
    monitor = watch_forgetting(trainer, **SMALL)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        assert watch_forgetting(trainer, every=3, **SMALL) is monitor
    assert "already watched" in caplog.text and forgetting_monitor(trainer) is monitor
    assert sum(c is monitor for c in trainer.callback_handler.callbacks) == 1
    monitor.remove()
    assert monitor not in trainer.callback_handler.callbacks and forgetting_monitor(trainer) is None


def test_declines_in_one_line_where_no_process_holds_the_whole_model(tmp_path, caplog):
    trainer = trainer_for(tiny_model("llama"), tmp_path, max_steps=2)
    trainer.is_fsdp_enabled = True  # as accelerate sets it for an FSDP run
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        monitor = watch_forgetting(trainer, **SMALL)
    assert monitor.declined.startswith("FSDP shards the weights") and monitor.base is None
    assert [r.getMessage() for r in caplog.records if "monitor is off" in r.getMessage()] == [
        f"hft_plugin: the forgetting monitor is off: {monitor.declined}."]


# -- bad input: typed errors naming the value, before anything changes ---------------------------------
@pytest.mark.parametrize("every", [0, -1, 1.5, True, "3", None])
def test_every_must_be_a_positive_int(tmp_path, every):
    trainer = trainer_for(tiny_model("llama"), tmp_path)
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(ConfigError, match=f"every={every!r}"):
        watch_forgetting(trainer, every=every)
    assert trainer.callback_handler.callbacks == callbacks


@pytest.mark.parametrize("max_kl", [0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_the_budget_must_be_a_positive_number(tmp_path, max_kl):
    with pytest.raises(ConfigError, match=f"max_kl={max_kl!r}"):
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path), max_kl=max_kl)


@pytest.mark.parametrize("content, match", [
    (b"", "holds no text"), (b"\n  \n", "holds no text"), (b"\xff\xfe bad", "cannot be read"),
])
def test_an_empty_or_unreadable_texts_file(tmp_path, content, match):
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    with pytest.raises(ProbeTextsError, match=match) as info:
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path / "out"), texts=str(path))
    assert str(path) in str(info.value)
    assert not (tmp_path / "out" / PROBES_FILE).exists()


def test_missing_and_malformed_texts_files(tmp_path):
    trainer = trainer_for(tiny_model("llama"), tmp_path / "out")
    with pytest.raises(ProbeTextsError, match="nope.txt.*cannot be read"):
        watch_forgetting(trainer, texts=str(tmp_path / "nope.txt"))
    (tmp_path / "t.json").write_text('{"a": 1}')
    with pytest.raises(ProbeTextsError, match="t.json.*list of strings"):
        watch_forgetting(trainer, texts=str(tmp_path / "t.json"))
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(ProbeTextsError, match="t.jsonl"):
        watch_forgetting(trainer, texts=str(tmp_path / "t.jsonl"))
    (tmp_path / "ok.jsonl").write_text('{"text": "one"}\n"two"\n')
    assert read_texts(str(tmp_path / "ok.jsonl")) == ["one", "two"]


@pytest.mark.parametrize("texts, match", [
    ([], r"texts=\[\] holds no text"), (["fine", "  "], "#1 .* is empty"), (["x"], "#0 .* 2 tokens or more"),
    ("", "cannot be read"),
])
def test_bad_texts(tmp_path, texts, match):
    with pytest.raises(ProbeTextsError, match=match):
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path), texts=texts)


def test_a_text_longer_than_the_context_is_refused_before_training(tmp_path):
    trainer = trainer_for(tiny_model("llama", max_position_embeddings=32), tmp_path)
    with pytest.raises(ProbeTextsError, match=r"#1 \('b{40}.*40 tokens long, longer than the model's context of 32"):
        watch_forgetting(trainer, texts=["short one", "b" * 40])
    with pytest.raises(ConfigError, match="length=64 is longer than the model's context of 32"):
        watch_forgetting(trainer)


def test_a_probes_file_of_another_model_is_refused(tmp_path):
    (tmp_path / PROBES_FILE).write_text(json.dumps(Probes([[1, 500, 3]], [None], "samples", 1000).to_dict()))
    with pytest.raises(ProbeTextsError, match=f"{PROBES_FILE} holds token id 500, outside this model's vocabulary of 96"):
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path))
    (tmp_path / PROBES_FILE).write_text("{broken")
    with pytest.raises(ProbeTextsError, match="cannot read the probes file"):
        watch_forgetting(trainer_for(tiny_model("llama"), tmp_path))


def test_other_bad_options(tmp_path):
    trainer = trainer_for(tiny_model("llama"), tmp_path)
    with pytest.raises(ConfigError, match="base_device='nowhere'"):
        watch_forgetting(trainer, base_device="nowhere")
    with pytest.raises(ConfigError, match="samples=0"):
        watch_forgetting(trainer, samples=0)
    with pytest.raises(IntegrationError, match="needs a transformers.Trainer"):
        watch_forgetting(object())


# -- hft forgetting ------------------------------------------------------------------------------------
@pytest.fixture
def checkpoints(tmp_path):
    base, tuned = tiny_model("llama"), perturb(tiny_model("llama"))
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    return tmp_path / "base", tmp_path / "tuned", base, tuned


def test_hft_forgetting_prints_the_measurement(checkpoints, capsys):
    base_dir, tuned_dir, base, tuned = checkpoints
    assert main(["forgetting", str(base_dir), str(tuned_dir), "--samples", "4", "--length", "16", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    probes = sample_probes(base, count=4, length=16, tokenizer=tiny_tokenizer())
    expected = measure(tuned, probes, base)
    assert printed["forgetting/kl"] == pytest.approx(expected.kl, rel=1e-6) and expected.kl > 0
    assert printed["forgetting/nll_delta"] == pytest.approx(expected.nll_delta, rel=1e-6, abs=1e-9)
    assert main(["forgetting", str(base_dir), str(base_dir), "--samples", "4", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert "forgetting/kl         0.000000 nats per token" in out and "+0.000000" in out


def test_hft_forgetting_uses_the_runs_probes_or_given_texts(checkpoints, capsys, tmp_path):
    base_dir, tuned_dir, base, tuned = checkpoints
    probes = Probes([[1, 10, 20, 30, 40]], [None], "samples", 96, seed=0, length=5, start_token_id=1)
    probes.save(str(tuned_dir))
    assert main(["forgetting", str(base_dir), str(tuned_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "the run's own" in printed["probes"] and printed["tokens"] == 4
    assert printed["forgetting/kl"] == pytest.approx(measure(tuned, probes, base).kl, rel=1e-6)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat.\nfish swim.\n")
    assert main(["forgetting", str(base_dir), str(tuned_dir), "--texts", str(texts)]) == 0
    assert "2 given texts" in capsys.readouterr().out


def test_hft_forgetting_refuses_different_vocabularies_and_bad_paths(checkpoints, capsys, tmp_path):
    base_dir = checkpoints[0]
    tiny_model("llama", vocab_size=100).save_pretrained(tmp_path / "other")
    assert main(["forgetting", str(base_dir), str(tmp_path / "other")]) == 2
    assert "BASE predicts 96 tokens and TUNED 100: the two models have different vocabularies" in capsys.readouterr().err
    assert main(["forgetting", str(base_dir), str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["forgetting", str(base_dir), str(base_dir), "--texts", str(empty)]) == 2
    assert "holds no text" in capsys.readouterr().err


def test_hft_forgetting_refuses_tokenizers_that_disagree(checkpoints, capsys, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    base_dir, tuned_dir = checkpoints[:2]
    vocab = {chr(65 + i): i for i in range(26)}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="A")))
    other.save_pretrained(tuned_dir)
    assert main(["forgetting", str(base_dir), str(tuned_dir), "--samples", "2"]) == 2
    assert "the tokenizers of BASE and TUNED differ" in capsys.readouterr().err


# -- TRL -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hft", [False, True])
def test_trl_sft_trainer(tmp_path, hft):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    model = tiny_model("llama")
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft_dataset(), processing_class=tiny_tokenizer())
    if hft:
        enable_hft(trainer)
    monitor = watch_forgetting(trainer, every=2, **SMALL)
    trainer.train()
    assert sorted(logged(trainer)) == [2, 4] and logged(trainer)[4] > 0
    assert any("mean_token_accuracy" in h for h in trainer.state.log_history if "forgetting/kl" in h)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (monitor.base.nbytes < 0.6 * full) if hft else (monitor.base.nbytes == full)


# -- zero code -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("environ, expected", [
    ({}, None), ({"HFT_WATCH_FORGETTING": "0", "HFT_WATCH_EVERY": "x"}, None),
    ({"HFT_WATCH_FORGETTING": "1"}, {}),
    ({"HFT_WATCH_FORGETTING": "on", "HFT_WATCH_EVERY": "20", "HFT_MAX_KL": "2.5e-2"}, {"every": 20, "max_kl": 0.025}),
])
def test_watch_variables(environ, expected):
    assert env.watch_settings(environ) == expected


@pytest.mark.parametrize("environ, match", [
    ({"HFT_WATCH_FORGETTING": "ture"}, "HFT_WATCH_FORGETTING='ture' is not a boolean"),
    ({"HFT_WATCH_FORGETTING": "1", "HFT_WATCH_EVERY": "0"}, "HFT_WATCH_EVERY='0' must be at least 1"),
    ({"HFT_WATCH_FORGETTING": "1", "HFT_WATCH_EVERY": "1_0"}, "HFT_WATCH_EVERY='1_0' is not a whole number"),
    ({"HFT_WATCH_FORGETTING": "1", "HFT_MAX_KL": "-1"}, "HFT_MAX_KL='-1' is not a positive number"),
    ({"HFT_WATCH_FORGETTING": "1", "HFT_MAX_KL": "nan"}, "HFT_MAX_KL='nan' is not a positive number"),
    ({"HFT_MAX_KL": "0.1"}, "HFT_MAX_KL='0.1' is a forgetting budget, but HFT_WATCH_FORGETTING is unset"),
])
def test_malformed_watch_variables_name_the_variable(environ, match):
    with pytest.raises(ConfigError, match=match):
        env.watch_settings(environ)


@pytest.fixture
def zero_code(request):
    from hft_plugin.adapters.transformers import TransformersAdapter

    adapter = TransformersAdapter(watch_only=request.param)
    adapter.instrument()
    yield adapter
    adapter.uninstrument()


@pytest.mark.parametrize("zero_code", [False], indirect=True)
def test_zero_code_with_hft(tmp_path, zero_code, monkeypatch):
    from hft_plugin.adapters.transformers import hft_session

    monkeypatch.setenv("HFT_ENABLE", "1")
    monkeypatch.setenv("HFT_WATCH_FORGETTING", "1")
    monkeypatch.setenv("HFT_WATCH_EVERY", "2")
    model = tiny_model("llama")
    trainer = trainer_for(model, tmp_path, max_steps=4)
    trainer.train()
    monitor = forgetting_monitor(trainer)
    assert hft_session(trainer) is not None and monitor.every == 2 and sorted(logged(trainer)) == [2, 4]
    assert set(monitor.base.values) == set(trained_tensors(model))  # the trainable half only
    assert monitor.base.nbytes < 0.6 * sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("zero_code", [True], indirect=True)
def test_zero_code_watch_without_hft(tmp_path, zero_code, monkeypatch):
    from hft_plugin.adapters.transformers import hft_session

    monkeypatch.delenv("HFT_ENABLE", raising=False)
    monkeypatch.setenv("HFT_WATCH_FORGETTING", "1")
    monkeypatch.setenv("HFT_WATCH_EVERY", "1")
    monkeypatch.setenv("HFT_MAX_KL", "1e-9")
    trainer = trainer_for(tiny_model("llama"), tmp_path, max_steps=4)
    trainer.train()
    assert hft_session(trainer) is None  # no HFT was asked for: a full fine-tune, watched
    assert trainer.state.global_step == 1 and forgetting_monitor(trainer).stopped_at == 1


@pytest.mark.parametrize("zero_code", [True], indirect=True)
def test_zero_code_malformed_variable_stops_before_training(tmp_path, zero_code, monkeypatch):
    monkeypatch.setenv("HFT_WATCH_FORGETTING", "1")
    monkeypatch.setenv("HFT_WATCH_EVERY", "-2")
    model = tiny_model("llama")
    before = weights(model)
    with pytest.raises(ConfigError, match="HFT_WATCH_EVERY='-2'"):
        trainer_for(model, tmp_path).train()
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


def test_the_start_up_line_arms_the_monitor_without_hft_enable(tmp_path):
    """The repository's .pth line, run as site runs it, with only HFT_WATCH_FORGETTING set: a plain
    Trainer logs forgetting/kl and trains without HFT."""
    program = textwrap.dedent(f"""
        exec(open({str(PTH_SOURCE)!r}).read())
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import hft_plugin.bootstrap.startup as startup
        from tests.test_forgetting_monitor import trainer_for, logged
        from hft_plugin.testing import tiny_model
        from hft_plugin.adapters.transformers import hft_session
        trainer = trainer_for(tiny_model("llama"), sys.argv[1], max_steps=2)
        trainer.train()
        print(json.dumps([startup.status()["instrumented"], hft_session(trainer) is None, sorted(logged(trainer))]))
    """)
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path)],
                            env=clean_env(HFT_WATCH_FORGETTING="1", HFT_WATCH_EVERY="1", OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [["transformers"], True, [1, 2]]


@pytest.mark.slow
def test_two_processes_log_together_and_stop_together(tmp_path):
    """DDP on 2 CPU ranks: only the main process measures, both log at the same steps (the trainer
    gathers the loss when it logs) and a budget stops both at the same step (no rank left waiting)."""
    import os

    from .test_distributed import launch

    worker = os.path.join(os.path.dirname(__file__), "_workers", "watch_distributed.py")
    main_rank, other = launch("ddp", 2, tmp_path, worker=worker)
    assert [r["world_size"] for r in main_rank + other] == [2] * 4
    every2, budget = main_rank
    assert every2["history"] == [2, 4] and every2["logged"] == [2, 4] and every2["global_step"] == 4
    assert other[0]["history"] == [] and other[0]["global_step"] == 4 and other[0]["digest"] == every2["digest"]
    assert budget["stopped_at"] == 1 and budget["global_step"] == 1
    assert other[1]["stopped_at"] == 1 and other[1]["global_step"] == 1 and other[1]["digest"] == budget["digest"]


@pytest.mark.slow
def test_trl_cli_with_hft_and_the_monitor(tmp_path):
    """`HFT_ENABLE=1 HFT_WATCH_FORGETTING=1 trl sft ...`: TRL's CLI, under accelerate launch."""
    from .test_cli_e2e import trl_sft, write_tiny_run

    model_dir, data_dir = write_tiny_run(tmp_path)
    out, done = trl_sft(tmp_path, model_dir, data_dir, "out", HFT_ENABLE="1", HFT_WATCH_FORGETTING="1",
                        HFT_WATCH_EVERY="1")
    output = done.stdout + done.stderr
    assert output.count("hft_plugin: forgetting monitor: KL(base || model) every 1 steps") == 1, output[-3000:]
    assert output.count("'forgetting/kl'") == 3 and "SFTTrainer trains with Half Fine-Tuning" in output
    assert Probes.load(str(out / PROBES_FILE)).source == "samples"


def test_a_lora_model_keeps_only_its_adapters(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = trainer_for(model, tmp_path, max_steps=2)
    monitor = watch_forgetting(trainer, every=2, **SMALL)
    assert monitor.base.values and all("lora_" in name for name in monitor.base.values)
    trainer.train()
    assert logged(trainer)[2] > 0
