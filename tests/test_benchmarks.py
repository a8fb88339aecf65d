"""Smoke tests of the benchmark scripts' functions at tiny sizes (the numbers themselves are not asserted)."""

from __future__ import annotations

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

speed = pytest.importorskip("speed")


def test_speed_rows_count_state_and_share():
    rows = speed.measure_speed("tiny", [0.3, 0.7], steps=1, warmup=0, batch=1, seq=8, log=lambda *_: None)
    assert [r["ratio"] for r in rows] == [0.3, 0.7]
    for row in rows:
        assert row["fft_step_s"] > 0 and row["hft_step_s"] > 0
        # AdamW keeps state for exactly the trainable parameters
        assert abs(row["state_vs_share"]) < 0.01
        assert 0 < row["trainable_share"] < 1
    assert rows[0]["hft_state_bytes"] < rows[1]["hft_state_bytes"] < rows[0]["fft_state_bytes"]
    text = speed.table(rows)
    assert text.count("\n") == 3 and "| tiny | 0.3 |" in text


def test_peak_memory_child_reports_rss():
    result = speed.peak_memory_child("tiny", 0.5, steps=1, batch=2, seq=8)
    # the kernel syncs per-thread RSS counters lazily: the high-water mark may trail by a few pages
    assert result["peak_rss_bytes"] >= 0.99 * result["rss_before_training_bytes"] > 0


def test_write_results(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "RESULTS", str(tmp_path))
    rows = speed.measure_speed("tiny", [0.5], steps=1, warmup=0, batch=1, seq=8, log=lambda *_: None)
    speed.attach_memory(rows, {"fft": {"peak_rss_bytes": 200}, "0.5": {"peak_rss_bytes": 100}}, "peak_rss_bytes")
    assert rows[0]["peak_ratio"] == 0.5
    results = {"models": {"tiny": dict(rows=rows, machine=speed.machine(), date="now", command="test",
                                       settings=dict(batch=1, seq=8, steps=1, warmup=0, dtype="float32"))}}
    speed.write_results(results, "speed_test", notes="test")
    assert (tmp_path / "speed_test.png").stat().st_size > 1000
    assert "| tiny | 0.5 |" in (tmp_path / "speed_test.md").read_text()


def test_mask_overhead_measures_every_variant():
    mask_overhead = pytest.importorskip("mask_overhead")
    result = mask_overhead.measure(steps=1, warmup=0, batch=1, seq=8, round=0, repeats=1, log=lambda *_: None,
                                   layers=2, hidden=64, intermediate=128, heads=4, vocab=128)
    assert set(result["step_s"]) == set(mask_overhead.MODES)
    assert result["masked_tensors"] > 0 and result["fused_mask_s"] > 0 and result["hook_multiplies_s"] > 0


def test_grad_hook_mask_compares_both_ways_and_both_are_exact():
    grad_hook_mask = pytest.importorskip("grad_hook_mask")
    result = grad_hook_mask.measure(2, steps=1, warmup=0, batch=1, seq=8, repeats=1, log=lambda *_: None,
                                    layers=2, hidden=32, intermediate=64, heads=2, vocab=64)
    assert set(result["step_s"]) == set(grad_hook_mask.VARIANTS) and result["masked_tensors"] == 14
    assert result["exact"] == dict(hook_equals_clip=True, clip_frozen_kept=True, hook_frozen_kept=True,
                                   none_frozen_kept=False)
    assert grad_hook_mask.verdict([result]).startswith("Verdict: ")


def test_unfused_twin_trains_the_same_units():
    mask_overhead = pytest.importorskip("mask_overhead")
    from hft_plugin import select_half

    config = mask_overhead.phi3_config(layers=2, hidden=64, intermediate=128, heads=4, vocab=128)
    phi3, llama = mask_overhead.build("phi3", config), mask_overhead.build("llama", config)
    selection = select_half(phi3, 1)
    twin = mask_overhead.twin_selection(selection, llama)
    assert twin.trainable_ratio == pytest.approx(selection.trainable_ratio)
    assert sum(p.numel() for p in phi3.parameters()) == sum(p.numel() for p in llama.parameters())


def test_speed_gpu_cpu_check(capsys):
    speed_gpu = pytest.importorskip("speed_gpu")
    assert speed_gpu.main(["--cpu-check", "--ratios", "0.5"]) == 0
    assert "| tiny | 0.5 |" in capsys.readouterr().out


def test_speed_families_rows_and_goals():
    speed_families = pytest.importorskip("speed_families")
    rows = [speed_families.measure(f, steps=1, warmup=0, batch=1, seq=8, log=lambda *_: None) for f in ("phi3", "mixtral")]
    for row in rows:
        # the optimizer owns exactly the trainable elements; gradients cover the tensors that train
        # (whole where a tensor trains in part), never more than full fine-tuning's
        assert row["hft_optimizer_owns"] == pytest.approx(row["hft_share"])
        assert row["hft_state_ratio"] == pytest.approx(row["hft_share"], abs=0.01)
        assert row["hft_share"] - 0.01 <= row["hft_grad_ratio"] <= 1.0
    assert "rows x6" in rows[0]["hft_mechanisms"] and "experts" in rows[1]["hft_mechanisms"]
    assert speed_families.table(rows).count("\n") == 3 and len(speed_families.goals(rows)) == 2


def test_speed_gpu_families_cpu_check(capsys):
    speed_gpu = pytest.importorskip("speed_gpu")
    assert speed_gpu.main(["--families", "qwen3_moe", "--cpu-check"]) == 0
    assert "| qwen3_moe |" in capsys.readouterr().out


def test_optimizer_share_on_meta_models():
    optimizer_share = pytest.importorskip("optimizer_share")
    row = optimizer_share.probe("qwen3_moe")
    assert row["mask_owns"] > 0.95 and row["auto_owns"] == pytest.approx(row["trainable_share"])
    assert row["auto_mechanisms"] == {"experts": row["partial_tensors"]}


def test_methods_side_by_side(tmp_path):
    pytest.importorskip("peft")
    methods = pytest.importorskip("methods")
    rows = methods.measure("tiny", steps=1, warmup=0, batch=1, seq=8, log=lambda *_: None)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["fft", "hft", "lora"] and by["fft"]["cpu_ratio"] == 1.0
    # AdamW holds state for exactly what trains: two fp32 moments per trainable element
    for row in rows:
        assert row["state_bytes"] == 2 * 4 * row["trainable"]
    assert by["fft"]["trainable_share"] == 1.0 and 0.5 < by["hft"]["trainable_share"] < 0.6
    assert by["lora"]["trainable"] == sum(16 * (m.in_features + m.out_features) for name, m in
                                          methods.make_run("tiny", "fft")[0].model.named_modules()
                                          if name.rsplit(".", 1)[-1] in methods.lora_config().target_modules)
    # FFT and HFT save the whole model each round, LoRA its adapter
    assert by["hft"]["disk_bytes"] == by["fft"]["disk_bytes"] and "model.safetensors" in by["hft"]["disk_files"]
    assert "adapter_model.safetensors" in by["lora"]["disk_files"] and by["lora"]["disk_bytes"] < by["fft"]["disk_bytes"]
    methods.attach_memory(rows, {m: {"peak_rss_bytes": 200 + i, "rss_before_training_bytes": 100}
                                 for i, m in enumerate(methods.METHODS)})
    assert by["hft"]["peak_ratio"] == 201 / 200 and by["lora"]["training_memory_ratio"] == 1.02
    result = dict(rows=rows, machine={"cpu": "x", "cores": 2, "threads": 1, "torch": "t"}, date="now", command="test",
                  load_at_start="1", peft="p", lora={"r": 16}, settings=dict(model="tiny", batch=1, seq=8, steps=1,
                                                                              warmup=0, memory_steps=1, threads=1))
    methods.write(result, str(tmp_path / "methods"))
    text = (tmp_path / "methods.md").read_text()
    assert "| full fine-tuning | 1.0000 |" in text and "| LoRA (r 16, all linear layers) |" in text


def test_methods_peak_memory_child_runs_lora():
    pytest.importorskip("peft")
    methods = pytest.importorskip("methods")
    result = methods.peak_memory_child("tiny", "lora", steps=1, batch=1, seq=8)
    assert result["peak_rss_bytes"] >= 0.99 * result["rss_before_training_bytes"] > 0
