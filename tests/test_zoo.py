"""The generic reader on a sample of the transformers causal-LM zoo (the whole zoo: benchmarks/zoo.py).

Each sampled type is built from its default config on the meta device (no weights), read, and
selected at rounds 0 and 1. The sample covers every path of the reader: named families, dense
blocks, fused ``gate_up_proj``, stacked experts with routers and shared experts, MoE attention,
Mamba-1/2 mixers with split input projections, hybrid and recurrent blocks (Jamba, NemotronH,
RecurrentGemma, RWKV, xLSTM, Zamba2, LFM2, gated delta nets), encoder-style and cross-attention
decoders, parallel lists (XLM), several stacks (HRM, GOT-OCR2's vision tower and language model,
BLT), modules that own several matrices (XLNet), and the "other" role (Gemma 3n).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from hft_plugin import HFTError, LayoutError, apply_selection, select_half
from hft_plugin.layouts.generic import find_stacks, read_generic
from hft_plugin.layouts.named import read_named
from hft_plugin.testing import tiny_model

from .helpers import assert_frozen_and_trained, meta_model, snapshot, train_steps

# type -> layers expected (from the default config), and the layout expected when it is a named one
SAMPLE = {
    "llama": 32, "gpt2": 12, "mixtral": 32,  # named layouts
    "cohere": 40, "olmo2": 32, "gemma": 28, "starcoder2": 30,  # dense blocks, biases
    "glm": 40,  # fused gate_up_proj
    "qwen2_moe": 24, "olmoe": 16, "granitemoe": 32, "gpt_oss": 36, "deepseek_v2": 32,  # experts, routers
    "jetmoe": 12,  # parallel experts in the MLP and in attention (MoA)
    "mamba": 32, "mamba2": 64, "falcon_mamba": 32,  # state-space mixers
    "jamba": 32, "bamba": 32, "nemotron_h": 4, "granitemoehybrid": 32, "zamba2": 54,  # hybrids
    "recurrent_gemma": 26, "rwkv": 32, "xlstm": 32, "lfm2": 32, "qwen3_5_text": 32,  # recurrent, conv, delta nets
    "bert": 12, "roberta": 12, "bart": 12, "xlnet": 24,  # encoder-style causal LMs, cross-attention
    "xlm": 12,  # parallel lists
    "hrm_text": 32, "got_ocr2": 36, "blt": 49,  # several stacks
    "gemma3n_text": 35,  # AltUp, LAuReL: the "other" role
}
NAMED = {"llama", "gpt2", "mixtral"}


def roles_by_param(layout) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for unit in layout.units():
        for part in unit.parts:
            out.setdefault(part.param, set()).add(unit.role)
    return out


# NemotronH's default config has 4 layers of 4 kinds: the category strategy visits a role's largest
# layers first so the smaller ones can absorb the remainder (it missed by 1.4 pp at round 1 before).
@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_zoo_sample_reads_within_one_point(model_type):
    model = meta_model(model_type)
    first, second = select_half(model, 0), select_half(model, 1)
    assert first.layout_name == (f"{model_type} (named)" if model_type in NAMED else "generic")
    assert len(first.layout.layers) == SAMPLE[model_type]
    for selection in (first, second):
        assert abs(selection.trainable_ratio - 0.5) <= 0.01, selection.summary()
    assert first.trainable_units != second.trainable_units
    # every parameter of every block is read into the layers: nothing of a block trains whole unseen
    prefixes = tuple(f"{prefix}." for roots in find_stacks(model) for prefix, _, _ in roots)
    assert not [n for n in first.layout.outside if n.startswith(prefixes)]
    # the units cover each parameter exactly once
    covered: dict[str, int] = {}
    for unit in first.layout.units():
        for part in unit.parts:
            covered[part.param] = covered.get(part.param, 0) + part.numel
    for name, numel in covered.items():
        assert numel == first.layout.numel(name), name


def _layer_units(model_type: str, layer: int = 0, **overrides):
    layout = read_generic(meta_model(model_type, **overrides))
    return {u.key.split(".", 3)[-1] if u.key.startswith("model.layers.") else u.key: u for u in layout.layers[layer]}


def test_mamba_input_projections_split_by_the_mixers_sizes():
    mamba = read_generic(meta_model("mamba")).layers[0]
    halves = [u for u in mamba if ".in_proj:" in u.key]
    assert [u.key.rsplit(":", 1)[1] for u in halves] == ["x", "z"]
    assert halves[0].numel == halves[1].numel
    assert {u.role for u in mamba} == {"attention", "norm"}
    model = meta_model("mamba2")
    mixer = model.backbone.layers[0].mixer
    parts = {u.key.rsplit(":", 1)[1]: u for u in read_generic(model).layers[0] if ".in_proj:" in u.key}
    hidden = model.config.hidden_size
    assert {k: u.numel // hidden for k, u in parts.items()} == {
        "z": mixer.intermediate_size, "xBC": mixer.conv_dim, "dt": mixer.num_heads,
    }


def test_zamba_interleaved_input_projection_stays_whole():
    units = read_generic(meta_model("zamba")).units()
    assert any(u.key.endswith("mamba.in_proj") for u in units)


def test_a_mixer_is_read_by_its_class_and_family_prefixes_are_ignored():
    # NemotronH calls every block's main module "mixer": Mamba, attention, MLP or MoE by class
    roles = roles_by_param(read_generic(meta_model("nemotron_h")))
    assert roles["model.layers.0.mixer.in_proj.weight"] == {"attention"}  # Mamba-2 mixer
    assert roles["model.layers.1.mixer.experts.up_proj"] == {"mlp"}  # MoE
    assert roles["model.layers.1.mixer.gate.weight"] == {"router"}
    assert roles["model.layers.1.mixer.shared_experts.up_proj.weight"] == {"mlp"}
    assert roles["model.layers.3.mixer.up_proj.weight"] == {"mlp"}  # dense MLP
    # GraniteMoeHybridMambaLayer: "Moe" belongs to the family name, the module is a Mamba mixer
    granite = roles_by_param(read_generic(meta_model("granitemoehybrid")))
    assert granite["model.layers.0.mamba.in_proj.weight"] == {"attention"}


def test_experts_routers_and_shared_experts():
    units = _layer_units("qwen2_moe")
    experts = [u for k, u in units.items() if k.startswith("mlp.experts:")]
    config = meta_model("qwen2_moe").config
    assert len(experts) == config.num_experts
    for e, unit in enumerate(experts):  # one unit per expert: its gate_up and down slices
        assert unit.role == "mlp"
        assert {p.param.rsplit(".", 1)[1] for p in unit.parts} == {"gate_up_proj", "down_proj"}
        assert all(p.boxes == (((0, e, e + 1),),) for p in unit.parts)
    assert units["mlp.gate"].role == "router"
    assert units["mlp.shared_expert_gate"].role == "router"
    assert units["mlp.shared_expert.up_proj"].role == "mlp"
    # LongCat-Flash: one unit per routed expert, each with its gate_up and down slices. Its "zero
    # experts" (identity, no weights) are no units: transformers 5.25 computes them outside the
    # stacks; 5.24 also stacked a dead gate_up slice for each, which the next test covers.
    longcat = read_generic(meta_model("longcat_flash", num_layers=2))
    config = meta_model("longcat_flash", num_layers=1).config
    stacks = {n.rsplit(".", 1)[1]: s for n, s in longcat.shapes.items() if n.startswith("model.layers.0.mlp.experts.")}
    experts = [u for u in longcat.layers[0] if ".mlp.experts:" in u.key]
    assert len(experts) == stacks["gate_up_proj"][0]
    for e, unit in enumerate(experts[: config.n_routed_experts]):
        assert {p.param.rsplit(".", 1)[1] for p in unit.parts} == {"gate_up_proj", "down_proj"}
        assert all(p.boxes == (((0, e, e + 1),),) for p in unit.parts)
    assert stacks["down_proj"][0] == config.n_routed_experts
    jetmoe = roles_by_param(read_generic(meta_model("jetmoe")))
    assert jetmoe["model.layers.0.mlp.router.layer.weight"] == {"router"}
    assert jetmoe["model.layers.0.self_attention.experts.router.layer.weight"] == {"router"}
    assert jetmoe["model.layers.0.self_attention.experts.input_linear.weight"] == {"attention"}


class _ZeroExperts(nn.Module):
    """transformers 5.24's LongCat-Flash experts: ``gate_up_proj`` stacks the routed experts and then
    one never-computed slice per zero expert; ``down_proj`` stacks the routed experts only."""

    def __init__(self, routed: int = 4, zero: int = 2):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(routed + zero, 6, 8))
        self.down_proj = nn.Parameter(torch.zeros(routed, 8, 3))


class _ZeroExpertsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Module()
        self.mlp.router = nn.Linear(8, 6)
        self.mlp.experts = _ZeroExperts()


def test_a_longer_expert_stack_still_splits_per_slice():
    """A stack with more slices than the others (5.24's LongCat-Flash) is split per slice all the
    same: expert e's unit holds slice e of every stack that has one, and the surplus slices are
    units of their own, so every element is in exactly one unit on either transformers version."""
    layout = read_generic(_Toy(_ZeroExpertsBlock(), _ZeroExpertsBlock()))
    experts = [u for u in layout.layers[0] if ":" in u.key]
    assert [u.key.rsplit(":", 1)[1] for u in experts] == [str(e) for e in range(6)]
    for e, unit in enumerate(experts):
        names = {p.param.rsplit(".", 1)[1] for p in unit.parts}
        assert names == ({"gate_up_proj", "down_proj"} if e < 4 else {"gate_up_proj"})
        assert all(p.boxes == (((0, e, e + 1),),) for p in unit.parts)
    assert {u.role for u in experts} == {"mlp"}
    assert layout.layer_numel == sum(p.numel() for n, p in _Toy(_ZeroExpertsBlock(), _ZeroExpertsBlock()).named_parameters()
                                     if n.startswith("blocks."))


def test_norms_inside_attention_train_with_their_projection():
    units = _layer_units("deepseek_v2")
    q_a = units["self_attn.q_a_proj"]
    assert {p.param for p in q_a.parts} == {
        "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
    }
    kv_a = units["self_attn.kv_a_proj_with_mqa"]
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in {p.param for p in kv_a.parts}
    assert units["input_layernorm"].role == "norm"


def test_parallel_lists_are_zipped_into_layers():
    layout = read_generic(meta_model("xlm"))
    first = {u.key: u.role for u in layout.layers[0]}
    assert first["transformer.attentions.0.q_lin"] == "attention"
    assert first["transformer.ffns.0.lin1"] == "mlp"
    assert first["transformer.layer_norm1.0"] == "norm"
    assert first["transformer.layer_norm2.0"] == "norm"
    assert all(u.key.split(".")[2] == "11" for u in layout.layers[11])


def test_every_stack_is_read():
    hrm = read_generic(meta_model("hrm_text"))
    lists = {u.key.rsplit(".layers.", 1)[0] for u in hrm.units()}
    assert lists == {"model.L_module", "model.H_module"}
    got = read_generic(meta_model("got_ocr2"))
    lists = {u.key.split(".layers.", 1)[0] for u in got.units()}
    assert lists == {"model.vision_tower", "model.language_model"}
    # lists of single modules are no blocks: Gemma 3n's AltUp projections stay outside
    gemma3n = read_generic(meta_model("gemma3n_text"))
    assert any(n.startswith("model.altup_projections.") for n in gemma3n.outside)
    assert "other" in {u.role for u in gemma3n.units()}


def test_a_module_owning_several_matrices_has_one_unit_each():
    units = _layer_units("xlnet")
    names = {k.rsplit(":", 1)[1] for k in units if ".rel_attn:" in k}
    assert {"q", "k", "v", "o", "r"} <= names


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral", "qwen3_moe"])
def test_generic_reader_agrees_with_the_named_rules(family):
    """On the families with exact rules, the generic reader puts every parameter in the same role."""
    model = tiny_model(family)
    named, generic = read_named(model), read_generic(model)
    assert roles_by_param(generic) == roles_by_param(named)
    assert generic.outside == named.outside


class _Block(nn.Module):
    """A block that keeps its weights as raw matrices of one module."""

    def __init__(self):
        super().__init__()
        self.w_qkv = nn.Parameter(torch.zeros(24, 8))
        self.w_out = nn.Parameter(torch.zeros(8, 8))
        self.w_in = nn.Parameter(torch.zeros(32, 8))


class _Toy(nn.Module):
    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(blocks)


def test_raw_matrices_of_one_module_are_one_unit_each():
    layout = read_generic(_Toy(_Block(), _Block()))
    assert [u.key for u in layout.layers[1]] == ["blocks.1:w_qkv", "blocks.1:w_out", "blocks.1:w_in"]
    assert {u.role for u in layout.units()} == {"other"}


def test_what_cannot_be_split_is_a_clear_error():
    # a layer that is a single fused tensor: no half of it can train alone
    with pytest.raises(LayoutError, match=r"blocks\.2\.weight"):
        read_generic(_Toy(_Block(), _Block(), nn.Linear(8, 8)))
    with pytest.raises(LayoutError, match="no repeated blocks"):
        read_generic(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(LayoutError, match="no repeated blocks"):  # a list of Linear modules is no stack
        read_generic(_Toy(nn.Linear(8, 8), nn.Linear(8, 8)))
    model = _Toy(_Block(), nn.Linear(8, 8))
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(HFTError, match=r"blocks\.1\.weight"):  # through select_half, changing nothing
        select_half(model)
    assert [p.requires_grad for p in model.parameters()] == before


@pytest.mark.parametrize("model_type, overrides", [
    ("mamba", dict(hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=96, intermediate_size=64)),
    ("qwen2_moe", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                       num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)),
    ("xlm", dict(emb_dim=32, n_layers=2, n_heads=4, vocab_size=96)),
])
def test_generic_selection_freezes_exactly(model_type, overrides):
    """Frozen elements stay bit-identical, trained ones move, also in per-expert and split slices."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **overrides))
    selection = select_half(model, round=1)
    assert selection.layout_name == "generic"
    handle = apply_selection(model, selection)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.attach(optimizer)
    before = snapshot(model)
    train_steps(model, optimizer, steps=2, handle=handle)
    counts = assert_frozen_and_trained(selection, before, snapshot(model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    if model_type in ("mamba", "qwen2_moe"):
        assert counts["partial"] > 0
    handle.remove()


def test_zoo_benchmark_rows():
    """benchmarks/zoo.py's row for one type: what the table shows."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "zoo.py")
    spec = importlib.util.spec_from_file_location("zoo_benchmark", path)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    row = zoo.probe("rwkv")
    assert row["status"] == "read" and row["layout"] == "generic" and row["layers"] == 32
    assert row["stacks"] == ["rwkv.blocks x32"]
    assert row["meets_goals"] == (max(row["time_r0_s"], row["time_r1_s"]) < zoo.TIME_GOAL_S)
    assert abs(row["share_r0"] - 0.5) <= 0.01 and set(row["role_shares"]) == {"attention", "mlp", "norm"}
    summary = zoo.summarize([row, {"model_type": "x", "status": "unbuildable", "error": "E"}])
    assert summary["meta_buildable"] == 1 and summary["read"] == 1
    assert "| rwkv | generic | 32 |" in zoo.markdown([row], summary, {
        "command": "c", "date": "d", "transformers": "t", "torch": "t", "python": "p", "machine": "m", "load": "1, 1"})
