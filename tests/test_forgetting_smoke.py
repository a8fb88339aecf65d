"""The forgetting benchmark: its statistics on synthetic numbers with known answers, and its pipeline on a tiny model.

The pipeline tests check mechanics only (a tiny random model knows no facts).
"""

import importlib.util
import json
import os
import random

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


# -- synthetic runs ---------------------------------------------------------------------------------------------

def fft_curve(lr):
    """A made-up FFT response: plasticity rises with log(lr), retention falls as plasticity rises."""
    import math

    p = min(0.9, max(0.0, 0.15 * math.log2(lr / 1e-5)))
    return p, 1.0 - 0.6 * p * p


def synthetic_runs(shift, *, seeds=6, noise=0.0, seed_effect=0.0, hft_lr_factor=2.0, rng_seed=0):
    """FFT on a grid, HFT on the same curve shifted up by ``shift`` in retention, reached at ``hft_lr_factor`` x lr.

    ``noise``: independent per run; ``seed_effect``: one retention offset per seed, shared by every method
    (what pairing by seed removes).
    """
    rng = random.Random(rng_seed)
    runs = []
    lrs = [1e-5 * 2 ** (k / 2) for k in range(1, 12)]
    for seed in range(seeds):
        offset = rng.gauss(0, seed_effect)
        for lr in lrs:
            p, r = fft_curve(lr)
            runs.append(run("fft", lr, seed, p + rng.gauss(0, noise), r + offset + rng.gauss(0, noise)))
            p, r = fft_curve(lr / hft_lr_factor)
            runs.append(run("hft-category", lr, seed, p + rng.gauss(0, noise), r + shift + offset + rng.gauss(0, noise)))
    return runs


def run(method, lr, seed, plasticity, probe_em):
    S = [[plasticity, None], [plasticity / 2, plasticity]]
    return {"method": method, "lr": lr, "seed": seed, "S": S, "op": metrics.op(S), "bwt": metrics.bwt(S),
            "plasticity": plasticity, "probe_em": probe_em, "probe_nll": 1.0, "step_time_s": 1.0,
            "optimizer_state_bytes": 8}


# -- the frontier ----------------------------------------------------------------------------------------------

def test_pareto_front_drops_dominated_points_and_the_collapse(bench):
    # (0.05, 0.0): a learning rate so high that nothing is learned and everything forgotten
    points = [(0.3, 0.8), (0.8, 0.3), (0.05, 0.0), (0.5, 0.5), (0.5, 0.6), (0.1, 0.8), (0.3, 0.8)]
    assert bench.pareto_front(points) == [(0.3, 0.8), (0.5, 0.6), (0.8, 0.3)]
    assert bench.pareto_front([]) == []
    assert bench.pareto_front([(0.2, 0.4)]) == [(0.2, 0.4)]


def test_front_at_interpolates_linearly_inside_and_says_none_outside(bench):
    front = [(0.2, 0.9), (0.6, 0.5), (1.0, 0.1)]
    assert bench.front_at(front, 0.4) == pytest.approx(0.7)
    assert bench.front_at(front, 0.8) == pytest.approx(0.3)
    assert bench.front_at(front, 0.2) == pytest.approx(0.9) and bench.front_at(front, 1.0) == pytest.approx(0.1)
    assert bench.front_at(front, 0.19) is None and bench.front_at(front, 1.01) is None
    assert bench.front_at([(0.3, 0.5)], 0.3) == 0.5 and bench.front_at([(0.3, 0.5)], 0.31) is None


def test_mean_gap_is_the_area_between_the_curves_over_the_common_range(bench):
    ref = [(0.0, 1.0), (1.0, 0.0)]
    assert bench.mean_gap([(0.0, 1.1), (1.0, 0.1)], ref) == pytest.approx((0.1, 0.0, 1.0))  # parallel, 0.1 above
    # only the common range [0.2, 0.6] counts: there the curve is 0.1 below
    assert bench.mean_gap([(0.2, 0.7), (0.6, 0.3)], ref) == pytest.approx((-0.1, 0.2, 0.6))
    # crossing curves: +0.2 at 0 falling linearly to -0.2 at 1, mean 0; the area up to 0.5 alone is +0.1 on average
    crossing = [(0.0, 1.2), (1.0, -0.2)]
    assert bench.mean_gap(crossing, ref)[0] == pytest.approx(0.0, abs=1e-12)
    assert bench.mean_gap(crossing, [(0.0, 1.0), (0.5, 0.5)])[0] == pytest.approx(0.1)
    # a corner of one curve inside the range is honoured: a tent 0.2 high over [0, 1] averages 0.1
    assert bench.mean_gap([(0.0, 1.0), (0.5, 0.7), (1.0, 0.0)], ref)[0] == pytest.approx(0.1)
    assert bench.mean_gap([(0.0, 1.0), (0.2, 0.9)], [(0.5, 0.5), (0.9, 0.1)]) is None  # no overlap
    assert bench.mean_gap([(0.4, 0.6)], ref) is None  # one point: no range


# -- intervals and verdicts ------------------------------------------------------------------------------------

def test_t_quantiles_match_the_tables(bench):
    for df, value in [(1, 12.706), (2, 4.303), (4, 2.776), (5, 2.571), (7, 2.365), (9, 2.262), (30, 2.042)]:
        assert bench.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert bench.t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)


def test_expanded_percentile_interval_matches_the_t_interval(bench):
    import numpy as np

    assert bench.interval_tail(6, expanded=False) == pytest.approx(0.025)
    assert bench.interval_tail(6) == pytest.approx(0.00243, abs=2e-5)
    assert bench.interval_tail(1000) == pytest.approx(0.025, abs=0.001)  # many seeds: back to the percentile interval
    # replicates that are standard normal: the expanded interval is +-sqrt(n/(n-1)) t(n-1) = +-2.816 for 6 seeds
    replicates = np.random.default_rng(0).standard_normal(400_000)
    low, high = bench.bootstrap_interval(replicates, n=6)
    assert low == pytest.approx(-2.816, abs=0.05) and high == pytest.approx(2.816, abs=0.05)
    low, high = bench.bootstrap_interval(replicates, n=6, expanded=False)
    assert low == pytest.approx(-1.96, abs=0.02) and high == pytest.approx(1.96, abs=0.02)
    assert bench.bootstrap_interval([None, 0.1, 0.2], n=6) is not None  # undefined replicates are left out
    assert bench.bootstrap_interval([0.1, 0.2], n=1) is None  # one seed: no interval


def test_verdicts(bench):
    assert bench.verdict([0.001, 0.3]) == "above"
    assert bench.verdict([-0.3, -0.001]) == "below"
    assert bench.verdict([-0.1, 0.2]) == "indistinguishable"
    assert bench.verdict([0.0, 0.2]) == "indistinguishable"  # touching 0 is not excluding it
    assert bench.verdict(None) == "undetermined"


# -- the whole analysis on synthetic runs with known answers -----------------------------------------------------

def test_a_curve_shifted_up_is_above_with_the_shift_as_mean_gap(bench):
    result = bench.analyse(synthetic_runs(0.05, noise=0.01), resamples=2000)
    found = result["mean_gaps"]["hft-category"]
    assert found["verdict"] == "above" and result["verdicts"] == {"hft-category": "above"}
    assert found["gap"] == pytest.approx(0.05, abs=0.01)
    assert found["ci"][0] < 0.05 < found["ci"][1]
    assert found["ci"][0] < found["ci_percentile"][0] < found["ci_percentile"][1] < found["ci"][1]  # expanded is wider
    # FFT reaches plasticity 0.075 to 0.825 on its grid, HFT (at half the rate) 0.075 to 0.675: the common range
    assert found["range"][0] == pytest.approx(0.075, abs=0.02) and found["range"][1] == pytest.approx(0.675, abs=0.02)
    gaps = [g for g in result["point_gaps"] if g["gap"] is not None]
    assert len(gaps) >= 6 and all(g["gap"] == pytest.approx(0.05, abs=0.03) for g in gaps)


def test_a_curve_shifted_down_is_below(bench):
    result = bench.analyse(synthetic_runs(-0.05, noise=0.01), resamples=2000)
    assert result["verdicts"] == {"hft-category": "below"}
    assert result["mean_gaps"]["hft-category"]["gap"] == pytest.approx(-0.05, abs=0.01)


def test_the_same_curve_under_noise_is_indistinguishable(bench):
    result = bench.analyse(synthetic_runs(0.0, noise=0.05, seeds=5), resamples=2000)
    found = result["mean_gaps"]["hft-category"]
    assert found["verdict"] == "indistinguishable" and found["ci"][0] < 0 < found["ci"][1]


def test_seeds_are_paired_across_methods(bench):
    # a large retention offset per seed, shared by both methods, and a small true gap: only a paired
    # bootstrap (the same seeds resampled for both methods) sees through the seed effect
    runs = synthetic_runs(0.03, noise=0.005, seed_effect=0.2, seeds=6, rng_seed=3)
    result = bench.analyse(runs, resamples=2000)
    found = result["mean_gaps"]["hft-category"]
    assert found["verdict"] == "above" and found["ci"][1] - found["ci"][0] < 0.05
    fft_point = next(p for p in result["points"] if p["method"] == "fft" and p["probe_em_sd"] > 0.05)
    assert fft_point["probe_em_ci"][1] - fft_point["probe_em_ci"][0] > 0.15  # each curve alone is that uncertain


def test_under_no_difference_the_verdict_is_rarely_wrong(bench):
    # 60 simulated 5-seed experiments in which HFT's curve is FFT's: a 95% interval should call
    # "above" or "below" in about 5% of them (the expanded interval: 2 of these 60)
    wrong = 0
    for k in range(60):
        result = bench.analyse(synthetic_runs(0.0, noise=0.03, seeds=5, rng_seed=1000 + k), resamples=400, rng_seed=k)
        wrong += result["verdicts"]["hft-category"] != "indistinguishable"
    assert wrong <= 5


def test_equal_learning_rate_differences(bench):
    result = bench.analyse(synthetic_runs(0.05, hft_lr_factor=2.0, seeds=3), resamples=200)
    by_lr = {round(e["lr"], 12): e for e in result["equal_lr"]}
    lr = 1e-5 * 2 ** (4 / 2)
    (p_fft, r_fft), (p_hft, r_hft) = bench_curve_pair(lr)
    e = by_lr[round(lr, 12)]
    assert e["d_plasticity"] == pytest.approx(p_hft - p_fft) and e["d_probe_em"] == pytest.approx(r_hft + 0.05 - r_fft)
    assert e["d_probe_em_ci"][0] == pytest.approx(e["d_probe_em"]) == pytest.approx(e["d_probe_em_ci"][1])  # no noise


def bench_curve_pair(lr):
    return fft_curve(lr), fft_curve(lr / 2.0)


def test_only_seeds_with_every_run_are_analysed_and_one_seed_has_no_interval(bench):
    runs = synthetic_runs(0.05, noise=0.01, seeds=3)
    runs = [r for r in runs if not (r["seed"] == 2 and r["method"] == "fft" and r["lr"] > 1e-4)]
    result = bench.analyse(runs, resamples=100)
    assert result["seeds"] == [0, 1]
    one = bench.analyse([r for r in runs if r["seed"] == 0], resamples=100)
    assert one["n_seeds"] == 1 and one["resamples"] == 0
    assert one["mean_gaps"]["hft-category"]["ci"] is None and one["verdicts"]["hft-category"] == "undetermined"
    assert one["mean_gaps"]["hft-category"]["gap"] == pytest.approx(0.05, abs=0.02)


def test_report_writes_the_verdicts_last(bench, tmp_path):
    runs = synthetic_runs(0.05, noise=0.01, seeds=3)
    meta = {"command": "test", "model_name": "synthetic", "params": 1e6, "device": "cpu", "device_name": "x",
            "threads": 1, "date": "now", "torch": "t", "transformers": "t", "trl": "t", "tasks": ["a", "b"],
            "steps": 1, "batch_size": 1, "n_eval": 50, "probe_size": 100, "probe_candidates": 154,
            "base_probe_nll": 0.6, "base_task_em": {"a": 0.0, "b": 0.0}, "wall_s": 1.0, "workers": 1,
            "json": str(tmp_path / "r.json"), "md": str(tmp_path / "r.md"), "plot": str(tmp_path / "r.png")}
    result = bench.report(meta, runs, resamples=300)
    text = (tmp_path / "r.md").read_text()
    assert text.rstrip().splitlines()[-1].startswith("- **hft-category** lies **above** FFT's frontier")
    assert "## Equal learning rate (the paper's setting" in text and (tmp_path / "r.png").stat().st_size > 10_000
    again = bench.report_from_json(str(tmp_path / "r.json"), resamples=300)  # the bootstrap is seeded
    assert again["analysis"]["mean_gaps"] == result["analysis"]["mean_gaps"]


# -- the pipeline pieces -----------------------------------------------------------------------------------------

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


def test_aggregate(bench):
    runs = [run("fft", 1e-4, 0, 0.2, 0.9), run("fft", 1e-4, 1, 0.4, 0.7), run("hft-category", 1e-4, 0, 0.5, 0.8),
            {"method": "base", "lr": 0.0, "seed": 0, "task_em": {}}]
    summary = bench.aggregate(runs)
    assert [(r["method"], r["lr"]) for r in summary] == [("fft", 1e-4), ("hft-category", 1e-4)]
    first = summary[0]
    assert first["plasticity"]["mean"] == pytest.approx(0.3) and first["plasticity"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert first["S_mean"] == [[pytest.approx(0.3), None], [pytest.approx(0.15), pytest.approx(0.3)]]


def test_the_plan_is_seed_major_and_the_default_grids_are_dense(bench):
    args = bench.parse_args([])
    grids = bench.grids_of(args)
    assert list(grids) == list(bench.METHODS)
    assert len(grids["fft"]) >= 6 and len(grids["hft-category"]) >= 6
    assert all(len(grids[m]) >= 3 for m in ("hft-layer", "hft-model", "fft+half-reset", "lora"))
    assert min(grids["lora"]) > max(grids["fft"])  # LoRA needs a higher rate for the same plasticity
    for lrs in (grids["fft"], grids["hft-category"]):
        assert all(b / a <= 1.5 for a, b in zip(lrs, lrs[1:]))  # spaced by about 1.4
    assert args.steps >= 20 and args.eval_size >= 50 and args.probe_size >= 50
    plan = bench.make_plan([0, 1], grids)
    assert plan[0] == (0, "base", 0.0) and plan[len(plan) // 2] == (1, "base", 0.0)
    assert len(plan) == 2 * (1 + sum(len(v) for v in grids.values()))


def test_quick_mode_is_small(bench):
    args = bench.parse_args(["--quick"])
    assert args.seeds == "0" and args.steps <= 4 and args.methods == "fft,hft-category"
    assert args.name == "forgetting-quick" and args.workers == 1
    assert sum(len(v) for v in bench.grids_of(args).values()) == 4


def test_device_choice(bench):
    assert bench.resolve_device("cpu") == "cpu"
    assert bench.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            bench.resolve_device("cuda")


def test_the_cache_resumes_and_claims_share_the_work(bench, tmp_path):
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    settings = {"steps": 1, "batch_size": 2, "eval_size": 2, "probe_size": 3, "eval_batch": 8, "device": "cpu"}
    cache = bench.RunCache(str(tmp_path / "cache"))
    jobs = bench.make_plan([0], {"fft": [1e-3], "hft-category": [1e-3]})
    finished = {"method": "fft", "lr": 1e-3, "seed": 0, "marker": "from an earlier invocation"}
    cache.put((0, "fft", 1e-3), finished)
    claims = tmp_path / "claims"
    claims.mkdir()
    assert cache.claim((0, "base", 0.0), str(claims))  # another worker took the base job
    assert not cache.claim((0, "base", 0.0), str(claims))
    assert bench.work(model, tokenizer, jobs, cache, settings, claims=str(claims), log=lambda s: None) == 1
    assert cache.get((0, "fft", 1e-3)) == finished  # kept, not redone
    assert cache.get((0, "base", 0.0)) is None  # left to the worker that claimed it
    hft = cache.get((0, "hft-category", 1e-3))
    assert hft["plasticity"] == metrics.plasticity(hft["S"]) and hft["cpu_s"] > 0 and hft["wall_s"] > 0
    assert bench.work(model, tokenizer, jobs, cache, settings, log=lambda s: None) == 1  # now only the base job
    assert sorted(os.listdir(cache.folder)) == sorted([bench._job_file(j) for j in jobs] + ["model.json"])


def test_a_base_job_after_other_runs_scores_the_base_model(bench, tmp_path, monkeypatch):
    # seed 1's base job comes after seed 0's runs in one worker: it must score the model as given,
    # not the one the previous run trained
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    given = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"steps": 2, "batch_size": 2, "eval_size": 4, "probe_size": 3, "eval_batch": 8, "device": "cpu"}
    scored, score = [], bench.score

    def watched(m, *args, **kwargs):
        scored.append(all(torch.equal(v, given[k]) for k, v in m.state_dict().items()))
        return score(m, *args, **kwargs)

    monkeypatch.setattr(bench, "score", watched)
    cache = bench.RunCache(str(tmp_path / "cache"))
    bench.work(model, tokenizer, [(0, "fft", 1e-1), (1, "base", 0.0)], cache, settings, log=lambda s: None)
    assert scored[-len(bench.TASKS):] == [True] * len(bench.TASKS)  # the base job's scores: the given weights


@pytest.mark.slow
def test_pipeline_on_a_tiny_model(bench, tmp_path):
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    argv = ["--seeds", "0,1", "--fft-lrs", "1e-3,1e-2", "--hft-lrs", "1e-3,1e-2", "--strategy-lrs", "1e-2",
            "--lora-lrs", "1e-2", "--shielded-lrs", "1e-2", "--replay-fft-lrs", "1e-2", "--replay-hft-lrs", "1e-2",
            "--replay-self-fft-lrs", "1e-2", "--replay-self-hft-lrs", "1e-2",
            "--steps", "2", "--batch-size", "2", "--eval-size", "3", "--probe-size", "5", "--threads", "1",
            "--resamples", "50", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path), "--name", "smoke"]
    result = bench.main(argv, loaded=(model, tokenizer))
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"smoke.{ext}").stat().st_size > 0
    runs = [r for r in result["runs"] if r["method"] != "base"]
    planned = {(m, lr, s) for m in ("fft", "hft-category") for lr in (1e-3, 1e-2) for s in (0, 1)}
    planned |= {(m, 1e-2, s) for m in ("hft-layer", "hft-model", "fft+half-reset", "lora", "hft-shielded",
                                        *bench.REPLAY) for s in (0, 1)}
    assert {(r["method"], r["lr"], r["seed"]) for r in runs} == planned and len(runs) == len(planned)
    for r in runs:
        S = r["S"]
        assert all(S[j][i] is not None for j in range(3) for i in range(j + 1))
        assert all(S[j][i] is None for j in range(3) for i in range(j + 1, 3))  # only the lower triangle is measured
        assert r["op"] == metrics.op(S) and r["bwt"] == metrics.bwt(S) and r["plasticity"] == metrics.plasticity(S)
        assert r["step_time_s"] > 0 and r["optimizer_state_bytes"] > 0
    by = {(r["method"], r["lr"], r["seed"]): r for r in runs}
    fft, hft = by[("fft", 1e-2, 0)], by[("hft-category", 1e-2, 0)]
    # HFT trained through enable_hft: the frozen half has no optimizer state and no gradient
    assert hft["trainable_params"] < fft["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert hft["optimizer_state_bytes"] < 0.8 * fft["optimizer_state_bytes"]
    assert by[("fft+half-reset", 1e-2, 0)]["probe_nll"] != fft["probe_nll"]  # the reset changed the model
    # paired seeds: seed 0's runs saw other data than seed 1's, and every method saw the same per seed
    assert by[("fft", 1e-3, 0)]["S"] != by[("fft", 1e-3, 1)]["S"] or by[("fft", 1e-3, 0)]["probe_nll"] != by[("fft", 1e-3, 1)]["probe_nll"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is handed back as given
    assert all(p.requires_grad for p in model.parameters())
    assert set(result["analysis"]["verdicts"]) == set(bench.METHODS) - {"fft"}
    assert [(c["method"], c["reference"]) for c in result["analysis"]["comparisons"]] == bench.COMPARISONS
    assert all(len(r["kl"]) == 3 for r in runs) and result["kl_analysis"]["n_seeds"] == 2
    assert by[("lora", 1e-2, 0)]["trainable_params"] < 0.5 * fft["trainable_params"]  # the adapter only

    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["meta"]["timing"]["runs"] == len(planned) + 2 and saved["meta"]["timing"]["resumed"] == 0
    table = (tmp_path / "smoke.md").read_text()
    assert "| hft-category | 0.01" in table and "## Verdicts" in table
    # the same command again: every run comes from the cache, the numbers are the same
    again = bench.main(argv, loaded=(model, tokenizer))
    assert again["meta"]["timing"]["resumed"] == len(planned) + 2
    assert again["summary"] == result["summary"] and again["analysis"]["mean_gaps"] == result["analysis"]["mean_gaps"]
    (tmp_path / "smoke.md").unlink()
    rebuilt = bench.main(["--report", str(tmp_path / "smoke.json"), "--resamples", "50"])
    assert rebuilt["summary"] == saved["summary"] and (tmp_path / "smoke.md").exists()


# -- LoRA ---------------------------------------------------------------------------------------------------------

def lora_elements(model, bench):
    """What rank-r adapters on the benchmark's target modules hold: r x (in + out) per module."""
    r = bench.LORA["r"]
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in bench.LORA["target_modules"])


def test_lora_trains_a_merged_adapter_per_task_and_hands_back_a_plain_model(bench):
    pytest.importorskip("peft")
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"steps": 2, "batch_size": 2, "eval_size": 3, "probe_size": 3, "eval_batch": 8, "device": "cpu"}
    data = bench.seed_data(tokenizer, 0, settings)
    probe = bench.encode(tokenizer, bench.FACTS[:3])
    run = bench.run_sequence(model, tokenizer, base, "lora", 1e-2, 0, data, probe, settings)
    assert run["trainable_params"] == lora_elements(model, bench)
    assert run["optimizer_state_bytes"] >= 2 * 4 * run["trainable_params"]  # AdamW's two fp32 moments, adapter only
    # merged into the weights: a plain model again, every parameter trainable as it was given
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    targets = {k for k in base if k.rsplit(".", 2)[-2] in bench.LORA["target_modules"]}
    assert changed == targets  # embeddings, lm_head and norms frozen; every target weight moved
    again = bench.run_sequence(model, tokenizer, base, "lora", 1e-2, 0, data, probe, settings)
    assert again["S"] == run["S"] and again["probe_nll"] == run["probe_nll"]  # seeded adapters: the same run


def test_the_merged_lora_model_scores_as_the_adapter_model(bench):
    # the benchmark scores LoRA merged; merging must not change what is scored beyond float rounding
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_model("llama", seed=1), tiny_tokenizer()
    wrapped = peft.get_peft_model(model, bench.lora_config())
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    _, eval_items = bench.task_data("rev", seed=0, n_train=0, n_eval=16)
    encoded = bench.encode(tokenizer, eval_items + bench.FACTS[:16])
    hits, nlls = bench.score(wrapped, encoded)
    merged = wrapped.merge_and_unload()
    merged_hits, merged_nlls = bench.score(merged, encoded)
    assert merged_nlls == pytest.approx(nlls, rel=1e-5, abs=1e-6) and merged_hits == hits
    assert max(abs(a - b) for a, b in zip(nlls, bench.score(tiny_model("llama", seed=1), encoded)[1])) > 0.01


def test_import_runs_fills_the_cache_only_from_results_with_the_same_settings(bench, tmp_path):
    settings = {"model": "m", "steps": 20, "device": "cpu", "version": 2}
    runs = [dict(run("fft", 1e-5, s, 0.5, 0.9), probe_key="k1") for s in (0, 1)]
    runs.append({"method": "base", "lr": 0.0, "seed": 0, "task_em": {}, "probe_key": "k1"})
    meta = {"settings": settings, "probe": [["q", "a"]], "probe_candidates": 154, "base_probe_em": 1.0,
            "base_probe_nll": 0.5, "params": 10, "threads": 1, "device": "cpu", "device_name": "x", "torch": "t",
            "transformers": "t", "trl": "t", "python": "p"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": meta, "runs": runs}))
    cache = bench.RunCache(str(tmp_path / "cache"))
    kept = dict(runs[1], marker="run here")
    cache.put((1, "fft", 1e-5), kept)
    assert bench.import_runs(str(path), cache, settings) == 2  # seed 0's run and its base job
    assert cache.get((0, "fft", 1e-5))["plasticity"] == 0.5 and cache.get((0, "base", 0.0)) is not None
    assert cache.get((1, "fft", 1e-5)) == kept  # what the cache held is kept
    assert cache.read("model.json")["probe_key"] == "k1"
    assert bench.import_runs(str(path), cache, settings) == 0
    with pytest.raises(SystemExit, match="settings"):
        bench.import_runs(str(path), cache, dict(settings, steps=4))
    other = bench.RunCache(str(tmp_path / "other"))
    other.write("model.json", {"probe_key": "k2"})
    with pytest.raises(SystemExit, match="probe"):
        bench.import_runs(str(path), other, settings)


# -- shielded, replay and the KL after every task ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["hft-shielded", "fft+replay-self", "fft+replay-earlier", "hft+replay-self",
                                    "hft+replay-earlier"])
def test_the_new_arms_run_through_the_tasks_with_the_kl_after_each(bench, tmp_path, method):
    from hft_plugin.forgetting import KeptBase, sample_probes

    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"steps": 2, "batch_size": 4, "eval_size": 3, "probe_size": 3, "eval_batch": 8, "device": "cpu"}
    data = bench.seed_data(tokenizer, 0, settings)
    probe = bench.encode(tokenizer, bench.FACTS[:3])
    probes = sample_probes(model, count=2, length=8)
    cache = bench.RunCache(str(tmp_path / "cache"))
    extras = bench.seed_extras(model, tokenizer, 0, {method}, cache, (probes, KeptBase(model, probes)))
    again = bench.seed_extras(model, tokenizer, 0, {method}, cache, None)  # read back, not drawn again
    assert {k: v for k, v in extras.items() if k != "kl"} == again
    run = bench.run_sequence(model, tokenizer, base, method, 1e-2, 0, data, probe, settings, extras)
    assert len(run["kl"]) == 3 and all(k > 0 for k in run["kl"]) and len(run["nll_delta"]) == 3
    if method.startswith("hft"):
        assert len(run["frozen"]) == 3 and run["frozen"][0] != run["frozen"][1]
    if method == "hft-shielded":
        assert [len(c["sha256"]) for c in run["calibration"]] == [64] * 3
    # the KL after the last task is the monitor's measurement of the model as handed back
    from hft_plugin.forgetting import measure

    base_model = tiny_model("llama", seed=0)
    assert measure(model, probes, base_model).kl == pytest.approx(run["kl"][-1], rel=1e-6)


def test_kept_base_measures_as_the_base_model_does():
    from hft_plugin.forgetting import KeptBase, measure, sample_probes

    base, model = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    probes = sample_probes(base, count=3, length=8)
    kept, direct = measure(model, probes, KeptBase(base, probes)), measure(model, probes, base)
    assert kept.kl == pytest.approx(direct.kl, rel=1e-9) and kept.nll == direct.nll and kept.base_nll == direct.base_nll
    with pytest.raises(ValueError, match="other probes"):
        measure(model, sample_probes(base, count=3, length=8, seed=5), KeptBase(base, probes))


def test_importing_a_rerun_adds_its_kl_only_if_it_reproduces_the_run(bench, tmp_path):
    settings = {"model": "m", "steps": 1}
    run = {"method": "fft", "lr": 1e-3, "seed": 0, "S": [[0.5]], "plasticity": 0.5, "probe_em": 0.9,
           "probe_nll": 0.4, "probe_key": "k"}
    meta = {"settings": settings, "probe": [], "probe_candidates": 1, "base_probe_em": 1.0, "base_probe_nll": 0.1,
            "params": 1, "threads": 1, "device": "cpu", "device_name": "x", "torch": "t", "transformers": "t",
            "trl": "t", "python": "p"}

    def results(name, runs):
        path = tmp_path / name
        path.write_text(json.dumps({"meta": meta, "runs": runs}))
        return str(path)

    cache = bench.RunCache(str(tmp_path / "cache"))
    assert bench.import_runs(results("old.json", [run]), cache, settings) == 1
    rerun = dict(run, kl=[0.1], nll_delta=[0.01])
    assert bench.import_runs(results("kl.json", [rerun]), cache, settings) == 1
    assert cache.get((0, "fft", 1e-3))["kl"] == [0.1]
    cache2 = bench.RunCache(str(tmp_path / "cache2"))
    bench.import_runs(results("old.json", [run]), cache2, settings)
    with pytest.raises(SystemExit, match="does not reproduce"):
        bench.import_runs(results("other.json", [dict(rerun, probe_em=0.8)]), cache2, settings)
