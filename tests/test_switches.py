"""Item 4 of issue 21: one list of true/false words, accepted the same in every place that reads a
switch, and one snapshot of the ``HFT_*`` variables per change of them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hft_plugin import plugins, switches
from hft_plugin.bootstrap import env, startup
from hft_plugin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# each word as written, in capitals, and with spaces around: every place ignores case and spaces
ON = [w for word in switches.ON for w in (word, word.upper(), f" {word} ")]
OFF = [w for word in switches.OFF for w in (word, word.upper(), f" {word} ")]


def test_the_words_are_no_fewer_than_before():
    # the union of the four lists there were: a word accepted anywhere before is accepted everywhere
    assert set(switches.ON) >= {"1", "true", "yes", "on"}
    assert set(switches.OFF) >= {"0", "false", "no", "off"}


@pytest.mark.parametrize("word", ON)
def test_every_reader_takes_an_on_word(word):
    assert env.parse_bool("HFT_TRAIN_EMBEDDINGS", word) is True
    assert env.is_enabled({"HFT_ENABLE": word}) and env.maybe_enabled({"HFT_ENABLE": word})
    assert not env.switched_off({"HFT_ENABLE": word})
    assert env.share_reference({"HFT_SHARE_REFERENCE": word}) is True
    assert env.maybe_watching({"HFT_WATCH_FORGETTING": word})
    assert env.watch_settings({"HFT_WATCH_FORGETTING": word}) == {}
    assert env.load_config({"HFT_TRAIN_EMBEDDINGS": word}).train_embeddings is True
    assert plugins.autoload_disabled({"HFT_DISABLE_PLUGIN_AUTOLOAD": word})


@pytest.mark.parametrize("word", OFF)
def test_every_reader_takes_an_off_word(word):
    assert env.parse_bool("HFT_TRAIN_EMBEDDINGS", word) is False
    assert not env.is_enabled({"HFT_ENABLE": word}) and not env.maybe_enabled({"HFT_ENABLE": word})
    assert env.switched_off({"HFT_ENABLE": word})
    assert env.share_reference({"HFT_SHARE_REFERENCE": word}) is False
    assert not env.maybe_watching({"HFT_WATCH_FORGETTING": word})
    assert env.watch_settings({"HFT_WATCH_FORGETTING": word}) is None
    assert env.load_config({"HFT_TRAIN_EMBEDDINGS": word}).train_embeddings is False
    assert env.training_config({"HFT_ENABLE": word}) is None
    assert not plugins.autoload_disabled({"HFT_DISABLE_PLUGIN_AUTOLOAD": word})
    assert startup.activate({"HFT_ENABLE": word}) is False


@pytest.mark.parametrize("word", ["flase", "ture", "2", "enable"])
def test_a_word_of_neither_list_is_an_error_where_it_is_checked(word):
    with pytest.raises(ConfigError, match="HFT_ENABLE"):
        env.is_enabled({"HFT_ENABLE": word})
    with pytest.raises(ConfigError, match="HFT_SHARE_REFERENCE"):
        env.share_reference({"HFT_SHARE_REFERENCE": word})
    assert env.maybe_enabled({"HFT_ENABLE": word})  # arms the hooks, to fail loudly at training time
    assert not plugins.autoload_disabled({"HFT_DISABLE_PLUGIN_AUTOLOAD": word})  # as before: only on words skip


def test_the_pth_line_knows_the_same_off_words():
    line = (ROOT / "hft_plugin" / "bootstrap" / startup.PTH_NAME).read_text()
    lists = re.findall(r"not in \(([^)]*)\)", line)
    assert len(lists) == 2  # HFT_ENABLE and HFT_WATCH_FORGETTING
    for found in lists:
        assert tuple(w.strip().strip("\"'") for w in found.split(",")) == ("", *switches.OFF)


def test_import_auto_takes_the_same_words():
    # a fresh interpreter per word would cost seconds each: reload the module under each value instead
    code = """
import importlib, os, sys, io
import hft_plugin.bootstrap.startup as startup
startup.activate = lambda environ=None: print("armed")
for word in sys.argv[1:]:
    os.environ["HFT_ENABLE"] = word
    if "hft_plugin.auto" in sys.modules:
        importlib.reload(sys.modules["hft_plugin.auto"])
    else:
        import hft_plugin.auto
"""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("HFT_")}
    result = subprocess.run([sys.executable, "-c", code, *ON, *OFF], env=environ, capture_output=True, text=True,
                            timeout=120, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["armed"] * len(ON)
    assert result.stderr.count("ignored because HFT_ENABLE is set to off") == len(OFF)


def test_one_snapshot_per_change_of_the_variables(monkeypatch):
    monkeypatch.setenv("HFT_ROUND", "1")
    first = env.snapshot()
    assert env.snapshot() is first and first["HFT_ROUND"] == "1"
    monkeypatch.setenv("PATH_OF_SOMETHING_ELSE", "x")  # not an HFT_* variable: the same snapshot
    assert env.snapshot() is first
    monkeypatch.setenv("HFT_ROUND", "2")
    second = env.snapshot()
    assert second is not first and second["HFT_ROUND"] == "2" and env.load_config().round == 2
    with pytest.raises(TypeError):
        second["HFT_ROUND"] = "3"  # read-only: a reader cannot change what the next one sees
