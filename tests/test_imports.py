"""Imports point down only: the core knows no framework and no start-up machinery.

The core is every module of ``hft_plugin`` outside ``adapters/`` and ``bootstrap/``, except the
entry faces that join the layers on purpose: ``__init__.py`` (the public names, the adapters' among
them), ``auto.py`` (switches the start-up hook on) and ``cli.py`` (``hft run`` is ``hft-run``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hft_plugin"
UPPER = ("adapters", "bootstrap")
ENTRY_FACES = {"__init__.py", "auto.py", "cli.py"}


def core_modules() -> list[pathlib.Path]:
    return sorted(path for path in PACKAGE.rglob("*.py")
                  if path.relative_to(PACKAGE).parts[0] not in UPPER
                  and path.relative_to(PACKAGE).as_posix() not in ENTRY_FACES)


def imported(source: str, where: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the text of the module at
    ``where`` (its path inside the package), at any depth (inside functions too)."""
    package = ["hft_plugin", *where.split("/")[:-1]]
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # from . import adapters
    return found


def upward(module: str) -> bool:
    return any(module == f"hft_plugin.{name}" or module.startswith(f"hft_plugin.{name}.") for name in UPPER)


def test_the_walk_sees_the_core():
    names = {path.relative_to(PACKAGE).as_posix() for path in core_modules()}
    assert {"selection.py", "sharing.py", "reset.py", "forgetting_cli.py", "layouts/base.py"} <= names
    assert not names & ENTRY_FACES and not any(n.startswith(UPPER) for n in names)


def test_the_check_catches_each_form_of_import():
    code = ("from ..adapters import base\nimport hft_plugin.bootstrap.env\nfrom . import selection\n"
            "def f():\n    from .. import adapters\n")
    hits = [(line, m) for line, m in imported(code, "strategies/sample.py") if upward(m)]
    assert hits == [(1, "hft_plugin.adapters"), (1, "hft_plugin.adapters.base"), (2, "hft_plugin.bootstrap.env"),
                    (5, "hft_plugin.adapters")]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_core_module_imports_adapters_or_bootstrap(path):
    where = path.relative_to(PACKAGE).as_posix()
    wrong = [f"line {line}: {module}" for line, module in imported(path.read_text(encoding="utf-8"), where)
             if upward(module)]
    assert not wrong, f"{path.relative_to(PACKAGE)} imports upward: {', '.join(wrong)}"


def test_variables_the_core_reads_by_name_are_declared_in_env():
    # the core reads these without importing bootstrap.env; the names must stay the declared ones
    from hft_plugin.bootstrap import env

    for module, name in (("plugins.py", env.HFT_DISABLE_PLUGIN_AUTOLOAD), ("sharing.py", env.HFT_SHARE_REFERENCE)):
        assert f'"{name}"' in (PACKAGE / module).read_text(encoding="utf-8"), (module, name)
