"""The HFT_* variables: parsing, precedence (call > variables > HFT_CONFIG file > defaults), errors
that name the variable, and hft-run's environment."""

from __future__ import annotations

import json

import pytest

from hft_plugin import ConfigError, HFTConfig
from hft_plugin.bootstrap import env
from hft_plugin.bootstrap.run import build_environment


def test_variables_are_documented_constants():
    for variable in env.ALL_VARIABLES:
        assert getattr(env, variable) == variable
    assert set(env.CONFIG_VARIABLES) == set(HFTConfig.field_names())


def test_defaults_when_nothing_is_set():
    assert env.load_config({}) == HFTConfig()
    assert env.is_enabled({}) is False


@pytest.mark.parametrize("text,expected", [("1", True), ("true", True), (" ON ", True), ("yes", True),
                                           ("0", False), ("false", False), ("", False), ("Off", False)])
def test_enable_values(text, expected):
    assert env.is_enabled({"HFT_ENABLE": text}) is expected


def test_every_variable_is_read():
    config = env.load_config({"HFT_RATIO": "0.3", "HFT_STRATEGY": "layer", "HFT_ROUND": "2", "HFT_SEED": "7",
                              "HFT_TRAIN_EMBEDDINGS": "0"})
    assert config == HFTConfig(ratio=0.3, strategy="layer", round=2, seed=7, train_embeddings=False)


@pytest.mark.parametrize("variable,value", [
    ("HFT_RATIO", "abc"), ("HFT_RATIO", "1.5"), ("HFT_RATIO", "nan"), ("HFT_ROUND", "-1"), ("HFT_ROUND", "1.5"),
    ("HFT_SEED", "x"), ("HFT_TRAIN_EMBEDDINGS", "maybe"), ("HFT_STRATEGY", "  "),
])
def test_malformed_value_names_the_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        env.load_config({variable: value})
    assert variable in str(info.value) and repr(value) in str(info.value)


def test_malformed_enable_names_the_variable():
    with pytest.raises(ConfigError, match="HFT_ENABLE='ture'"):
        env.is_enabled({"HFT_ENABLE": "ture"})
    assert env.maybe_enabled({"HFT_ENABLE": "ture"})  # the hook arms, training then fails loudly


def test_missing_config_file_names_the_variable(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"HFT_CONFIG=.*nope\.yaml.*no such file"):
        env.load_config({"HFT_CONFIG": str(missing)})


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.yaml").write_text("round: 3\nstrategy: layer\ntrain_embeddings: false\n")
    (tmp_path / "b.json").write_text(json.dumps({"ratio": 0.25, "seed": 4}))
    assert env.load_config({"HFT_CONFIG": str(tmp_path / "a.yaml")}) == HFTConfig(round=3, strategy="layer",
                                                                                  train_embeddings=False)
    assert env.load_config({"HFT_CONFIG": str(tmp_path / "b.json")}) == HFTConfig(ratio=0.25, seed=4)


@pytest.mark.parametrize("text,match", [
    ("rund: 1\n", r"unknown key 'rund'.*Did you mean 'round'"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("round: [1\n", "could not be parsed"),
    ("round: one\n", r"HFT_CONFIG=.*round='one'"),
    ("!!python/object/apply:os.system ['true']\n", "could not be parsed"),  # safe_load only
])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "hft.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        env.load_config({"HFT_CONFIG": str(path)})


def test_precedence_call_over_variables_over_file_over_defaults(tmp_path):
    path = tmp_path / "hft.yaml"
    path.write_text("round: 1\nseed: 5\nstrategy: layer\n")
    environ = {"HFT_CONFIG": str(path), "HFT_ROUND": "2", "HFT_RATIO": "0.4"}
    config = env.load_config(environ, round=3, seed=None)
    assert config.round == 3          # call argument beats the variable and the file
    assert config.ratio == 0.4        # variable beats the default
    assert config.seed == 5           # file beats the default; None means "not given"
    assert config.strategy == "layer"
    assert env.load_config(environ).round == 2  # variable beats the file


def test_disabled_adapters():
    assert env.disabled_adapters({"HFT_DISABLE_ADAPTERS": " LlamaFactory, openrlhf ,"}) == {"llamafactory", "openrlhf"}
    assert env.disabled_adapters({}) == frozenset()


def test_export_round_trips():
    config = HFTConfig(ratio=0.3, strategy="layer", round=2, seed=1, train_embeddings=False)
    environ = env.export(config, {})
    assert environ["HFT_ENABLE"] == "1"
    assert env.load_config(environ) == config
    with pytest.raises(ConfigError, match="rnd"):
        env.export({"rnd": 1}, {})


def test_hft_run_builds_the_environment(tmp_path):
    path = tmp_path / "hft.yaml"
    path.write_text("seed: 9\n")
    environ, command = build_environment(
        ["--ratio", "0.3", "--round", "2", "--freeze-embeddings", "--config", str(path),
         "--disable-adapter", "openrlhf", "--", "torchrun", "--nproc_per_node", "2", "train.py", "--round", "7"],
        {"PATH": "/bin"})
    assert command == ["torchrun", "--nproc_per_node", "2", "train.py", "--round", "7"]
    assert environ["PATH"] == "/bin"
    assert (environ["HFT_ENABLE"], environ["HFT_RATIO"], environ["HFT_ROUND"]) == ("1", "0.3", "2")
    assert environ["HFT_TRAIN_EMBEDDINGS"] == "0" and environ["HFT_DISABLE_ADAPTERS"] == "openrlhf"
    assert env.load_config(environ) == HFTConfig(ratio=0.3, round=2, seed=9, train_embeddings=False)


def test_hft_run_rejects_bad_values_before_running():
    # a flag's value is reported as the flag the user typed, not as the variable it becomes
    with pytest.raises(ConfigError, match=r"^--ratio='abc' is not a number"):
        build_environment(["--ratio", "abc", "--", "true"], {})
    with pytest.raises(ConfigError, match=r"^--round='-1' is not a round"):
        build_environment(["--round=-1", "--", "true"], {})
    with pytest.raises(ConfigError, match=r"^--seed='1_0'"):
        build_environment(["--seed", "1_0", "--", "true"], {})
    # an inherited variable is reported as the variable
    with pytest.raises(ConfigError, match=r"^HFT_RATIO='abc'"):
        build_environment(["--", "true"], {"HFT_RATIO": "abc"})


@pytest.mark.parametrize("argv, environ, match", [
    (["--strategy", "catgory"], {}, r"--strategy='catgory' is not a known strategy\. Did you mean 'category'\?"),
    ([], {"HFT_STRATEGY": "layr"}, r"HFT_STRATEGY='layr' is not a known strategy\. Did you mean 'layer'\?"),
])
def test_hft_run_checks_the_strategy_like_hft_plan(argv, environ, match):
    with pytest.raises(ConfigError, match=match):
        build_environment([*argv, "--", "true"], environ)


def test_hft_run_strategy_in_a_config_file(tmp_path):
    path = tmp_path / "hft.yaml"
    path.write_text("strategy: modle\n")
    with pytest.raises(ConfigError, match=r"HFT_CONFIG=.*hft.yaml.*strategy='modle' is not a known strategy"):
        build_environment(["--config", str(path), "--", "true"], {})


def test_hft_run_accepts_every_known_strategy_and_next():
    for name in ("category", "layer", "model"):
        environ, _ = build_environment(["--strategy", name, "--round", "next", "--", "true"], {})
        assert environ["HFT_STRATEGY"] == name and environ["HFT_ROUND"] == "next"


# -- strict parsing: every value is one the docs name, or an error naming the variable and the values --
@pytest.mark.parametrize("value", ["flase", "ture", "2", "enable", "y", "1.0"])
def test_mistyped_enable_is_an_error_naming_the_accepted_values(value):
    for read in (env.is_enabled, env.load_config, env.switched_off):
        with pytest.raises(ConfigError) as info:
            read({"HFT_ENABLE": value})
        message = str(info.value)
        assert f"HFT_ENABLE={value!r}" in message and "1/true/yes/on" in message and "0/false/no/off" in message


@pytest.mark.parametrize("variable", ["HFT_TRAIN_EMBEDDINGS", "HFT_ROUND", "HFT_SEED", "HFT_RATIO", "HFT_STRATEGY"])
def test_an_empty_value_of_a_set_variable_is_an_error(variable):
    with pytest.raises(ConfigError, match=f"{variable}=''"):
        env.load_config({variable: ""})


def test_empty_train_embeddings_is_not_false():
    with pytest.raises(ConfigError, match=r"HFT_TRAIN_EMBEDDINGS='' is empty; accepted values: 1/true/yes/on or 0/false/no/off"):
        env.load_config({"HFT_TRAIN_EMBEDDINGS": ""})


@pytest.mark.parametrize("variable, value", [
    ("HFT_ROUND", "1_0"), ("HFT_ROUND", "+1"), ("HFT_ROUND", "0x1"), ("HFT_ROUND", "\u0661"), ("HFT_ROUND", "1e1"),
    ("HFT_SEED", "1_000"), ("HFT_SEED", "-0"), ("HFT_RATIO", "0_5"), ("HFT_RATIO", "inf"), ("HFT_RATIO", "0x0.8p0"),
    ("HFT_ROUND", "nextt"),
])
def test_only_plain_decimal_numbers(variable, value):
    with pytest.raises(ConfigError) as info:
        env.load_config({variable: value})
    assert f"{variable}={value!r}" in str(info.value)


@pytest.mark.parametrize("environ, field, expected", [
    ({"HFT_ROUND": " 12 "}, "round", 12), ({"HFT_ROUND": "next"}, "round", "next"), ({"HFT_ROUND": "NEXT"}, "round", "next"),
    ({"HFT_RATIO": ".25"}, "ratio", 0.25), ({"HFT_RATIO": "2.5e-1"}, "ratio", 0.25), ({"HFT_SEED": "007"}, "seed", 7),
    ({"HFT_TRAIN_EMBEDDINGS": "OFF"}, "train_embeddings", False), ({"HFT_ENABLE": " Yes "}, "round", 0),
])
def test_accepted_spellings(environ, field, expected):
    assert getattr(env.load_config(environ), field) == expected


def test_given_options_are_remembered():
    # what the variables set is what round='next' keeps; the rest comes from the previous round
    assert env.load_config({"HFT_ROUND": "next", "HFT_SEED": "0"}).given == {"round", "seed"}
    assert env.load_config({"HFT_ROUND": "next"}, ratio=0.3).given == {"round", "ratio"}


def test_hft_run_subcommand_refuses_before_running(capsys, tmp_path, monkeypatch):
    from hft_plugin.cli import main

    def execve(path, argv, environ):  # running the command would replace this test process
        open(ran, "w").close()
        raise SystemExit(0)

    monkeypatch.setattr("os.execve", execve)
    ran = tmp_path / "ran"
    assert main(["run", "--strategy", "catgory", "--", "touch", str(ran)]) == 2
    assert "--strategy='catgory' is not a known strategy" in capsys.readouterr().err and not ran.exists()
    assert main(["run", "--ratio", "abc", "--", "touch", str(ran)]) == 2
    err = capsys.readouterr().err
    assert "--ratio='abc'" in err and "HFT_RATIO" not in err and not ran.exists()


# -- names: a misspelt variable is an error with a suggestion, never a silent default -------------------
@pytest.mark.parametrize("name, meant", [
    ("HFT_RATO", "HFT_RATIO"), ("HFT_ROUNDS", "HFT_ROUND"), ("hft_ratio", "HFT_RATIO"), ("HFT_SEEDS", "HFT_SEED"),
    ("HFT_TRAIN_EMBEDDING", "HFT_TRAIN_EMBEDDINGS"), ("HFT_CONFIG_FILE", "HFT_CONFIG"), ("HFT_ENABLED", "HFT_ENABLE"),
])
def test_a_misspelt_variable_is_an_error_with_a_suggestion(name, meant):
    environ = {"HFT_ENABLE": "1", name: "0.25"}
    for read in (env.load_config, env.training_config):
        with pytest.raises(ConfigError, match=rf"^{name}='0.25' is not a variable hft-plugin reads.*Did you mean {meant}\?"):
            read(environ)
    with pytest.raises(ConfigError, match=rf"^{name}='0.25'.*Did you mean {meant}\?"):  # hft-run, before running
        build_environment(["--", "true"], {name: "0.25"})


def test_every_misspelt_name_is_named():
    with pytest.raises(ConfigError, match=r"^HFT_RATO=.*\(and HFT_ROUDN\)\. Did you mean HFT_RATIO\?"):
        env.load_config({"HFT_RATO": "0.25", "HFT_ROUDN": "1"})


def test_a_name_like_none_is_one_warning_and_ignored(caplog):
    environ = {"HFT_ENABLE": "1", "HFT_API_KEY": "secret", "HFT_ROUND": "1"}
    with caplog.at_level("WARNING", logger="hft_plugin"):
        assert env.load_config(environ).round == 1
        env.load_config(environ)
    lines = [r.getMessage() for r in caplog.records if "HFT_API_KEY" in r.getMessage()]
    assert len(lines) == 1 and "is not a variable hft-plugin reads; it is ignored" in lines[0]
    assert "secret" not in lines[0]  # another tool's value is not printed


def test_every_documented_and_tooling_name_is_accepted():
    environ = {name: "1" for name in env.TOOLING_VARIABLES}
    environ.update(HFT_ENABLE="1", HFT_DISABLE_PLUGIN_AUTOLOAD="1", HFT_SHARE_REFERENCE="1", HFT_DISABLE_ADAPTERS="swift")
    assert env.unknown_variables(environ) == []
    assert env.load_config(environ) == HFTConfig()
