"""select_half: shares, balance, determinism, rounds, fused splits, sizes without weights."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from hft_plugin import HFTConfig, Selection, select_half
from hft_plugin.layouts.base import param_shape
from hft_plugin.testing import TINY_CONFIGS, tiny_config, tiny_model

from .helpers import meta_model

FAMILIES = sorted(TINY_CONFIGS)
STRATEGIES = ["category", "layer", "model"]


@pytest.fixture(scope="module")
def full_size_models():
    """The families' default (full-size) configs, on the meta device: no weights exist."""
    return {family: meta_model(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_named_layout_reads_every_family(family):
    selection = select_half(tiny_model(family))
    assert selection.layout_name == f"{family} (named)"
    assert selection.layout_name in selection.summary()
    assert len(selection.layout.layers) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_category_half_is_exact_on_tiny_models(family):
    selection = select_half(tiny_model(family))
    # biases (qwen2, gpt2, gpt_neox) make a projection slightly larger than its partner
    tolerance = 0.0 if family not in ("qwen2", "gpt2", "gpt_neox") else 0.01
    assert abs(selection.trainable_ratio - 0.5) <= tolerance
    for role, stats in selection.stats()["roles"].items():
        assert abs(stats["ratio"] - 0.5) <= 0.05, (role, stats)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["category", "model"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_ratio_within_one_point_on_full_size_configs(full_size_models, family, strategy, ratio):
    selection = select_half(full_size_models[family], strategy=strategy, ratio=ratio)
    assert abs(selection.trainable_ratio - ratio) <= 0.01


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_layer_strategy_is_exact_to_one_layer(full_size_models, family, ratio):
    selection = select_half(full_size_models[family], strategy="layer", ratio=ratio)
    layers = len(selection.layout.layers)
    assert abs(selection.trainable_ratio - ratio) <= 1 / layers + 1e-9
    for layer in selection.layout.layers:  # whole layers only
        assert len({selection.is_trainable(u.key) for u in layer}) == 1


def test_llama_category_is_the_papers_rule():
    model = meta_model("llama", num_hidden_layers=8)
    selection = select_half(model)
    assert selection.trainable_ratio == 0.5
    mlp_counts = []
    for layer in selection.layout.layers:
        trained = {u.key.rsplit(".", 1)[-1] for u in layer if selection.is_trainable(u.key)}
        assert len(trained & {"q_proj", "k_proj", "v_proj", "o_proj"}) == 2
        assert len(trained & {"input_layernorm", "post_attention_layernorm"}) == 1
        mlp_counts.append(len(trained & {"gate_proj", "up_proj", "down_proj"}))
    assert sorted(mlp_counts) == [1, 1, 1, 1, 2, 2, 2, 2]


def test_grouped_query_attention_trains_one_of_q_o_and_one_of_k_v():
    selection = select_half(meta_model("llama", num_key_value_heads=8))
    assert selection.trainable_ratio == 0.5
    for layer in selection.layout.layers:
        trained = {u.key.rsplit(".", 1)[-1] for u in layer if selection.is_trainable(u.key)}
        assert len(trained & {"q_proj", "o_proj"}) == 1
        assert len(trained & {"k_proj", "v_proj"}) == 1


def test_layer_strategy_alternates_between_rounds():
    model = tiny_model("llama")
    rounds = [select_half(model, r, strategy="layer") for r in range(3)]
    trained = [[rounds[r].is_trainable(layer[0].key) for layer in rounds[r].layout.layers] for r in range(3)]
    assert trained[0] == [not t for t in trained[1]]
    assert trained[2] == trained[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_consecutive_rounds_differ(strategy, family):
    model = tiny_model(family, num_hidden_layers=2) if family != "gpt2" else tiny_model(family, n_layer=2)
    selections = [select_half(model, r, strategy=strategy) for r in range(6)]
    for a, b in zip(selections, selections[1:]):
        assert a.trainable_units != b.trainable_units


def test_deterministic_and_global_rng_untouched():
    model = tiny_model("llama")
    random.seed(123)
    torch.manual_seed(123)
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    first = select_half(model, 2, seed=7)
    assert random.getstate() == py_state
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert select_half(model, 2, seed=7).trainable_units == first.trainable_units
    assert select_half(model, 2, seed=8).trainable_units != first.trainable_units


def test_separate_processes_choose_the_same_half():
    code = (
        "import sys; from hft_plugin import select_half; from hft_plugin.testing import tiny_model;"
        "s = select_half(tiny_model('llama'), 3, seed=5); print(','.join(sorted(s.trainable_units)))"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout
        for seed in (1, 2)
    }
    assert len(outputs) == 1
    here = select_half(tiny_model("llama"), 3, seed=5)
    assert outputs.pop().strip() == ",".join(sorted(here.trainable_units))


def test_meta_device_and_materialised_models_agree():
    materialised = tiny_model("phi3")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(tiny_config("phi3"))
    assert select_half(meta).to_dict()["layers"] == select_half(materialised).to_dict()["layers"]


def test_zero3_partitioned_sizes_are_read_from_ds_shape():
    model = tiny_model("llama")
    expected = select_half(model, 1)
    for param in model.parameters():  # what ZeRO-3 leaves on a rank: an empty tensor plus ds_* attributes
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        param.data = torch.empty(0)
    assert all(param_shape(p) != (0,) for p in model.parameters())
    assert select_half(model, 1).to_dict()["layers"] == expected.to_dict()["layers"]


def test_fused_tensors_split_into_their_parts():
    cfg = TINY_CONFIGS["phi3"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    selection = select_half(tiny_model("phi3"))
    units = {u.key: u for u in selection.layout.layers[0]}
    qkv = {k.rsplit(":", 1)[1]: u for k, u in units.items() if "qkv_proj" in k}
    assert [qkv[p].parts[0].boxes for p in "qkv"] == [
        (((0, 0, q),),), (((0, q, q + kv),),), (((0, q + kv, q + 2 * kv),),),
    ]
    gpt2 = select_half(tiny_model("gpt2"))
    c_attn = [u for u in gpt2.layout.layers[0] if "c_attn" in u.key]
    assert len(c_attn) == 3 and all(len(u.parts) == 2 for u in c_attn)  # weight (dim 1) + bias (dim 0)
    assert c_attn[0].parts[0].boxes == (((1, 0, 64),),)
    neox = select_half(tiny_model("gpt_neox"))
    q_part = next(u for u in neox.layout.layers[0] if u.key.endswith("query_key_value:q")).parts[0]
    assert len(q_part.boxes) == 4  # one row block per head: [q k v] interleave per head


def test_moe_experts_are_split_per_expert_and_router_is_its_own_role():
    selection = select_half(tiny_model("mixtral"))
    roles = selection.stats()["roles"]
    assert set(roles) == {"attention", "mlp", "norm", "router"}
    experts = [u for u in selection.layout.layers[0] if "experts" in u.key]
    assert len(experts) == 4 * 3  # gate, up, down per expert
    assert abs(roles["mlp"]["ratio"] - 0.5) < 1e-9


def test_qwen3_qk_norms_follow_their_projections():
    selection = select_half(tiny_model("qwen3"))
    unit = next(u for u in selection.layout.layers[0] if u.key.endswith("self_attn.q_proj"))
    assert [p.param.rsplit(".", 2)[-2] for p in unit.parts] == ["q_proj", "q_norm"]


def test_tied_embeddings_are_one_parameter():
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to wte
    selection = select_half(model)
    assert "lm_head.weight" not in selection.layout.shapes
    assert "transformer.wte.weight" in selection.plan().trainable
    frozen = select_half(model, train_embeddings=False)
    assert "transformer.wte.weight" in frozen.plan().frozen
    assert frozen.stats()["outside_trainable_params"] == 0


def test_json_round_trip_and_fingerprint(tmp_path):
    selection = select_half(tiny_model("phi3"), 2, ratio=0.4, seed=3)
    again = Selection.from_json(selection.to_json())
    assert again.trainable_units == selection.trainable_units
    assert again.config == selection.config
    assert again.plan() == selection.plan()
    assert again.fingerprint == selection.fingerprint
    path = selection.save(str(tmp_path))
    assert Selection.load(str(tmp_path)).trainable_units == selection.trainable_units
    data = json.loads(open(path).read())
    data["shapes"]["lm_head.weight"] = [1, 1]
    with pytest.raises(Exception, match="fingerprint"):
        Selection.from_json(json.dumps(data))
    assert select_half(tiny_model("phi3", num_hidden_layers=2)).fingerprint != selection.fingerprint


def test_summary_shows_roles_and_shares():
    text = select_half(tiny_model("llama")).summary()
    for word in ("attention", "mlp", "norm", "layers (HFT ratio)", "outside layers", "50.00%", "strategy=category"):
        assert word in text


def test_stats_count_per_role_and_keep_the_former_name():
    # "groups" was the name of "roles" (documented in docs/manifest.md): kept, deprecated, the same object
    from hft_plugin.checks import applied_counts
    from hft_plugin.report import layer_grid, stats_metrics

    model = tiny_model("llama")
    selection = select_half(model)
    for stats in (selection.stats(), applied_counts(selection, model), selection.to_dict()["stats"]):
        assert list(stats["roles"]) == ["attention", "mlp", "norm"] and stats["groups"] is stats["roles"]
    assert json.loads(selection.to_json())["stats"]["groups"] == json.loads(selection.to_json())["stats"]["roles"]
    assert stats_metrics(selection)["hft/mlp_ratio"] == 0.5
    grid = layer_grid(selection)
    assert grid.column_roles[:4] == ["attention"] * 4 and grid.column_groups is grid.column_roles


def test_summary_keeps_counts_of_a_very_large_model_apart():
    """LongCat-Flash's 560,664,958,976 parameters filled the 15-character column: the trainable
    and total counts ran together ("281,137,788,928560,664,958,976")."""
    selection = select_half(tiny_model("llama"))
    stats = selection.stats()
    stats.update(trainable_params=281_137_788_928, total_params=560_664_958_976)
    row = next(line for line in selection.summary(stats).splitlines() if line.startswith("all parameters"))
    assert row.split()[2:4] == ["281,137,788,928", "560,664,958,976"]


def test_config_argument_and_keywords_agree():
    model = tiny_model("llama")
    config = HFTConfig(ratio=0.3, strategy="model", round=2, seed=4)
    assert select_half(model, config=config).trainable_units == select_half(model, 2, ratio=0.3, strategy="model", seed=4).trainable_units
