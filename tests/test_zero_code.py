"""Zero-code activation reads the HFT_* variables when each train() starts, not when transformers
is imported, and a malformed value is the first error a user sees, before any weight changes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hft_plugin import ConfigError, IntegrationError, enable_hft, select_half
from hft_plugin.adapters.transformers import TransformersAdapter, hft_session
from hft_plugin.testing import tiny_model

from ._workers.common import check_training
from .helpers import flags, snapshot
from .helpers import clean_env, plain_trainer
from .test_bootstrap_startup import ROOT

# A program that runs several tasks, as a user writes it: the variables change between tasks.
TASKS = textwrap.dedent("""
    import json, os, sys
    {activation}
    from transformers import Trainer
    from hft_plugin.adapters.transformers import hft_session
    from hft_plugin.testing import tiny_model, tiny_tokenizer
    sys.path.insert(0, {root!r})
    from tests._workers.common import collate, lm_dataset, train_args
    tokenizer, model, seen = tiny_tokenizer(), tiny_model("llama"), []
    for round in (1, 2):
        os.environ["HFT_ROUND"] = str(round)
        trainer = Trainer(model=model, args=train_args(f"{{sys.argv[1]}}/task{{round}}", max_steps=1),
                          train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
        trainer.train()
        session = hft_session(trainer)
        seen.append([session.selection.config.round, sorted(session.selection.trainable_units)])
    print(json.dumps(seen))
""")


def run(code: str, *args: str, **environ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=clean_env(OMP_NUM_THREADS="1", **environ),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("activation, environ", [
    ("import hft_plugin.auto", {}),                                   # the explicit form
    pytest.param("", {"HFT_ENABLE": "1"}, marks=pytest.mark.slow),    # the installed start-up hook
])
def test_each_task_trains_the_round_its_variables_name(tmp_path, activation, environ):
    result = run(TASKS.format(activation=activation, root=str(ROOT)), str(tmp_path), **environ)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    model = tiny_model("llama")
    assert [r for r, _ in seen] == [1, 2]
    for round, units in seen:
        assert units == sorted(select_half(model, round=round).trainable_units)


# -- in process: TransformersAdapter() without options reads the variables at each train() -------------
@pytest.fixture
def adapter():
    adapter = TransformersAdapter()
    adapter.instrument()
    yield adapter
    adapter.uninstrument()


def test_variables_are_read_when_training_starts(tmp_path, adapter, monkeypatch):
    monkeypatch.setenv("HFT_ROUND", "1")
    trainer = plain_trainer(tmp_path / "a", max_steps=1)
    monkeypatch.setenv("HFT_ROUND", "2")  # after the trainer exists, before train(): this is the round
    before = snapshot(trainer.model)
    trainer.train()
    session = hft_session(trainer)
    assert session.config.round == 2
    check_training(session.selection, before, snapshot(trainer.model), trainer, session.handle)


def test_a_trainer_trained_again_under_new_variables_switches_round(tmp_path, adapter, monkeypatch):
    monkeypatch.setenv("HFT_ROUND", "0")
    trainer = plain_trainer(tmp_path, max_steps=1)
    trainer.train()
    first = hft_session(trainer)
    monkeypatch.setenv("HFT_ROUND", "1")
    trainer.train()
    second = hft_session(trainer)
    assert second is not first and second.config.round == 1 and first.handle.removed
    trained = {n for n, on in flags(trainer.model).items() if on}
    assert trained == set(second.selection.plan().trainable)  # round 1's half, not round 0's
    trainer.train()
    assert hft_session(trainer) is second  # same variables: the same session


def test_enable_switched_off_at_train_time_trains_without_hft(tmp_path, adapter, monkeypatch):
    monkeypatch.setenv("HFT_ENABLE", "0")
    trainer = plain_trainer(tmp_path, max_steps=1)
    trainer.train()
    assert hft_session(trainer) is None and all(flags(trainer.model).values())


@pytest.mark.parametrize("variable, value", [
    ("HFT_ENABLE", "flase"), ("HFT_ENABLE", "ture"), ("HFT_TRAIN_EMBEDDINGS", ""), ("HFT_ROUND", "1_0"),
    ("HFT_RATO", "0.25"),  # a misspelt name: it would train at the default ratio
])
def test_a_malformed_variable_stops_train_before_any_change(tmp_path, adapter, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    trainer = plain_trainer(tmp_path, max_steps=1)
    weights, state = snapshot(trainer.model), flags(trainer.model)
    with pytest.raises(ConfigError, match=f"{variable}={value!r}") as info:
        trainer.train()
    assert not isinstance(info.value, IntegrationError)
    assert trainer.optimizer is None and flags(trainer.model) == state
    assert all(torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())


def test_explicit_adapter_options_win_over_the_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HFT_ROUND", "2")
    adapter = TransformersAdapter(config={"round": 1})
    adapter.instrument()
    try:
        trainer = plain_trainer(tmp_path, max_steps=1)
        trainer.train()
        assert hft_session(trainer).config.round == 1
    finally:
        adapter.uninstrument()


# -- the real start-up hook, in fresh interpreters ------------------------------------------------------
TRAIN_ONCE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    from transformers import Trainer
    from hft_plugin.testing import tiny_model, tiny_tokenizer, snapshot
    from tests._workers.common import collate, lm_dataset, train_args
    tokenizer, model = tiny_tokenizer(), tiny_model("llama")
    trainer = Trainer(model=model, args=train_args(sys.argv[1], max_steps=1), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer))
    before = snapshot(model)
    try:
        trainer.train()
        print("trained")
    except Exception as exc:
        print(type(exc).__name__, "|", exc)
        print("unchanged" if all(torch.equal(before[n], p) for n, p in model.named_parameters()) else "CHANGED")
""")


@pytest.mark.parametrize("environ", [
    {"HFT_ENABLE": "flase"}, pytest.param({"HFT_ENABLE": "ture"}, marks=pytest.mark.slow),
    pytest.param({"HFT_ENABLE": "1", "HFT_TRAIN_EMBEDDINGS": ""}, marks=pytest.mark.slow),
    {"HFT_ENABLE": "1", "HFT_ROUND": "1_0"},
])
def test_the_start_up_hook_stops_on_a_malformed_variable(tmp_path, environ):
    variable, value = list(environ.items())[-1]
    result = run(TRAIN_ONCE.format(root=str(ROOT)), str(tmp_path), **environ)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-2].startswith(f"ConfigError | {variable}={value!r}") and lines[-1] == "unchanged", lines
    hook_lines = [line for line in result.stderr.splitlines() if line.startswith("hft_plugin:")]
    assert len(hook_lines) == 1 and f"{variable}={value!r}" in hook_lines[0]


UNCAUGHT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from transformers import Trainer
    from hft_plugin.testing import tiny_model, tiny_tokenizer
    from tests._workers.common import collate, lm_dataset, train_args
    tokenizer = tiny_tokenizer()
    Trainer(model=tiny_model("llama"), args=train_args(sys.argv[1], max_steps=1), train_dataset=lm_dataset(tokenizer),
            data_collator=collate(tokenizer)).train()
""")


def test_an_uncaught_configuration_error_is_printed_once_without_a_traceback(tmp_path):
    """The message once (when transformers is imported), then one line that points to it: before,
    a 30-line traceback repeated it."""
    result = run(UNCAUGHT.format(root=str(ROOT)), str(tmp_path), HFT_ENABLE="1", HFT_RATO="0.25")
    assert result.returncode == 1
    assert result.stderr.count("HFT_RATO='0.25' is not a variable hft-plugin reads") == 1, result.stderr
    assert "Did you mean HFT_RATIO?" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        "hft_plugin: stopped before training on the configuration error above (ConfigError).")


def test_a_launcher_whose_worker_stopped_on_a_configuration_error_says_one_line():
    """accelerate launch (under trl sft) re-raises its worker's failure with the worker's stderr
    attached; with HFT_ENABLE set, that is one line, and any other failure keeps its traceback."""
    launcher = textwrap.dedent("""
        import subprocess, sys
        tail = sys.argv[1] + "\\n"
        raise subprocess.CalledProcessError(1, ["/venv/bin/python3", "/site/trl/scripts/sft.py", "--x"], stderr=tail.encode())
    """)
    stopped = run(launcher, "hft_plugin: stopped before training on the configuration error above (ConfigError).",
                  HFT_ENABLE="1")
    assert stopped.returncode == 1 and stopped.stderr.strip().splitlines() == [
        "hft_plugin: the worker (python3 sft.py ...) stopped on the configuration error above (exit status 1)."]
    other = run(launcher, "RuntimeError: out of memory", HFT_ENABLE="1")
    assert "Traceback" in other.stderr and "CalledProcessError" in other.stderr


@pytest.mark.slow
def test_a_process_that_never_trains_is_not_broken():
    result = run("import transformers.trainer, torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1); "
                 "print('alive')", HFT_ENABLE="ture")
    # it did build an optimizer: with HFT_ENABLE malformed that is refused...
    assert "ConfigError" in result.stderr and "alive" not in result.stdout
    quiet = run("import transformers.trainer; print('alive')", HFT_ENABLE="ture")
    # ...but a process that only imports the framework runs on, with one line of warning
    assert quiet.returncode == 0 and quiet.stdout.strip() == "alive"
    assert [line for line in quiet.stderr.splitlines() if "hft_plugin" in line] == [
        line for line in quiet.stderr.splitlines() if "HFT_ENABLE='ture'" in line]
    assert len([line for line in quiet.stderr.splitlines() if line.startswith("hft_plugin:")]) == 1


def test_the_variable_is_the_first_error_even_when_an_adapter_failed():
    probe = textwrap.dedent("""
        import sys, types, torch
        import hft_plugin.bootstrap.startup as s
        from hft_plugin.adapters.base import Adapter
        fake = types.ModuleType("fake_adapters")
        class FutureAdapter(Adapter):
            name = "future"
            instruments = ("torch >= 99",)
        fake.FutureAdapter = FutureAdapter
        sys.modules["fake_adapters"] = fake
        s.ADAPTERS["future"] = ("json", "fake_adapters:FutureAdapter")
        s.instrument("future")
        try:
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        except Exception as exc:
            print(type(exc).__name__, "|", exc)
    """)
    result = run(probe, HFT_ENABLE="1", HFT_ROUND="1_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError | HFT_ROUND='1_0'"), result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("hft_plugin:")]
    assert "HFT_ROUND='1_0'" in warnings[0] and "torch >= 99" in warnings[1]


@pytest.mark.parametrize("zero_code", [False, True])
def test_a_resumed_train_reads_the_checkpoints_manifest_once(tmp_path, monkeypatch, zero_code):
    # enable_hft's wrapper, the class-level patch of zero-code activation and the prepare step all
    # reach the resume check: one train() call reads the checkpoint's manifest once
    from hft_plugin import run as run_module
    from hft_plugin.checkpoints import check_checkpoint

    first = plain_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    enable_hft(first, round=1)
    first.train()
    reads = []
    monkeypatch.setattr(run_module, "check_checkpoint",
                        lambda *a, **k: reads.append(a[0]) or check_checkpoint(*a, **k))
    adapter = TransformersAdapter(round=1) if zero_code else None
    if adapter is not None:
        adapter.instrument()
    try:
        resumed = plain_trainer(tmp_path, max_steps=3, save_strategy="no")
        enable_hft(resumed, round=1)
        resumed.train(resume_from_checkpoint=True)
        assert resumed.state.global_step == 3 and len(reads) == 1
        resumed.train(resume_from_checkpoint=True)  # a second call checks again
        assert len(reads) == 2
    finally:
        if adapter is not None:
            adapter.uninstrument()
