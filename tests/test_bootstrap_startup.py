"""The installed start-up hook, in fresh interpreters: what it does with and without HFT_ENABLE,
that it runs once, that its failures are one warning, hft-run, ``import hft_plugin.auto``, the
fail-closed optimizer guard, and that it reaches torchrun's workers."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import hft_plugin.bootstrap.startup as startup

from .helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
PTH_SOURCE = ROOT / "hft_plugin" / "bootstrap" / startup.PTH_NAME

# Run the interpreter as if the .pth line were absent: -S, then site's normal work minus our file.
WITHOUT_HOOK = textwrap.dedent("""
    import site
    _addpackage = site.addpackage
    site.addpackage = lambda d, name, known: known if name == {name!r} else _addpackage(d, name, known)
    site.main()
""").format(name=startup.PTH_NAME)


def python(code: str, *, flags=(), timeout=180, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], env=clean_env(**overrides), capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


def test_pth_is_installed_with_the_package():
    installed = [Path(d) / startup.PTH_NAME for d in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]
    found = [p for p in installed if p.is_file()]
    assert found, f"{startup.PTH_NAME} is not in site-packages: reinstall with pip install -e ."
    assert found[0].read_text() == PTH_SOURCE.read_text()
    lines = PTH_SOURCE.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")  # site executes only lines starting with import


def test_unset_imports_nothing_and_changes_no_import():
    probe = "import sys, json, torch, transformers; print(json.dumps(sorted(sys.modules)))"
    with_hook = python(probe)
    without_hook = python(WITHOUT_HOOK + probe, flags=("-S",))
    assert with_hook.returncode == 0 and without_hook.returncode == 0, with_hook.stderr + without_hook.stderr
    modules = set(json.loads(with_hook.stdout))
    assert not {m for m in modules if m.startswith("hft_plugin") or m == "wrapt"}
    assert modules == set(json.loads(without_hook.stdout))
    assert with_hook.stderr == ""


def test_enabled_process_that_imports_nothing_heavy_stays_light():
    probe = ("import sys, json, hft_plugin.bootstrap.startup as s; "
             "print(json.dumps([s.status()['active'], sorted(m for m in ('torch', 'transformers', 'numpy', 'yaml') "
             "if m in sys.modules)]))")
    result = python(probe, HFT_ENABLE="1")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout) == [True, []]


@pytest.mark.parametrize("value", ["0", "off", ""])
def test_explicit_off_is_off(value):
    result = python("import sys; print('hft_plugin.bootstrap.startup' in sys.modules)", HFT_ENABLE=value)
    assert result.stdout.strip() == "False" and result.stderr == ""


def test_runs_once_even_with_site_packages_twice():
    probe = textwrap.dedent("""
        import site, sys, sysconfig
        site.addsitedir(sysconfig.get_paths()["purelib"])   # processes every .pth again
        site.addsitedir(sysconfig.get_paths()["purelib"])
        import hft_plugin.bootstrap.startup as s
        from wrapt.importer import ImportHookFinder
        print(len(s._state["hooks"]), sum(isinstance(f, ImportHookFinder) for f in sys.meta_path), s.activate())
    """)
    result = python(probe, HFT_ENABLE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(startup.ADAPTERS)), "1", "False"]


def test_broken_install_is_one_warning(tmp_path):
    fake = tmp_path / "hft_plugin"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('half-removed install')\n")
    # site-packages processed twice (as a venv's lib64 symlink does): still one warning
    twice = "import site, sysconfig; site.addsitedir(sysconfig.get_paths()['purelib']); print('alive')"
    result = python(twice, HFT_ENABLE="1", PYTHONPATH=str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "alive"
    assert result.stderr.splitlines() == ["hft_plugin: start-up hook disabled: RuntimeError('half-removed install')"]


def test_error_inside_activate_is_one_warning(tmp_path):
    (tmp_path / "wrapt.py").write_text("raise ImportError('wrapt is broken')\n")
    result = python("print('alive')", HFT_ENABLE="1", PYTHONPATH=str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "alive"
    assert result.stderr.splitlines() == ["hft_plugin: start-up hook disabled: ImportError('wrapt is broken')"]


@pytest.mark.slow
def test_transformers_is_instrumented_when_its_trainer_is_imported():
    probe = textwrap.dedent("""
        import hft_plugin.bootstrap.startup as s
        before = s.status()["instrumented"]
        import transformers.trainer
        from hft_plugin.adapters.base import is_patched
        print(before, s.status()["instrumented"], is_patched(transformers.trainer, "Trainer._prepare_for_training"))
    """)
    result = python(probe, HFT_ENABLE="1", HFT_ROUND="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "['transformers']", "True"]
    skipped = python(probe, HFT_ENABLE="1", HFT_DISABLE_ADAPTERS="transformers")
    assert skipped.stdout.split() == ["[]", "[]", "False"], skipped.stderr


def test_malformed_variable_spares_other_processes_and_stops_training():
    probe = textwrap.dedent("""
        import torch, transformers.trainer
        print("imported")
        try:
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    result = python(probe, HFT_ENABLE="1", HFT_RATIO="abc")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first == "imported"
    # the error to fix, first and as itself: not an IntegrationError about adapters
    assert second.startswith("ConfigError HFT_RATIO='abc' is not a number")
    assert len(result.stderr.splitlines()) == 1 and "HFT_RATIO='abc'" in result.stderr


def test_guard_refuses_an_optimizer_when_an_adapter_failed():
    probe = textwrap.dedent("""
        import torch, hft_plugin.bootstrap.startup as s
        from hft_plugin import apply_selection, select_half
        from hft_plugin.testing import tiny_model
        from hft_plugin.adapters.base import Adapter
        import sys, types
        fake = types.ModuleType("fake_adapters")
        class FutureAdapter(Adapter):
            name = "future"
            instruments = ("torch >= 99",)
            def __init__(self, config=None):
                super().__init__()
        fake.FutureAdapter = FutureAdapter
        sys.modules["fake_adapters"] = fake
        s.ADAPTERS["broken"] = ("json", "hft_plugin.no_such_module:Adapter")
        s.ADAPTERS["future"] = ("json", "fake_adapters:FutureAdapter")
        print(s.instrument("broken"), s.instrument("future"))
        params = [torch.nn.Parameter(torch.zeros(2))]
        try:
            torch.optim.SGD(params, lr=0.1)
            print("built")
        except Exception as exc:
            print(type(exc).__name__, "torch >= 99" in str(exc), "no_such_module" in str(exc))
        model = tiny_model("llama")
        handle = apply_selection(model, select_half(model))  # HFT is in force: the guard lets it pass
        torch.optim.SGD(handle.parameters(), lr=0.1)
        handle.remove()
        s.deactivate()
        torch.optim.SGD(params, lr=0.1)
        print("built after deactivate")
    """)
    result = python(probe, HFT_ENABLE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["False False", "IntegrationError True True", "built after deactivate"]
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "the broken adapter is not active: ModuleNotFoundError" in lines[0]
    assert ("the future adapter is not active: hft_plugin needs torch >= 99; the installed version is "
            f"{importlib.metadata.version('torch')}") in lines[1]


def test_hft_run_reaches_the_command():
    hft_run = shutil.which("hft-run")
    assert hft_run, "hft-run is not on PATH: pip install -e ."
    probe = ("import os, hft_plugin.bootstrap.startup as s; "
             "print(os.environ['HFT_ROUND'], os.environ['HFT_RATIO'], s.status()['active'])")
    result = subprocess.run([hft_run, "--round", "2", "--ratio", "0.4", "--", sys.executable, "-c", probe],
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "0.4", "True"]
    bad = subprocess.run([hft_run, "--ratio", "abc", "--", sys.executable, "-c", "print('ran')"],
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "--ratio='abc'" in bad.stderr
    typo = subprocess.run([hft_run, "--strategy", "catgory", "--", sys.executable, "-c", "print('ran')"],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and typo.stdout == "" and "--strategy='catgory'" in typo.stderr
    missing = subprocess.run([hft_run, "--", "no-such-command-hft"], env=clean_env(), capture_output=True, text=True)
    assert missing.returncode == 127 and "not found" in missing.stderr


def test_import_auto():
    probe = "import os, hft_plugin.auto, hft_plugin.auto; from hft_plugin.bootstrap import startup as s; print(os.environ['HFT_ENABLE'], s.status()['active'])"
    result = python(probe)
    assert result.returncode == 0 and result.stdout.split() == ["1", "True"], result.stderr
    off = python(probe, HFT_ENABLE="0")
    assert off.stdout.split() == ["0", "False"] and "ignored because HFT_ENABLE is set to off" in off.stderr


@pytest.mark.slow
def test_torchrun_workers_arm_themselves(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import json, os
        import transformers.trainer
        import hft_plugin.bootstrap.startup as s
        print(json.dumps([os.environ["RANK"], s.status()["instrumented"]]), flush=True)
    """))
    torchrun = shutil.which("torchrun")
    assert torchrun
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(script)],
                            env=clean_env(HFT_ENABLE="1", OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = sorted(json.loads(line) for line in result.stdout.splitlines() if line.startswith("["))
    assert seen == [["0", ["transformers"]], ["1", ["transformers"]]]


@pytest.mark.slow
def test_wheel_carries_the_pth_at_its_root(tmp_path):
    """A regular (non-editable) install gets the hook too: the wheel has it beside the package."""
    import zipfile

    source = tmp_path / "src"  # setuptools builds in the tree: keep the checkout clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".nox", ".venv*", "build", "*.egg-info",
                                                                 "__pycache__", "benchmarks", "docs", "tests"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next(tmp_path.glob("hft_plugin-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(startup.PTH_NAME).decode() == PTH_SOURCE.read_text()
        assert "hft_plugin/bootstrap/startup.py" in archive.namelist()
