"""The run object (hft_plugin.run.HFTRun) and the adapters that share it: a model's set-up
(LLaMA-Factory's) and its Trainer apply HFT once; OpenRLHF gets the resume check and the rank
agreement. LLaMA-Factory and OpenRLHF are not needed: their functions are stood in for here."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from hft_plugin import HFTConfig, SelectionMismatchError, enable_hft, select_half
from hft_plugin.freeze import HFTHandle, active_handle
from hft_plugin.testing import tiny_model

from .test_trainer import plain_trainer


# -- LLaMA-Factory's model set-up, then the stage's Trainer --------------------------------------------
def lf_setup(model, config: HFTConfig) -> None:
    """LLaMA-Factory's ``_setup_full_tuning`` as the adapter's wrapper sees it (its own step stood in)."""
    from hft_plugin.adapters.llamafactory import LlamaFactoryAdapter

    def _setup_full_tuning(model, finetuning_args, is_trainable, cast_trainable_params_to_fp32):
        return None

    LlamaFactoryAdapter(config=config)._setup_full_tuning(
        _setup_full_tuning, None, (model, SimpleNamespace(stage="sft"), True, False), {})


@pytest.fixture
def handles_created(monkeypatch):
    created = []
    init = HFTHandle.__init__

    def counting(self, *args, **kwargs):
        created.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(HFTHandle, "__init__", counting)
    return created


@pytest.mark.parametrize("shards", [None, "deepspeed", "fsdp"])
def test_llamafactory_setup_then_the_trainer_applies_hft_once(tmp_path, monkeypatch, handles_created, shards):
    # LLaMA-Factory applies HFT when it loads the model; the transformers adapter then starts the
    # stage's Trainer on that model. Before: the Trainer selected the half again and, under
    # DeepSpeed or FSDP (gradient mask instead of region parameters), applied it again.
    from hft_plugin.adapters.transformers import disable_hft, hft_session

    model = tiny_model("phi3")  # fused qkv_proj and gate_up_proj: partly trained tensors
    config = HFTConfig(round=1)
    if shards == "deepspeed":  # LLaMA-Factory's TrainingArguments registered their DeepSpeed config
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        class Registered:  # transformers keeps a weak reference to the arguments' HfTrainerDeepSpeedConfig
            config = {"zero_optimization": {"stage": 2}}

            def is_zero3(self):
                return False

        registered = Registered()
        set_hf_deepspeed_config(registered)
        try:
            lf_setup(model, config)
        finally:
            unset_hf_deepspeed_config()
    elif shards == "fsdp":  # accelerate launch --use_fsdp
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        lf_setup(model, config)
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
    else:
        lf_setup(model, config)
    handle = active_handle(model)
    trainer = plain_trainer(tmp_path, model=model)
    if shards == "deepspeed":
        trainer.is_deepspeed_enabled = True  # what the Trainer sets from those arguments
    elif shards == "fsdp":
        trainer.is_fsdp_enabled = True
    enable_hft(trainer, config)  # as the transformers adapter does when the stage's train() starts
    session = hft_session(trainer)
    assert len(handles_created) == 1
    assert active_handle(model) is handle and session.handle is handle
    assert session.selection is handle.selection  # selected once
    assert set(handle.mechanisms().values()) == ({"rows"} if shards is None else {"mask"})
    disable_hft(trainer)
    assert active_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_the_trainer_applies_its_own_options_over_another_runs(tmp_path, handles_created):
    # a run with other options than the trainer asks for is replaced, as before: the trainer's options win
    from hft_plugin.adapters.transformers import hft_session
    from hft_plugin.run import HFTRun

    model = tiny_model("llama")
    lf_setup(model, HFTConfig(round=0))
    trainer = plain_trainer(tmp_path, model=model)
    enable_hft(trainer, round=1)
    assert len(handles_created) == 2 and hft_session(trainer).selection.config.round == 1
    assert HFTRun.of(model) is hft_session(trainer).run


def test_partial_mode_the_setup_did_not_know_is_applied_again_with_a_warning(tmp_path, caplog, handles_created):
    model = tiny_model("phi3")
    lf_setup(model, HFTConfig(round=1))  # nothing announced FSDP at set-up
    trainer = plain_trainer(tmp_path, model=model)
    trainer.is_fsdp_enabled = True
    with caplog.at_level("WARNING", logger="hft_plugin"):
        handle = enable_hft(trainer, round=1)
    assert "applied again with the gradient mask" in caplog.text
    assert len(handles_created) == 2 and set(handle.mechanisms().values()) == {"mask"}


# -- the run object itself -----------------------------------------------------------------------------
def test_the_registry_finds_a_run_by_its_model_and_forgets_it_on_stop():
    import gc
    import weakref

    from hft_plugin.run import HFTRun

    model = tiny_model("llama")
    run = HFTRun(model, HFTConfig(round=0)).start()
    assert HFTRun.of(model) is run and active_handle(model) is run.handle
    run.stop()
    assert HFTRun.of(model) is None and all(p.requires_grad for p in model.parameters())
    run = HFTRun(model, HFTConfig(round=0)).start()
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the registry holds the model weakly, and the run does not hold it


# -- OpenRLHF: its DeepspeedStrategy stood in for ------------------------------------------------------
class _Engine(torch.nn.Module):
    """What DeepSpeed hands back: the model inside an engine."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.fixture
def openrlhf(monkeypatch):
    """An ``openrlhf`` package with just the names the adapter patches; records each call."""
    calls = []

    class DeepspeedStrategy:
        def _ds_init_train_model(self, model, cfg):
            calls.append(("init", model))
            return _Engine(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), None

        def save_model(self, model, tokenizer, output_dir, **kwargs):
            calls.append(("save_model", output_dir))

        def save_ckpt(self, model, save_dir, tag=None, **kwargs):
            calls.append(("save_ckpt", save_dir))

        def load_ckpt(self, model, load_dir, tag=None, **kwargs):
            calls.append(("load_ckpt", load_dir))
            return load_dir, {}

        def is_rank_0(self):
            return True

    modules = {name: types.ModuleType(name) for name in (
        "openrlhf", "openrlhf.models", "openrlhf.utils", "openrlhf.utils.deepspeed", "openrlhf.utils.deepspeed.deepspeed")}
    modules["openrlhf.models"].Actor = type("Actor", (torch.nn.Module,), {})
    modules["openrlhf.utils.deepspeed.deepspeed"].DeepspeedStrategy = DeepspeedStrategy
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from hft_plugin.adapters.openrlhf import OpenRLHFAdapter

    adapter = OpenRLHFAdapter(config=HFTConfig(round=1))
    adapter._instrument()  # no version check: the stand-in has no distribution
    yield SimpleNamespace(strategy=DeepspeedStrategy(), calls=calls, adapter=adapter)
    for handle in adapter.handles:
        handle.remove()
    adapter._uninstrument()


def test_openrlhf_refuses_a_checkpoint_of_another_round_before_loading_it(openrlhf, tmp_path):
    model = tiny_model("llama")
    engine, _, _ = openrlhf.strategy._ds_init_train_model(model, {})
    other = tmp_path / "round0"
    select_half(model, round=0).save(str(other))
    with pytest.raises(SelectionMismatchError, match="round 0"):
        openrlhf.strategy.load_ckpt(engine, str(other))
    assert ("load_ckpt", str(other)) not in openrlhf.calls
    # its own checkpoint resumes
    openrlhf.strategy.save_ckpt(engine, str(tmp_path / "ckpt"))
    assert openrlhf.strategy.load_ckpt(engine, str(tmp_path / "ckpt"))[0] == str(tmp_path / "ckpt")


def test_openrlhf_ranks_that_selected_different_halves_are_refused_before_deepspeed(openrlhf, monkeypatch):
    import hft_plugin.distributed as distributed

    def gather(out, mine):  # the other rank was started with another round
        out[0], out[1] = mine, ("another-digest", {"round": 0})

    monkeypatch.setattr(distributed.torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.torch.distributed, "all_gather_object", gather)
    model = tiny_model("llama")
    with pytest.raises(SelectionMismatchError, match="different halves"):
        openrlhf.strategy._ds_init_train_model(model, {})
    assert openrlhf.calls == [] and active_handle(model) is None
    assert all(p.requires_grad for p in model.parameters())
