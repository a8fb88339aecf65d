"""``python -m hft_plugin.demo``: says what runs, explains the shares, shows no step times (too small a
model to show HFT's saving honestly), and checks the frozen half bit for bit."""

from hft_plugin import demo


def test_the_demo_says_what_runs_and_shows_no_step_times(capsys):
    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("HFT demo: a tiny Phi3ForCausalLM (160,320 parameters")
    assert "the HFT ratio counts only the layers" in out and "so 53.85% of all parameters do" in out
    assert "s/step" not in out and "too small for step times" in out
    full = next(line for line in lines if line.startswith("full fine-tuning"))
    half = next(line for line in lines if line.startswith("half fine-tuning"))
    # AdamW state: two moments per trained element, the fused tensors' frozen rows included in neither
    assert int(full.split()[-1].replace(",", "")) == 2 * 160_320
    assert int(half.split()[-1].replace(",", "")) == 2 * 86_336
    assert "state for its trained rows only" in out
    assert "frozen elements bit-identical: True" in out
