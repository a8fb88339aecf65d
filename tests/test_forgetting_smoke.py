"""The forgetting benchmark's pipeline end to end on a tiny model (mechanics only: it knows no facts)."""

import importlib.util
import json
import os

import pytest
import torch

from hft_plugin import metrics
from hft_plugin.testing import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and on a busy shared CPU extra threads only spin
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("forgetting_bench", os.path.join(ROOT, "benchmarks", "forgetting.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_forced_exact_match_is_the_greedy_verdict(bench):
    model, tokenizer = tiny_model("llama", seed=3), tiny_tokenizer()
    model.eval()
    prompts = ["ab", "hello wor", "The capital of", "x"]
    items = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        greedy = out[0, ids.shape[1]:].tolist()
        items.append((tokenizer(prompt, add_special_tokens=False).input_ids, greedy))  # what greedy decoding says
        wrong = greedy[:-1] + [(greedy[-1] + 1) % 96 or 5]
        items.append((tokenizer(prompt, add_special_tokens=False).input_ids, wrong))
    hits, nlls = bench.score(model, items, batch_size=8)  # left-padded together
    assert hits == [True, False] * len(prompts)
    for item, nll in zip(items, nlls):  # one by one, no padding: the same numbers
        alone = bench.score(model, [item], batch_size=1)[1][0]
        assert alone == pytest.approx(nll, rel=1e-4, abs=1e-5)


def test_tasks_are_deterministic_and_held_out(bench):
    for name in bench.TASKS:
        train, held_out = bench.task_data(name, seed=1, n_train=12, n_eval=6)
        assert (train, held_out) == bench.task_data(name, seed=1, n_train=12, n_eval=6)
        assert not {p for p, _ in train} & {p for p, _ in held_out}
        assert bench.task_data(name, seed=2, n_train=12, n_eval=6) != (train, held_out)
        assert all(answer.startswith(" ") and f"[{name}]" in prompt for prompt, answer in train)


def test_aggregate_and_frontier(bench):
    def run(method, lr, seed, diag, probe):
        S = [[diag, None], [diag / 2, diag]]
        return {"method": method, "lr": lr, "seed": seed, "S": S, "op": metrics.op(S), "bwt": metrics.bwt(S),
                "plasticity": metrics.plasticity(S), "probe_em": probe, "probe_nll": 1.0, "step_time_s": 1.0,
                "optimizer_state_bytes": 8}

    runs = [run("fft", 1e-4, 0, 0.2, 0.9), run("fft", 1e-4, 1, 0.4, 0.7), run("fft", 1e-3, 0, 0.8, 0.3),
            run("fft", 1e-3, 1, 0.8, 0.3), run("hft-category", 1e-4, 0, 0.5, 0.8), run("hft-category", 1e-3, 0, 0.9, 0.5)]
    summary = bench.aggregate(runs)
    assert [(r["method"], r["lr"]) for r in summary] == [("fft", 1e-4), ("fft", 1e-3), ("hft-category", 1e-4), ("hft-category", 1e-3)]
    first = summary[0]
    assert first["plasticity"]["mean"] == pytest.approx(0.3) and first["plasticity"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert first["S_mean"] == [[pytest.approx(0.3), None], [pytest.approx(0.15), pytest.approx(0.3)]]
    gaps = {g["lr"]: g for g in bench.frontier_gaps(summary)}
    # FFT goes from (0.3, 0.8) to (0.8, 0.3): at plasticity 0.5 it keeps 0.6 of the probe; HFT keeps 0.8
    assert gaps[1e-4]["fft_probe_em_at_same_plasticity"] == pytest.approx(0.6)
    assert gaps[1e-4]["difference"] == pytest.approx(0.2)
    assert gaps[1e-4]["dominated_by_fft"] is False
    assert gaps[1e-4]["dominates_fft"] is True  # (0.5, 0.8) learns more than FFT's (0.3, 0.8) and keeps as much
    assert gaps[1e-3]["difference"] is None  # beyond FFT's plasticity: not compared...
    assert gaps[1e-3]["dominates_fft"] is True  # ...but it beats FFT's (0.8, 0.3) on both
    # a learning rate so high that FFT learns nothing and forgets everything is not part of its frontier
    assert bench.pareto([(0.3, 0.8), (0.8, 0.3), (0.05, 0.0)]) == [(0.3, 0.8), (0.8, 0.3)]


def test_quick_mode_is_small(bench):
    args = bench.parse_args(["--quick"])
    assert args.seeds == "0" and args.steps <= 4 and args.methods == "fft,hft-category"
    assert args.name == "forgetting-quick"


@pytest.mark.slow
def test_pipeline_on_a_tiny_model(bench, tmp_path):
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bench.main(["--seeds", "0", "--lrs", "1e-3,1e-2", "--steps", "2", "--batch-size", "2",
                         "--eval-size", "3", "--probe-size", "5", "--threads", "1", "--out", str(tmp_path), "--name", "smoke"],
                        loaded=(model, tokenizer))
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"smoke.{ext}").stat().st_size > 0
    runs = result["runs"]
    planned = {(m, lr) for m in ("fft", "hft-category") for lr in (1e-3, 1e-2)}
    planned |= {(m, 1e-2) for m in ("hft-layer", "hft-model", "fft+half-reset")}  # the middle of two lrs
    assert {(r["method"], r["lr"]) for r in runs} == planned
    assert len(runs) == len(planned)
    for run in runs:
        S = run["S"]
        assert all(S[j][i] is not None for j in range(3) for i in range(j + 1))
        assert all(S[j][i] is None for j in range(3) for i in range(j + 1, 3))  # only the lower triangle is measured
        assert run["op"] == metrics.op(S) and run["bwt"] == metrics.bwt(S) and run["plasticity"] == metrics.plasticity(S)
        assert run["step_time_s"] > 0 and run["optimizer_state_bytes"] > 0
    by = {(r["method"], r["lr"], r["seed"]): r for r in runs}
    fft, hft = by[("fft", 1e-2, 0)], by[("hft-category", 1e-2, 0)]
    # HFT trained through enable_hft: the frozen half has no optimizer state and no gradient
    assert hft["trainable_params"] < fft["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert hft["optimizer_state_bytes"] < 0.8 * fft["optimizer_state_bytes"]
    assert by[("fft+half-reset", 1e-2, 0)]["probe_nll"] != fft["probe_nll"]  # the reset changed the model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is handed back as given
    assert all(p.requires_grad for p in model.parameters())

    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["meta"]["complete"] and len(saved["runs"]) == len(runs) and len(saved["summary"]) == len(planned)
    table = (tmp_path / "smoke.md").read_text()
    assert "| hft-category | 0.01 |" in table and "fft+half-reset" in table
    (tmp_path / "smoke.md").unlink()
    again = bench.main(["--report", str(tmp_path / "smoke.json")])
    assert again["summary"] == saved["summary"] and (tmp_path / "smoke.md").exists()
