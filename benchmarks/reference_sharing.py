"""DPO with HFT: the reference model sharing the policy's frozen half, against keeping its own copy.

TRL's DPOTrainer with ``enable_hft`` on a Llama with SmolLM2-135M's shapes (hidden 576, intermediate
1536, 30 layers, 9 heads, 3 key-value heads, vocabulary 49152, tied embeddings) and random weights.
The model is saved once and loaded by path, as a user's checkpoint is, so TRL loads the reference
fresh from that path. Each configuration (``share_reference=False`` / ``True``) trains the same
steps from the same seed in its own child process; peak memory is the child's own RSS high-water
mark (VmHWM from /proc/self/status: getrusage's ru_maxrss carries a parent's peak into a child).
The children also hash the policy's weights after training (they must be the same bits with and
without sharing) and the reference's logits on a fixed batch before and after training (the same
bits).

    python benchmarks/reference_sharing.py                      # smollm2-135m, 4 DPO steps each way
    python benchmarks/reference_sharing.py --model tiny --steps 2 --no-write

Results: benchmarks/results/reference_sharing.json and reference_sharing.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True),
}
TEXTS = ["the cat sat on the mat and looked at the door", "a dog ran in the park after a red ball",
         "birds sing at dawn in the tall green trees", "rain falls on the roof all night long",
         "the sun is hot today and the sea is calm", "fish swim in the sea near the old pier",
         "we read books at night by the small lamp", "snow is cold and white on the high hills"]


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: this process's own RSS high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def save_model(name: str, directory: str, seed: int = 0) -> int:
    """A LlamaForCausalLM of ``name``'s shapes with weights from ``seed``, saved with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hft_plugin.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(**MODELS[name], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def dataset(rows: int):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": f"q{i}: ", "chosen": TEXTS[i % len(TEXTS)], "rejected": TEXTS[(i + 3) % len(TEXTS)][::-1]}
        for i in range(rows)
    ])


def digest(tensors) -> str:
    """A hash of the exact bits of (name, tensor) pairs."""
    import torch

    h = hashlib.sha256()
    for name, tensor in tensors:
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def child(model_dir: str, share: bool, steps: int, batch: int, seq: int, threads: int) -> dict:
    """One DPO run with HFT in this process; what it measured, as a dict."""
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from hft_plugin import enable_hft
    from hft_plugin.adapters.transformers import hft_session

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        # disable_mmap: read the weights into memory. Otherwise transformers maps the safetensors file on
        # CPU, policy and reference share the page cache, and RSS counts those pages once per mapping:
        # nothing like a GPU run, where each model holds its own device memory.
        args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                         lr_scheduler_type="constant", weight_decay=0.0, max_length=seq, seed=0, report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                         dataloader_num_workers=0, model_init_kwargs={"dtype": "float32", "disable_mmap": True})
        trainer = DPOTrainer(model=model_dir, args=args, train_dataset=dataset(steps * batch),
                             processing_class=tokenizer)
        policy, reference = trainer.model, trainer.ref_model
        probe = torch.randint(3, tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref_logits_before = reference(input_ids=probe).logits
        rss_before, peak_before = _status_bytes("VmRSS"), _status_bytes("VmHWM")
        handle = enable_hft(trainer, share_reference=share)
        rss_after_enable = _status_bytes("VmRSS")
        report = hft_session(trainer).sharing.report
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        peak = _status_bytes("VmHWM")
        with torch.no_grad():
            ref_logits_after = reference(input_ids=probe).logits
    return dict(
        share_reference=share, summary=report.summary(),
        shared_tensors=report.shared_tensors, shared_bytes=report.shared_bytes,
        reference_tensors=report.reference_tensors, reference_bytes=report.reference_bytes,
        reference_bytes_held=report.reference_bytes - report.shared_bytes,
        rss_before_enable_bytes=rss_before, rss_after_enable_bytes=rss_after_enable, peak_rss_bytes=peak,
        peak_before_enable_bytes=peak_before,
        train_s=train_s, steps=steps, trainable_ratio=handle.selection.trainable_ratio,
        policy_digest=digest(sorted(policy.named_parameters())),
        reference_logits_before=digest([("logits", ref_logits_before)]),
        reference_logits_after=digest([("logits", ref_logits_after)]),
    )


def run_children(model_dir: str, steps: int, batch: int, seq: int, threads: int, log=print) -> list[dict]:
    rows = []
    for share in (False, True):
        command = [sys.executable, os.path.abspath(__file__), "--child", model_dir, str(int(share)), str(steps),
                   str(batch), str(seq), str(threads)]
        environ = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        environ.pop("HFT_SHARE_REFERENCE", None)
        result = subprocess.run(command, capture_output=True, text=True, env=environ)
        if result.returncode != 0:
            raise RuntimeError(f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        log(f"share_reference={share}: peak RSS {row['peak_rss_bytes'] / 2**20:,.0f} MiB, reference holds "
            f"{row['reference_bytes_held'] / 2**20:,.1f} MiB; {row['summary']}")
        rows.append(row)
    return rows


def proof(rows: list[dict]) -> dict:
    off, on = rows
    return dict(
        policy_bit_identical_with_and_without_sharing=off["policy_digest"] == on["policy_digest"],
        reference_logits_bit_identical_after_training=all(
            r["reference_logits_before"] == r["reference_logits_after"] for r in rows),
        reference_logits_the_same_with_and_without_sharing=off["reference_logits_after"] == on["reference_logits_after"],
        peak_saved_bytes=off["peak_rss_bytes"] - on["peak_rss_bytes"],
        peak_ratio=on["peak_rss_bytes"] / off["peak_rss_bytes"],
    )


def table(rows: list[dict]) -> str:
    head = ("| reference | tensors shared | reference bytes held | RSS before / after enable_hft "
            "| peak RSS (VmHWM) at load / end | training time | policy after training (sha256) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {'shares the frozen half' if r['share_reference'] else 'own copy (share_reference=False)'} "
            f"| {r['shared_tensors']} of {r['reference_tensors']} "
            f"| {r['reference_bytes_held'] / 2**20:,.1f} MiB of {r['reference_bytes'] / 2**20:,.1f} MiB "
            f"| {r['rss_before_enable_bytes'] / 2**20:,.0f} / {r['rss_after_enable_bytes'] / 2**20:,.0f} MiB "
            f"| {r['peak_before_enable_bytes'] / 2**20:,.0f} / {r['peak_rss_bytes'] / 2**20:,.0f} MiB "
            f"| {r['train_s']:.1f} s | `{r['policy_digest']}` |"
        )
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers
    import trl

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                trl=trl.__version__, platform=platform.platform(), cores=os.cpu_count())
    try:
        info["load_avg_at_end"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_results(result: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "reference_sharing.json"), "w") as f:
        json.dump(result, f, indent=1)
    p, s, m = result["proof"], result["settings"], result["machine"]
    lines = [
        "# DPO with HFT: the reference model shares the policy's frozen half", "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']} ({result['params'] / 1e6:,.1f}M parameters, random weights, fp32, tied "
        f"embeddings), saved once; TRL's DPOTrainer loads policy and reference from that path, read into memory "
        "(`model_init_kwargs={'disable_mmap': True}`; see below).  ",
        f"Settings: {s['steps']} DPO steps, batch {s['batch']}, max length {s['seq']}, AdamW lr 1e-4, seed 0, "
        f"HFT round 0 (category, ratio 0.5; embeddings train), {s['threads']} torch thread(s), one child "
        "process per configuration.  ",
        f"Machine: {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, "
        f"Python {m['python']}; measured {result['date']}; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in m.get('load_avg_at_end', ()))} (a machine shared with other jobs: the "
        "training times are not a comparison).", "",
        table(result["rows"]), "",
        f"- Peak RSS with sharing / without: {p['peak_ratio']:.3f} ({p['peak_saved_bytes'] / 2**20:,.0f} MiB less with "
        "sharing).",
        f"- Policy weights after training bit-identical with and without sharing: "
        f"{p['policy_bit_identical_with_and_without_sharing']}.",
        f"- Reference logits on a fixed batch bit-identical before and after training, in both runs: "
        f"{p['reference_logits_bit_identical_after_training']}; the same with and without sharing: "
        f"{p['reference_logits_the_same_with_and_without_sharing']}.", "",
        "Reference bytes held: the reference's parameter bytes minus those now backed by the policy's frozen "
        "tensors. RSS before/after enable_hft: the process's resident memory just before and after the call "
        "that shares (the reference's own copy of the frozen half is freed there). Peak RSS: the child's "
        "VmHWM just before enable_hft (loading: policy and full reference) and at the end of training; sharing "
        "lowers the training peak, not the load-time one (the reference is loaded whole, then shares).", "",
        "Why `disable_mmap`: on CPU, transformers maps a safetensors checkpoint into memory instead of reading "
        "it, so a policy and a reference loaded from one file share the page cache, and RSS counts those pages "
        "once per mapping; what a GPU run pays (each model its own device memory) would not show. Read into "
        "memory, each model owns its tensors, as on a GPU.", "",
    ]
    with open(os.path.join(RESULTS, "reference_sharing.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64, help="DPO max_length (tokens)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads wait on each other)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    command = "python benchmarks/reference_sharing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as model_dir:
        params = save_model(args.model, model_dir)
        rows = run_children(model_dir, args.steps, args.batch, args.seq, args.threads)
    result = dict(model=args.model, params=params, rows=rows, proof=proof(rows), command=command.strip(),
                  settings=dict(steps=args.steps, batch=args.batch, seq=args.seq, threads=args.threads),
                  machine=machine(), date=datetime.date.today().isoformat())
    print(table(rows))
    print(json.dumps(result["proof"], indent=1))
    if not args.no_write:
        write_results(result)
    ok = result["proof"]["policy_bit_identical_with_and_without_sharing"] and \
        result["proof"]["reference_logits_bit_identical_after_training"]
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model_dir, share, steps, batch, seq, threads = sys.argv[2:8]
        print(json.dumps(child(model_dir, bool(int(share)), int(steps), int(batch), int(seq), int(threads))))
        sys.exit(0)
    sys.exit(main())
