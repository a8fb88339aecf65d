"""One GPU check: what only a CUDA GPU can show, in one script, within 8 minutes on one GPU.

    python benchmarks/gpu_check.py                 # on one CUDA GPU; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --cpu-check     # the same code paths on CPU with tiny models (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --only fsdp2,zero3

Each part runs in its own process, in this order, under one 8-minute budget:

``openrlhf``
    A real ``openrlhf.cli.train_sft`` run with ``HFT_ENABLE=1`` under ``torchrun --nproc_per_node 1``:
    a small Llama written to disk (bf16), 8 samples, 2 optimizer steps, ZeRO-2. Checks the saved
    model against the input (frozen tensors bit-identical, trainable ones moved) and that
    ``hft_selection.json`` is beside it. The interpreter: this one if it imports ``openrlhf``, else
    the environment ``.ci/openrlhf.sh`` builds (``--openrlhf-python`` overrides). flash-attn is
    often missing on a fresh GPU machine: OpenRLHF imports it at module level, so the launcher
    then installs the same stand-in modules as tests/test_openrlhf.py and runs with
    ``--ds.attn_implementation sdpa`` (no packing, so flash-attn is never called); without a CUDA
    toolkit (nvcc) and ninja DeepSpeed cannot build FusedAdam, so the launcher then sets ``torch_adam``
    in the DeepSpeed optimizer block (torch's AdamW). The JSON records both choices.
    With ``--cpu-check`` (OpenRLHF needs CUDA): OpenRLHF's own ``train_sft`` parses the exact
    command line, the process is checked to have HFT armed on ``DeepspeedStrategy``, and
    OpenRLHF's ``SFTDataset`` reads the data with the saved tokenizer; no step.
``fsdp2``
    The HF Trainer with ``enable_hft`` and ``fsdp_config={"version": 2}`` on one rank
    (``torchrun --nproc_per_node 1``), bf16, Llama and Phi-3 (fused tensors masked on the shard).
    With ``--cpu-check`` accelerate reaches FSDP2 on CPU through :mod:`hft_plugin.testing_fsdp`.
``zero3``
    The HF Trainer with ``enable_hft`` and DeepSpeed ZeRO-3 on one rank, bf16 (fp32 on CPU), Llama
    and Phi-3, with the trainer's optimizer and with a DeepSpeed config optimizer (``torch_adam``).
``speed-llama-1b``, ``speed-moe``
    ``benchmarks/speed_gpu.py``'s measurement (FFT and HFT steps alternating, optimizer state,
    peak memory) for llama-1b and moe-0.7b (Qwen3-MoE layout) in bf16 at ratio 0.5; the tiny and
    tiny-moe configs on CPU.

Every check of the Trainer parts is HFT's promise: frozen elements bit-identical (full tensors
gathered), trainable ones moved, the optimizer owns exactly the trainable tensors,
``hft_selection.json`` written. The JSON holds per part ``ok``, ``seconds``, the figures and, on
failure, the reason; the script exits 1 if any part failed, and prints each reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # run from a checkout without installing

BUDGET_S = 480
PARTS = ("openrlhf", "fsdp2", "zero3", "speed-llama-1b", "speed-moe")
TIMEOUTS = {"openrlhf": 240, "fsdp2": 120, "zero3": 180, "speed-llama-1b": 180, "speed-moe": 150}
SPEED_MODELS = {"speed-llama-1b": ("llama-1b", "tiny"), "speed-moe": ("moe-0.7b", "tiny-moe")}


# -- the parent: run each part in its own process ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(python: str, *args: str) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *args]


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _run(cmd: list[str], timeout: float, env: dict, cwd: str | None = None) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-4000:]
        return 124, f"timed out after {timeout:.0f} s\n{out}"
    return proc.returncode, (proc.stdout + proc.stderr)


def run_part(part: str, args, timeout: float, workdir: str) -> dict:
    """Run one part in a child process; returns its record (ok, seconds, figures or error)."""
    result_file = os.path.join(workdir, f"{part}.json")
    flags = ["--cpu-check"] if args.cpu_check else []
    if part == "openrlhf":
        return run_openrlhf(args, timeout, workdir)
    if part in ("fsdp2", "zero3"):
        cmd = _torchrun(sys.executable, __file__, "--part", part, "--result", result_file, *flags)
    else:
        cmd = [sys.executable, __file__, "--part", part, "--result", result_file, *flags]
    rc, output = _run(cmd, timeout, _child_env())
    return _collect(rc, output, result_file)


def _collect(rc: int, output: str, result_file: str) -> dict:
    record = {}
    if os.path.exists(result_file):
        with open(result_file) as f:
            record = json.load(f)
    if rc != 0 or not record.get("ok"):
        record["ok"] = False
        record.setdefault("error", f"exit status {rc}")
        record["output_tail"] = output[-3000:]
    return record


# -- OpenRLHF ---------------------------------------------------------------------------------------
FLASH_ATTN_STUB_MODULES = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")


def _openrlhf_python(args) -> tuple[str | None, str]:
    if args.openrlhf_python:
        return args.openrlhf_python, "given with --openrlhf-python"
    probe = subprocess.run([sys.executable, "-c", "import openrlhf"], capture_output=True, env=_child_env())
    if probe.returncode == 0:
        return sys.executable, "this interpreter"
    setup = subprocess.run(["bash", os.path.join(ROOT, ".ci", "openrlhf.sh"), "--setup-only"], capture_output=True,
                           text=True, env=dict(os.environ, PYTHON=sys.executable))
    if setup.returncode == 0 and setup.stdout.strip():
        return setup.stdout.strip().splitlines()[-1], ".ci/openrlhf.sh environment"
    return None, f".ci/openrlhf.sh failed: {setup.stderr[-800:]}"


def write_sft_inputs(workdir: str, cpu: bool) -> tuple[str, str]:
    """A small Llama (bf16, saved with its tokenizer) and an 8-sample JSONL data set."""
    import torch

    from hft_plugin.testing import tiny_model, tiny_tokenizer

    model_dir, data = os.path.join(workdir, "sft-model"), os.path.join(workdir, "sft-data.jsonl")
    size = {} if cpu else dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    tiny_model("llama", **size).to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    texts = ["the cat sat on the mat.", "a dog ran in the park!", "birds sing at dawn.", "rain falls on the roof."]
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"input": f"q{i}: say something", "output": texts[i % len(texts)]}) + "\n")
    return model_dir, data


def sft_arguments(model_dir: str, data: str, out: str, attn: str) -> list[str]:
    return ["--model.model_name_or_path", model_dir, "--data.dataset", data, "--data.input_key", "input",
            "--data.output_key", "output", "--data.max_len", "128", "--data.max_samples", "8",
            "--train.micro_batch_size", "2", "--train.batch_size", "4", "--train.max_epochs", "1",
            "--ds.zero_stage", "2", "--ds.param_dtype", "bf16", "--ds.attn_implementation", attn,
            "--adam.lr", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--max_norm", "1.0",
            "--ckpt.output_dir", out, "--ckpt.path", os.path.join(out, "ckpt"), "--ckpt.save_steps", "-1",
            "--ckpt.disable_ds", "--logger.logging_steps", "1"]


def run_openrlhf(args, timeout: float, workdir: str) -> dict:
    start = time.monotonic()
    python, where = _openrlhf_python(args)
    record: dict = {"interpreter": where}
    if python is None:
        return {**record, "ok": False, "error": f"no OpenRLHF environment: {where}"}
    probe = subprocess.run([python, "-c", "import flash_attn"], capture_output=True, env=_child_env())
    has_flash = probe.returncode == 0
    record["flash_attn"] = "installed" if has_flash else (
        "missing: stand-in modules (OpenRLHF imports flash_attn at module level; with sdpa and no packing it is never called)")
    attn = "flash_attention_2" if has_flash and not args.cpu_check else "sdpa"
    model_dir, data = write_sft_inputs(workdir, args.cpu_check)
    out = os.path.join(workdir, "sft-out")
    result_file = os.path.join(workdir, "openrlhf.json")
    launcher = [__file__, "--part", "openrlhf-launch", "--result", result_file, *(["--cpu-check"] if args.cpu_check else [])]
    cmd = _torchrun(python, *launcher, "--", *sft_arguments(model_dir, data, out, attn))
    rc, output = _run(cmd, timeout, _child_env({"HFT_ENABLE": "1", "HFT_ROUND": "0"}), cwd=workdir)
    record.update(_collect(rc, output, result_file))
    record["attn_implementation"] = attn
    if record["ok"] and not args.cpu_check:
        try:
            record.update(compare_saved(model_dir, out))
        except Exception as exc:  # recorded, the part fails
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    record["seconds"] = round(time.monotonic() - start, 1)
    return record


def compare_saved(model_dir: str, out: str) -> dict:
    """The saved model against the input: frozen tensors bit-identical, trainable ones moved."""
    from safetensors.torch import load_file

    from hft_plugin import Selection
    from hft_plugin.selection import MANIFEST_NAME
    from hft_plugin.testing import assert_frozen_and_trained

    manifest = os.path.join(out, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        raise AssertionError(f"no {MANIFEST_NAME} in {out}: HFT did not reach OpenRLHF")
    before, after = load_file(os.path.join(model_dir, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    counts = assert_frozen_and_trained(Selection.load(manifest), before, after)
    return {"saved_model_check": counts, "manifest": True}


def launch_openrlhf(argv: list[str], cpu: bool) -> dict:
    """Inside torchrun: run ``openrlhf.cli.train_sft`` as its CLI does, with HFT armed."""
    import importlib.machinery
    import runpy
    import types

    found: dict = {}
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or a build for another torch: OpenRLHF only needs the import to work
        for name in FLASH_ATTN_STUB_MODULES:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
            module.__path__ = []
            sys.modules[name] = module
        padding = sys.modules["flash_attn.bert_padding"]
        for fn in ("index_first_axis", "pad_input", "rearrange", "unpad_input"):
            setattr(padding, fn, lambda *a, **k: None)
        sys.modules["flash_attn.utils.distributed"].all_gather = lambda *a, **k: None
        found["flash_attn_stubbed"] = True
    if getattr(sys, "_hft_plugin_pth", False):
        found["activation"] = "the installed start-up hook (hft-plugin.pth)"
    else:
        from hft_plugin.bootstrap.startup import activate

        activate()  # what the .pth line runs, when hft-plugin is not installed in this interpreter
        found["activation"] = "hft_plugin.bootstrap.startup.activate() (no .pth in this interpreter)"
    import openrlhf.utils
    import openrlhf.utils.deepspeed.deepspeed as strategy_module

    from hft_plugin.adapters.base import is_patched

    found["hft_armed"] = is_patched(strategy_module, "DeepspeedStrategy._ds_init_train_model")
    if not found["hft_armed"]:
        raise AssertionError("HFT_ENABLE=1 did not arm the OpenRLHF adapter")
    if cpu:
        found["optimizer"] = "not built (dry run)"
    elif not _fused_adam_available():
        original = strategy_module.DeepspeedStrategy.get_ds_train_config

        def get_ds_train_config(self, *a, **k):
            config = original(self, *a, **k)
            config.get("optimizer", {}).setdefault("params", {})["torch_adam"] = True
            return config

        strategy_module.DeepspeedStrategy.get_ds_train_config = get_ds_train_config
        found["optimizer"] = "torch AdamW (torch_adam): DeepSpeed's FusedAdam is not prebuilt and cannot be built here"
    else:
        found["optimizer"] = "DeepSpeed's choice (FusedAdam on CUDA)"

    class DryRun(Exception):
        pass

    if cpu:
        def get_strategy(args):
            raise DryRun(args)

        openrlhf.utils.get_strategy = get_strategy
    sys.argv = ["openrlhf.cli.train_sft", *argv]
    start = time.monotonic()
    try:
        runpy.run_module("openrlhf.cli.train_sft", run_name="__main__", alter_sys=True)
        found["mode"] = "train_sft ran to the end"
    except DryRun as parsed:
        found["mode"] = ("dry run (--cpu-check: OpenRLHF needs CUDA): train_sft parsed the arguments and OpenRLHF's "
                         "dataset code read the data; no step")
        found["parsed_attn_implementation"] = parsed.args[0].ds.attn_implementation
        found["sft_samples"] = _sft_samples(parsed.args[0])
    found["train_seconds"] = round(time.monotonic() - start, 1)
    return found


def _fused_adam_available() -> bool:
    """DeepSpeed's FusedAdam is prebuilt, or can be JIT-built (a CUDA toolkit and ninja)."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return True
    except Exception:
        pass
    from torch.utils.cpp_extension import CUDA_HOME

    has_ninja = shutil.which("ninja") is not None
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) and has_ninja


def _sft_samples(args) -> int:
    """How many samples OpenRLHF's own SFTDataset makes of the data with the saved tokenizer (the
    strategy it reads ``args`` and ``print`` from stood in), so an input that filters to nothing
    fails on CPU rather than on the GPU."""
    from types import SimpleNamespace

    from openrlhf.datasets import SFTDataset
    from openrlhf.datasets.utils import blending_datasets
    from transformers import AutoTokenizer

    strategy = SimpleNamespace(args=args, print=lambda *a, **k: None, is_rank_0=lambda: True)
    tokenizer = AutoTokenizer.from_pretrained(args.model.model_name_or_path)
    data = blending_datasets(args.data.dataset, None, strategy, args.train.seed, max_count=args.data.max_samples,
                             dataset_split=args.data.dataset_split)
    dataset = SFTDataset(data, tokenizer, args.data.max_len, strategy, pretrain_mode=args.model.pretrain_mode_enable,
                         input_template=args.data.input_template, multiturn=args.data.multiturn)
    if len(dataset) < args.train.batch_size:
        raise AssertionError(f"OpenRLHF's SFTDataset made {len(dataset)} samples of the data, fewer than one batch")
    return len(dataset)


# -- the HF Trainer parts ---------------------------------------------------------------------------
class _TokenData:
    """Fixed-length random token rows (labels = inputs), for Trainer's default collator."""

    def __init__(self, n: int = 16, length: int = 16, vocab: int = 96):
        import torch

        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(3, vocab, (length,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _full(model) -> dict:
    """Every parameter in full, fp32 copies: FSDP2 shards gathered, ZeRO-3 partitions gathered."""
    import contextlib

    params = list(model.parameters())
    context = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with context:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
                for n, p in model.named_parameters()}


def _owned(trainer) -> list:
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(engine_optimizer, attr, None)
        if groups:
            return [p for group in groups for p in group]
    from hft_plugin.optimizers import unwrap as _unwrap_optimizer

    return [p for group in _unwrap_optimizer(trainer.optimizer).param_groups for p in group["params"]]


def trainer_run(family: str, out: str, cpu: bool, **arguments) -> dict:
    """Train a tiny model 3 steps through the HF Trainer with HFT; check HFT's promise."""
    from transformers import Trainer, TrainingArguments

    from hft_plugin import enable_hft
    from hft_plugin.testing import assert_frozen_and_trained, tiny_model

    args = TrainingArguments(out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             disable_tqdm=True, seed=0, use_cpu=cpu, **arguments)
    model = tiny_model(family)  # after the arguments: ZeRO-3 builds it partitioned
    trainer = Trainer(model=model, args=args, train_dataset=_TokenData())
    handle = enable_hft(trainer)
    before = _full(model)
    start = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - start
    after = _full(trainer.model)
    counts = assert_frozen_and_trained(handle.selection, before, after)
    owned, expected = {id(p) for p in _owned(trainer)}, {id(p) for p in handle.parameters()}
    if owned != expected:
        raise AssertionError(f"the optimizer owns {len(owned)} tensors, the trainable half is {len(expected)}")
    if not os.path.isfile(os.path.join(out, "hft_selection.json")):
        raise AssertionError("no hft_selection.json in the output directory")
    param = next(trainer.model.parameters())
    return {**counts, "optimizer_tensors": len(owned), "train_loss": round(result.training_loss, 4),
            "train_seconds": round(seconds, 2), "param_type": type(param).__name__, "device": str(param.device),
            "distributed_type": str(trainer.accelerator.distributed_type), "mixed_precision": trainer.accelerator.mixed_precision}


def part_fsdp2(cpu: bool, workdir: str) -> dict:
    from accelerate.state import AcceleratorState

    if cpu:
        from hft_plugin.testing_fsdp import install

        install()  # accelerate takes its FSDP path on CPU ranks only through this test shim
    found = {}
    layers = {"llama": "LlamaDecoderLayer", "phi3": "Phi3DecoderLayer"}
    for family in ("llama", "phi3"):
        found[family] = trainer_run(family, os.path.join(workdir, f"fsdp2-{family}"), cpu, bf16=True, weight_decay=0.1,
                                    fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layers[family]]})
        if found[family]["param_type"] != "DTensor":
            raise AssertionError(f"{family}: the model was not sharded by FSDP2")
        AcceleratorState._reset_state(reset_partial_state=False)
    return found


def part_zero3(cpu: bool, workdir: str) -> dict:
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if cpu:
        PartialState(backend="gloo")  # on CPU ranks accelerate would otherwise see no DeepSpeed
    extra = {"accelerator_config": {"use_configured_state": True}} if cpu else {"bf16": True}
    found = {}
    for ds_optimizer in (False, True):
        config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                  "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "bf16": {"enabled": "auto"}}
        if ds_optimizer:
            config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                               "eps": "auto", "torch_adam": True}}
        for family in ("llama", "phi3"):
            name = f"{'ds-optimizer' if ds_optimizer else 'create-optimizer'}-{family}"
            # fused tensors trained in part need weight_decay=0 under ZeRO (a typed error otherwise)
            found[name] = trainer_run(family, os.path.join(workdir, f"zero3-{name}"), cpu, deepspeed=config,
                                      weight_decay=0.1 if family == "llama" else 0.0, **extra)
            unset_hf_deepspeed_config()
            AcceleratorState._reset_state(reset_partial_state=False)
    return found


def part_speed(part: str, cpu: bool) -> dict:
    import speed_gpu

    model = SPEED_MODELS[part][1 if cpu else 0]
    if cpu:
        rows = speed_gpu.run(model, [0.5], 2, 1, 2, 32, "cpu", "bf16", 0, log=lambda *a: None)
    else:
        rows = speed_gpu.run(model, [0.5], 10, 3, 4, 1024, "cuda", "bf16", 3, log=lambda *a: None)
    return {"model": model, "rows": rows, "table": speed_gpu.speed.table(rows),
            "command": f"speed_gpu.run({model!r}, ratios=[0.5], ...) from benchmarks/gpu_check.py"}


def child(part: str, result_file: str, cpu: bool, rest: list[str]) -> int:
    record: dict = {"ok": False}
    start = time.monotonic()
    workdir = os.path.dirname(result_file)
    try:
        if not cpu:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device (use --cpu-check on a CPU machine)")
        if part == "openrlhf-launch":
            record.update(launch_openrlhf(rest, cpu))
        elif part == "fsdp2":
            record["figures"] = part_fsdp2(cpu, workdir)
        elif part == "zero3":
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            record["figures"] = part_zero3(cpu, workdir)
        else:
            record["figures"] = part_speed(part, cpu)
        record["ok"] = True
    except BaseException as exc:  # every failure is recorded with its reason
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["trace"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.monotonic() - start, 1)
    if os.environ.get("RANK", "0") == "0":
        with open(result_file, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0 if record["ok"] else 1


# -- main -------------------------------------------------------------------------------------------
def machine() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for package in ("transformers", "accelerate", "deepspeed", "trl"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-check", action="store_true", help="the same code paths on CPU with tiny models")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--out", default=None, help="the JSON to write (default: benchmarks/results/gpu_check.json; "
                        "with --cpu-check a file in the temporary directory)")
    parser.add_argument("--openrlhf-python", default=None, help="the interpreter of an OpenRLHF environment")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.part:
        return child(args.part, args.result, args.cpu_check, rest)

    parts = [p for p in args.only.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}")
    out = args.out or (os.path.join(tempfile.gettempdir(), "hft_gpu_check_cpu.json") if args.cpu_check
                       else os.path.join(HERE, "results", "gpu_check.json"))
    if not args.cpu_check:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device here; nothing run (use --cpu-check to check the script on CPU).",
                  file=sys.stderr)
            return 1
    report = {"mode": "cpu-check" if args.cpu_check else "gpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/gpu_check.py " + " ".join(argv), "machine": machine(),
              "budget_s": BUDGET_S, "parts": {}}
    deadline = time.monotonic() + BUDGET_S
    with tempfile.TemporaryDirectory(prefix="hft-gpu-check-") as workdir:
        for part in parts:
            left = deadline - time.monotonic()
            if left < 20:
                report["parts"][part] = {"ok": False, "error": f"not run: the {BUDGET_S} s budget was spent"}
                continue
            start = time.monotonic()
            os.makedirs(os.path.join(workdir, part), exist_ok=True)
            record = run_part(part, args, min(TIMEOUTS[part], left), os.path.join(workdir, part))
            record.setdefault("seconds", round(time.monotonic() - start, 1))
            record["wall_seconds"] = round(time.monotonic() - start, 1)
            report["parts"][part] = record
            print(f"gpu_check: {part}: {'ok' if record['ok'] else 'FAILED: ' + str(record.get('error'))} "
                  f"({record['wall_seconds']} s)", flush=True)
    report["ok"] = all(r["ok"] for r in report["parts"].values())
    report["total_seconds"] = round(sum(r["wall_seconds"] for r in report["parts"].values() if "wall_seconds" in r), 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    for part, record in report["parts"].items():
        if "table" in record.get("figures", {}):
            print(f"\n{part}:\n{record['figures']['table']}")
    print(f"\ngpu_check: {'all parts passed' if report['ok'] else 'FAILED'}; {out}")
    for part, record in report["parts"].items():
        if not record["ok"]:
            print(f"  {part}: {record.get('error')}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
