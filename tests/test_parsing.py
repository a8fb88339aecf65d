"""hft_plugin.parsing: one set of rules for a setting's text, whether a variable or a flag gave it.
(How the variables use them: tests/test_bootstrap.py; the flags of hft: tests/test_cli.py.)"""

from __future__ import annotations

import argparse

import pytest

from hft_plugin import ConfigError, parsing


@pytest.mark.parametrize("parse, text, value", [
    (parsing.parse_int, " 12 ", 12), (parsing.parse_round, "NEXT", "next"), (parsing.parse_round, "3", 3),
    (parsing.parse_ratio, ".25", 0.25), (parsing.parse_ratio, "5e-1", 0.5), (parsing.parse_path, " a.json ", "a.json"),
    (parsing.parse_bool, " Yes ", True), (parsing.parse_bool, "OFF", False), (parsing.parse_max_kl, "0.05", 0.05),
])
def test_what_each_parser_reads(parse, text, value):
    assert parse("HFT_X", text) == value


@pytest.mark.parametrize("parse, text", [
    (parsing.parse_int, "1_0"), (parsing.parse_int, "+1"), (parsing.parse_int, "-0"), (parsing.parse_int, "\u0663"),
    (parsing.parse_round, "nxt"), (parsing.parse_ratio, "0_5"), (parsing.parse_ratio, "inf"), (parsing.parse_ratio, "1"),
    (parsing.parse_path, "  "), (parsing.parse_bool, ""), (parsing.parse_bool, "flase"), (parsing.parse_max_kl, "0"),
])
def test_what_each_parser_refuses_names_the_setting(parse, text):
    with pytest.raises(ConfigError, match=r"^HFT_X="):
        parse("HFT_X", text)


def test_a_flag_is_read_by_its_variables_rules():
    seed = parsing.flag_type(parsing.parse_int, "--seed")
    assert seed("7") == 7 and seed.__name__ == "seed"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^--seed='1_0' is not a whole number"):
        seed("1_0")


def test_read_bool_takes_the_default_only_when_unset():
    assert parsing.read_bool({}, "HFT_X", True) is True
    assert parsing.read_bool({"HFT_X": "0"}, "HFT_X", True) is False
    with pytest.raises(ConfigError, match="HFT_X='' is empty"):
        parsing.read_bool({"HFT_X": ""}, "HFT_X", True)


def test_the_variables_module_names_the_same_parsers():
    from hft_plugin.bootstrap import env

    for name in ("flag_type", "parse_bool", "parse_int", "parse_round", "parse_ratio", "parse_path", "parse_max_kl"):
        assert getattr(env, name) is getattr(parsing, name), name
