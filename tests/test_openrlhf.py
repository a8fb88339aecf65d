"""The OpenRLHF adapter, on CPU: OpenRLHF's real DeepspeedStrategy with flash_attn stubbed (a CUDA
-only package that its modules import but this path never calls) and deepspeed.initialize replaced
by a stand-in that builds a torch AdamW from exactly the parameters OpenRLHF hands it.

What cannot run here: a real OpenRLHF training step (CUDA is hard-wired in setup_distributed).
Run in its environment with `bash .ci/openrlhf.sh`.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf", reason="OpenRLHF tests run in their own environment: bash .ci/openrlhf.sh")

from hft_plugin import ConfigError, HFTConfig, IntegrationError, Selection  # noqa: E402
from hft_plugin.adapters.openrlhf import OpenRLHFAdapter  # noqa: E402
from hft_plugin.freeze import active_handle  # noqa: E402
from hft_plugin.selection import MANIFEST_NAME  # noqa: E402
from hft_plugin.testing import tiny_model, tiny_tokenizer  # noqa: E402

from .helpers import assert_frozen_and_trained, snapshot  # noqa: E402
from .test_adapters_contract import AdapterContract  # noqa: E402

FLASH_ATTN_STUB = """
import importlib.machinery, sys, types
def _stub(name):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.__path__ = []
    sys.modules[name] = module
    return module
_flash, _padding, _utils, _dist = (_stub(n) for n in ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
                                                      "flash_attn.utils.distributed"))
for _fn in ("index_first_axis", "pad_input", "rearrange", "unpad_input"):
    setattr(_padding, _fn, lambda *a, **k: None)
_dist.all_gather = lambda *a, **k: None
_flash.bert_padding, _flash.utils, _utils.distributed = _padding, _utils, _dist
"""

CFG = {"optim": "adam", "adam": {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
       "scheduler_steps": 10, "lr_scheduler": "constant", "max_norm": 1.0}


def _stub_flash_attn():
    if "flash_attn" not in sys.modules:
        exec(FLASH_ATTN_STUB, {})


@pytest.fixture
def ds(monkeypatch):
    """OpenRLHF's strategy module with deepspeed.initialize replaced; records each call."""
    _stub_flash_attn()
    import openrlhf.utils.deepspeed.deepspeed as module

    calls = []

    def initialize(model=None, optimizer=None, model_parameters=None, config=None, **kwargs):
        optim = None
        if model_parameters is not None:
            groups = [dict(g) for g in model_parameters]
            optim = torch.optim.AdamW(groups, lr=config.get("optimizer", {}).get("params", {}).get("lr", 1e-2))
        calls.append(SimpleNamespace(model=model, parameters=model_parameters, optimizer=optim))
        return model, optim, None, None

    monkeypatch.setattr(module.deepspeed, "initialize", initialize)
    monkeypatch.setattr(module, "torch_dist_barrier_and_cuda_sync", lambda: None)
    module.calls = calls
    return module


@pytest.fixture
def strategy(ds):
    args = SimpleNamespace(ds=SimpleNamespace(param_dtype="fp32", zero_stage=2, tensor_parallel_size=1),
                           train=SimpleNamespace())
    return ds.DeepspeedStrategy(args=args, zero_stage=2)


@pytest.fixture
def adapter(ds):
    adapter = OpenRLHFAdapter(config=HFTConfig(round=1))
    adapter.instrument()
    yield adapter
    for handle in adapter.handles:
        handle.remove()
    adapter.uninstrument()


def _steps(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 96, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_actor_trains_one_half_and_reference_is_untouched(ds, strategy, adapter):
    from openrlhf.models import Actor

    actor, reference = Actor(tiny_model("llama", seed=1)), Actor(tiny_model("llama", seed=1))
    before = snapshot(actor.model)
    (actor, optim, _), reference = strategy.prepare((actor, CFG), reference)
    handle = active_handle(actor.model)
    assert handle is not None and handle.selection.config.round == 1
    owned = {id(p) for group in ds.calls[0].parameters for p in group["params"]}
    assert owned == {id(p) for p in handle.parameters()}  # DeepSpeed gets exactly the trainable half
    _steps(actor.model, optim)
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(actor.model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    # the reference model went through _ds_init_eval_model: no selection, nothing frozen
    assert active_handle(reference.model) is None
    assert all(p.requires_grad for p in reference.model.parameters())
    assert len(ds.calls) == 2 and ds.calls[1].parameters is None


def test_critic_and_reward_models(ds, strategy, adapter):
    critic, reward = tiny_model("qwen2", seed=2), tiny_model("qwen2", seed=3)
    (critic, optim, _), reward = strategy.prepare((critic, CFG), reward)
    assert active_handle(critic) is not None and active_handle(reward) is None
    assert 0 < sum(p.requires_grad for p in critic.parameters()) < len(list(critic.parameters()))
    assert all(p.requires_grad for p in reward.parameters())


def test_fused_tensors_are_refused_before_deepspeed_starts(ds, strategy, adapter):
    model = tiny_model("phi3")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(IntegrationError, match="HFT_STRATEGY=layer"):
        strategy.prepare((model, CFG))
    assert ds.calls == [] and [p.requires_grad for p in model.parameters()] == flags


def test_layer_strategy_trains_fused_models_whole(ds, strategy):
    adapter = OpenRLHFAdapter(config={"strategy": "layer"})
    adapter.instrument()
    try:
        model = tiny_model("phi3")
        before = snapshot(model)
        model, optim, _ = strategy.prepare((model, CFG))
        selection = active_handle(model).selection
        assert not selection.plan().partial
        _steps(model, optim)
        assert_frozen_and_trained(selection, before, snapshot(model))
    finally:
        for handle in adapter.handles:
            handle.remove()
        adapter.uninstrument()


def test_bad_variable_fails_before_anything_changes(ds, strategy, monkeypatch):
    monkeypatch.setenv("HFT_RATIO", "abc")
    adapter = OpenRLHFAdapter()  # reads the HFT_* variables when a model is prepared
    adapter.instrument()
    try:
        model = tiny_model("llama")
        with pytest.raises(ConfigError, match="HFT_RATIO='abc'"):
            strategy.prepare((model, CFG))
        assert ds.calls == [] and all(p.requires_grad for p in model.parameters())
    finally:
        adapter.uninstrument()


def test_failed_initialize_leaves_the_model_as_it_was(ds, strategy, adapter, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("no GPU")

    monkeypatch.setattr(ds.deepspeed, "initialize", broken)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="no GPU"):
        strategy.prepare((model, CFG))
    assert active_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_save_model_writes_the_manifest(ds, strategy, adapter, tmp_path):
    from openrlhf.models import Actor

    actor, _, _ = strategy.prepare((Actor(tiny_model("llama")), CFG))
    strategy.save_model(actor, tiny_tokenizer(), str(tmp_path / "out"))
    saved = Selection.load(str(tmp_path / "out" / MANIFEST_NAME))
    assert saved.trainable_units == active_handle(actor.model).selection.trainable_units
    assert (tmp_path / "out" / "model.safetensors").is_file()


class TestOpenRLHFContract(AdapterContract):
    adapter_class = OpenRLHFAdapter
    trigger = "openrlhf.utils.deepspeed.deepspeed"
    targets = tuple(("openrlhf.utils.deepspeed.deepspeed", path) for path in (
        "DeepspeedStrategy._ds_init_train_model", "DeepspeedStrategy.save_model", "DeepspeedStrategy.save_ckpt",
        "DeepspeedStrategy.load_ckpt"))
    prelude = FLASH_ATTN_STUB

    def prepare(self):
        _stub_flash_attn()
        super().prepare()


def test_round_next_is_logged_as_the_round_that_trains_with_the_overall_share(ds, strategy, caplog):
    # a model not loaded from a folder has no manifest: round="next" trains round 0, and the log says so
    from openrlhf.models import Actor

    adapter = OpenRLHFAdapter(config=HFTConfig(round="next"))
    adapter.instrument()
    try:
        with caplog.at_level("WARNING", logger="hft_plugin"):
            strategy.prepare((Actor(tiny_model("llama")), CFG))
    finally:
        for handle in adapter.handles:
            handle.remove()
        adapter.uninstrument()
    assert "round 0" in caplog.text and "round next" not in caplog.text
    assert "trainable%:" in caplog.text  # the overall share first, as at every train start
