"""The Axolotl adapter on Axolotl's own plugin manager: the HFT plugin is registered by the start-up
hook, refuses `adapter:`/`unfrozen_parameters:` when the trainer is created, and leaves the model
hooks (also used by `axolotl inference` and `merge-lora`) alone. Runs in the Axolotl environment:
bash .ci/axolotl.sh."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("axolotl", reason="Axolotl tests run in their own environment: bash .ci/axolotl.sh")

from axolotl.integrations.base import BasePlugin, PluginManager  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

from hft_plugin import IntegrationError  # noqa: E402
from hft_plugin.adapters.axolotl import PLUGIN_KEY, AxolotlAdapter, conflicting_options  # noqa: E402

from .test_adapters_contract import AdapterContract  # noqa: E402

FULL = {"base_model": "tiny", "learning_rate": 1e-3, "micro_batch_size": 2}


def manager():
    return PluginManager.get_instance()


@pytest.fixture
def adapter():
    adapter = AxolotlAdapter()
    adapter.instrument()
    yield adapter
    adapter.uninstrument()


@pytest.mark.parametrize("options, named", [
    ({"adapter": "lora", "lora_r": 8}, "adapter: lora"),
    ({"adapter": "qlora"}, "adapter: qlora"),
    ({"adapter": "llama-adapter"}, "adapter: llama-adapter"),
    ({"lora_model_dir": "/ckpt/adapter"}, "lora_model_dir: /ckpt/adapter"),
    ({"unfrozen_parameters": ["^lm_head.weight$", "model.layers.1.*"]}, "unfrozen_parameters: "),
])
def test_own_ways_of_choosing_what_trains_are_refused_when_the_trainer_is_created(adapter, options, named):
    cfg = DictDefault({**FULL, **options})
    with pytest.raises(IntegrationError, match=f"HFT_ENABLE is set but the Axolotl config has {named}") as info:
        manager().post_trainer_create(cfg, trainer=None)
    assert "Remove `adapter:`" in str(info.value)


def test_full_fine_tuning_passes(adapter):
    manager().post_trainer_create(DictDefault(FULL), trainer=None)
    assert conflicting_options(DictDefault({**FULL, "adapter": None, "unfrozen_parameters": []})) == []


def test_model_hooks_leave_inference_and_merge_lora_alone(adapter):
    # `axolotl merge-lora` / `inference` load a LoRA model through the same hooks: not training.
    cfg = DictDefault({**FULL, "adapter": "lora", "lora_model_dir": "/ckpt/adapter"})
    for hook in ("pre_model_load", "pre_lora_load", "post_lora_load", "post_model_load", "post_model_build"):
        args = (cfg,) if hook == "pre_model_load" else (cfg, None)
        getattr(manager(), hook)(*args)


def test_without_the_adapter_nothing_is_refused():
    assert PLUGIN_KEY not in manager().plugins
    manager().post_trainer_create(DictDefault({**FULL, "adapter": "lora"}), trainer=None)


def test_second_instance_shares_the_registration(adapter):
    # Two adapters of one class (an explicit one beside the start-up hook's): one plugin, and it stays
    # until the last of them lets go, so one uninstrument() cannot disarm the other.
    first = manager().plugins[PLUGIN_KEY]
    assert isinstance(first, BasePlugin)
    other = AxolotlAdapter()
    assert other.instrument() is True
    try:
        assert manager().plugins[PLUGIN_KEY] is first
        adapter.uninstrument()
        assert manager().plugins[PLUGIN_KEY] is first  # `other` still holds it
    finally:
        other.uninstrument()
    assert PLUGIN_KEY not in manager().plugins


def test_a_plugin_registered_by_the_config_is_left_in_place(caplog):
    # `plugins: [hft_plugin.adapters.axolotl.HFTPlugin]` in the YAML registers it before the adapter:
    # the adapter warns, does not register a second one, and does not remove the user's.
    from hft_plugin.adapters.axolotl import plugin_class

    theirs = plugin_class()()
    manager().plugins[PLUGIN_KEY] = theirs
    try:
        adapter = AxolotlAdapter()
        with caplog.at_level("WARNING", logger="hft_plugin"):
            assert adapter.instrument() is True
        assert "already registered" in caplog.text
        assert manager().plugins[PLUGIN_KEY] is theirs
        adapter.uninstrument()
        assert manager().plugins[PLUGIN_KEY] is theirs
    finally:
        manager().plugins.pop(PLUGIN_KEY, None)


_ORDER_SCRIPT = """
import importlib, json, sys
from hft_plugin.bootstrap import startup
from hft_plugin.adapters.axolotl import PLUGIN_KEY
trigger = "axolotl.integrations.base"
out = {}

def registered():
    plugins = sys.modules[trigger].PluginManager.get_instance().plugins
    return sum(type(p).__name__ == "HFTPlugin" for p in plugins.values()), PLUGIN_KEY in plugins

if IMPORT_FIRST:
    importlib.import_module(trigger)
    out["imported_before_arming"] = True
startup.activate({"HFT_ENABLE": "1"})
out["imported_by_arming"] = trigger in sys.modules
importlib.import_module(trigger)
out["after_import"] = registered()
out["instrumented"] = startup.status()["instrumented"]
adapter = startup._state["instances"]["axolotl"]
out["second_instrument"] = adapter.instrument()
out["after_twice"] = registered()
adapter.uninstrument()
out["after_unpatch"] = registered()
out["second_instrument_after_unpatch"] = adapter.instrument()
out["after_repatch"] = registered()
adapter.uninstrument()
adapter.uninstrument()
out["at_end"] = registered()
print("RESULT " + json.dumps(out))
"""


class TestAxolotlContract(AdapterContract):
    """The shared contract, read through the plugin manager: "patched" is "the HFT plugin is
    registered", "wrapped twice" is "registered twice"."""

    adapter_class = AxolotlAdapter
    trigger = "axolotl.integrations.base"
    targets = ()

    def patched(self) -> list[bool]:
        return [PLUGIN_KEY in manager().plugins]

    def originals(self) -> list:
        return [manager().plugins.get(PLUGIN_KEY)]

    def order_script(self, import_first: bool) -> str:
        return textwrap.dedent(_ORDER_SCRIPT).replace("IMPORT_FIRST", str(import_first))

    def check_orders(self, out: dict) -> None:
        assert out["after_import"] == [1, True]
        assert "axolotl" in out["instrumented"]
        assert out["second_instrument"] is False  # a warning, nothing more
        assert out["after_twice"] == [1, True]     # never registered twice
        assert out["after_unpatch"] == [0, False]
        assert out["second_instrument_after_unpatch"] is True
        assert out["after_repatch"] == [1, True]
        assert out["at_end"] == [0, False]
