import logging
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    yield


# -- leak check: every test leaves the plugin's global state as it found it ------------------------------
# What the package installs beyond one object's life: patches on other libraries (adapters/base.py), the
# start-up hook's state, its exception hook and import hooks, the HFT_* variables, the Trainer adapter in
# force, the Axolotl registration, experts implementations registered with transformers, and the live
# handles, shared references, sessions, monitors and replays (weak registries: an entry lives only while
# its object does, so a leak is one still alive after the test).
# A test that cleans up after itself passes; a test that fails is not checked (its traceback keeps objects).
_WEAK_REGISTRIES = (
    ("hft_plugin.freeze", "_ACTIVE", "HFT handles"),
    ("hft_plugin.sharing", "_ACTIVE", "shared references"),
    ("hft_plugin.adapters.transformers", "_SESSIONS", "trainer sessions"),
    ("hft_plugin.adapters.watch", "_MONITORS", "forgetting monitors"),
    ("hft_plugin.adapters.trainer_replay", "_REPLAYS", "replays"),
)


def _ours(hook) -> bool:
    function = getattr(hook, "__func__", hook)
    return getattr(function, "__module__", "").startswith("hft_plugin")


def plugin_state(live: bool = False) -> dict:
    """The package's global state now, by kind (only modules already imported are read: a test that
    imports one starts from its empty state). ``live``: also the objects alive in the weak registries;
    off in the autouse check, because a trainer (and so its handle) can outlive its test through
    references other libraries hold until a later collection (TRL's DPOTrainer, a Trainer over a GGUF
    model), which says nothing about what this package left behind."""
    import sys

    modules = sys.modules
    state: dict = {"HFT_* variables": sorted((k, v) for k, v in os.environ.items() if k.upper().startswith("HFT_"))}
    base = modules.get("hft_plugin.adapters.base")
    state["patches"] = base.live_patches() if base is not None and hasattr(base, "live_patches") else []
    startup = modules.get("hft_plugin.bootstrap.startup")
    if startup is not None:
        s = startup._state
        state["start-up hook"] = (s["active"], s["guard"], sorted(s["instances"]), sorted(s["failures"]),
                                  len(s["hooks"]), s.get("set_enable"))
    state["sys.excepthook"] = getattr(sys.excepthook, "__qualname__", repr(sys.excepthook))
    importer = modules.get("wrapt.importer")
    hooks = getattr(importer, "_post_import_hooks", {}) if importer is not None else {}
    state["import hooks"] = sorted((name, getattr(h, "__qualname__", repr(h)))
                                   for name, found in hooks.items() for h in (found or ()) if _ours(h))
    auto = modules.get("hft_plugin.adapters.trainer_auto")
    if auto is not None:
        state["Trainer adapters in force"] = [id(a) for a in auto._AutoState.adapters]
    moe = modules.get("transformers.integrations.moe")
    if moe is not None and hasattr(moe, "ExpertsInterface"):  # an experts implementation of the plugin's
        mappings = (moe.ExpertsInterface._global_mapping, getattr(moe.ALL_EXPERTS_FUNCTIONS, "_local_mapping", {}))
        state["experts implementations"] = sorted(k for m in mappings for k, f in m.items() if _ours(f))
    axolotl = modules.get("hft_plugin.adapters.axolotl")
    if axolotl is not None and hasattr(axolotl, "_REGISTRATION"):
        state["Axolotl registration"] = [id(a) for a in axolotl._REGISTRATION["holders"]]
    if live:
        for module, attribute, what in _WEAK_REGISTRIES:
            registry = getattr(modules.get(module), attribute, None)
            if registry is not None:
                state[what] = sorted((id(k), type(k).__name__) for k in list(registry.keys()))
    return state


_UNTOUCHED = {"start-up hook": (False, False, [], [], 0, None)}  # a module's state before anything used it


def _differences(before: dict, after: dict) -> list[str]:
    differences = []
    for what in sorted(set(before) | set(after)):
        untouched = _UNTOUCHED.get(what, [])
        was, now = before.get(what, untouched), after.get(what, untouched)
        if was != now:
            differences.append(f"{what}: before {was!r}, after {now!r}")
    return differences


def pytest_configure(config):
    config.addinivalue_line("markers", "keeps_plugin_state(reason): the test leaves global state on purpose")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item._hft_failed = True


@pytest.fixture(autouse=True)
def _no_leaks(request):
    before = plugin_state()
    yield
    if getattr(request.node, "_hft_failed", False) or request.node.get_closest_marker("keeps_plugin_state"):
        return
    differences = _differences(before, plugin_state())
    if differences:
        import gc

        gc.collect()  # an object of the test not yet collected is no leak
        differences = _differences(before, plugin_state())
    if differences:
        pytest.fail("the test left the plugin's global state changed (a leak):\n  " + "\n  ".join(differences),
                    pytrace=False)
