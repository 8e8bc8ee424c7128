"""Plans and settings: HeadPattern validation, ModelPlan.heads_for, JSON (ours and MInference's),
load_plan, BackendConfig.from_options and clamp_budget.

Rule under test (DESIGN.md): bad configuration fails with a message that names the layer, the head
and the value. Messages are checked by substring so that rewording stays possible.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mif_compile
from mif_compile.config import (
    DEFAULT_BUDGETS,
    BackendConfig,
    ConfigError,
    HeadPattern,
    ModelPlan,
    Pattern,
    clamp_budget,
    load_plan,
    save_plan,
)

FEW = settings(deadline=None, max_examples=25)


# -- HeadPattern ---------------------------------------------------------------------------------


def test_constructors_and_defaults():
    assert HeadPattern.a_shape() == HeadPattern(Pattern.A_SHAPE, (128, 3968))
    assert HeadPattern.vertical_slash() == HeadPattern(Pattern.VERTICAL_SLASH, (1000, 6096))
    assert HeadPattern.block_sparse() == HeadPattern(Pattern.BLOCK_SPARSE, (100,))
    assert HeadPattern.dense() == HeadPattern(Pattern.DENSE, ())
    for p in Pattern:
        assert HeadPattern.default_for(p).budget == DEFAULT_BUDGETS[p]
        assert HeadPattern.default_for(p.value) == HeadPattern.default_for(p)
    # pattern names as strings, MInference's names, case and spaces; budgets as lists
    assert HeadPattern("vertical_slash", [30, 800]) == HeadPattern.vertical_slash(30, 800)
    assert HeadPattern(" Vertical_And_Slash ", (30, 800)).pattern is Pattern.VERTICAL_SLASH
    assert HeadPattern("stream_llm", (4, 64)) == HeadPattern.a_shape(4, 64)
    assert HeadPattern.a_shape(4, 64).describe() == "a_shape(n_init=4, n_local=64)"
    assert HeadPattern.dense().describe() == "dense"
    assert Pattern.DENSE.code == 0 and len({p.code for p in Pattern}) == len(Pattern)


@pytest.mark.parametrize("name", ["sliding_window", "", "vertical slash", "A-shape"])
def test_unknown_pattern_names_the_value(name):
    with pytest.raises(ConfigError, match="unknown pattern") as e:
        HeadPattern(name, ())
    assert repr(name) in str(e.value)
    assert "vertical_slash" in str(e.value)  # lists the known patterns


@pytest.mark.parametrize("bad", [None, 3, 2.5])
def test_unknown_pattern_of_another_type(bad):
    with pytest.raises(ConfigError, match="unknown pattern") as e:
        HeadPattern.default_for(bad)
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize(
    "ctor, args, name, value",
    [
        (HeadPattern.vertical_slash, (0, 6096), "v", "0"),
        (HeadPattern.vertical_slash, (1000, -5), "s", "-5"),
        (HeadPattern.a_shape, (-1, 64), "n_init", "-1"),
        (HeadPattern.a_shape, (4, 0), "n_local", "0"),
        (HeadPattern.block_sparse, (-100,), "top_k", "-100"),
    ],
)
def test_non_positive_budget_names_budget_and_value(ctor, args, name, value):
    with pytest.raises(ConfigError, match="positive") as e:
        ctor(*args)
    msg = str(e.value)
    assert f"budget {name}" in msg and f"got {value}" in msg


@pytest.mark.parametrize("value", [1.5, 1000.0, True, False, "1000", None, float("nan")])
def test_non_integer_budget_names_the_value(value):
    with pytest.raises(ConfigError, match="integer") as e:
        HeadPattern.vertical_slash(value, 6096)
    assert f"got {value!r}" in str(e.value)
    assert "budget v" in str(e.value)
    with pytest.raises(ConfigError, match="integer") as e:
        HeadPattern.block_sparse(value)
    assert f"got {value!r}" in str(e.value)


@pytest.mark.parametrize(
    "pattern, budget",
    [
        (Pattern.VERTICAL_SLASH, (1000,)),
        (Pattern.VERTICAL_SLASH, (1, 2, 3)),
        (Pattern.A_SHAPE, ()),
        (Pattern.BLOCK_SPARSE, (8, 8)),
        (Pattern.DENSE, (1,)),
    ],
)
def test_wrong_arity_names_pattern_and_budget(pattern, budget):
    with pytest.raises(ConfigError, match="budget value") as e:
        HeadPattern(pattern, budget)
    msg = str(e.value)
    assert repr(pattern.value) in msg and repr(list(budget)) in msg


@pytest.mark.parametrize("budget", [100, 2.5, "100", None])
def test_scalar_budget_is_a_config_error(budget):
    with pytest.raises(ConfigError, match="budget") as e:
        HeadPattern(Pattern.BLOCK_SPARSE, budget)
    assert repr(budget) in str(e.value)


def test_validate_with_location_and_from_json_locations():
    hp = HeadPattern.vertical_slash(30, 800)
    hp.validate(3, 7)  # fine
    with pytest.raises(ConfigError) as e:
        HeadPattern.from_json({"pattern": "vertical_slash", "v": 0}, layer=3, head=7)
    assert "layer 3, head 7" in str(e.value) and "got 0" in str(e.value)
    assert str(e.value).count("layer 3") == 1  # the location is not repeated
    with pytest.raises(ConfigError, match="layer 2, head 1: unknown pattern 'nope'"):
        HeadPattern.from_json({"pattern": "nope"}, layer=2, head=1)
    with pytest.raises(ConfigError, match="layer 2, head 1: unknown pattern 'nope'"):
        HeadPattern.from_json("nope", layer=2, head=1)
    with pytest.raises(ConfigError, match=r"layer 0, head 0: unknown key\(s\) \['v'\]"):
        HeadPattern.from_json({"pattern": "block_sparse", "v": 3}, layer=0, head=0)
    with pytest.raises(ConfigError, match="layer 1, head 2: expected a head entry"):
        HeadPattern.from_json(42, layer=1, head=2)
    # missing budget values take the pattern's defaults; a bare name is the default head
    assert HeadPattern.from_json({"pattern": "vertical_slash", "v": 30}) == HeadPattern.vertical_slash(30, 6096)
    assert HeadPattern.from_json("block_sparse") == HeadPattern.block_sparse()


# -- ModelPlan: construction and heads_for ---------------------------------------------------------


def test_model_plan_rejects_non_headpattern_naming_layer_and_head():
    with pytest.raises(ConfigError) as e:
        ModelPlan(((HeadPattern.dense(),), (HeadPattern.dense(), "a_shape")))
    assert "layer 1, head 1" in str(e.value) and "'a_shape'" in str(e.value)


def test_heads_for_uniform_and_per_layer():
    assert ModelPlan().heads_for(5, 3) == (HeadPattern.vertical_slash(),) * 3
    assert ModelPlan.uniform(HeadPattern.a_shape(1, 2)).heads_for(0, 2) == (HeadPattern.a_shape(1, 2),) * 2
    plan = ModelPlan(((HeadPattern.dense(),) * 2, (HeadPattern.block_sparse(4), HeadPattern.a_shape())))
    assert plan.num_layers == 2 and ModelPlan().num_layers is None
    assert plan.heads_for(1, 2) == (HeadPattern.block_sparse(4), HeadPattern.a_shape())


@pytest.mark.parametrize("layer", [2, 7, -1])
def test_heads_for_layer_outside_plan(layer):
    plan = ModelPlan(((HeadPattern.dense(),) * 4,) * 2)
    with pytest.raises(ConfigError) as e:
        plan.heads_for(layer, 4)
    msg = str(e.value)
    assert f"layer {layer}" in msg and "2 layers" in msg


def test_heads_for_head_count_mismatch():
    plan = ModelPlan(((HeadPattern.dense(),) * 4, (HeadPattern.a_shape(),) * 3))
    with pytest.raises(ConfigError) as e:
        plan.heads_for(1, 8)
    msg = str(e.value)
    assert msg.startswith("layer 1") and "3 heads" in msg and "8 query heads" in msg


# -- ModelPlan: against the whole model ------------------------------------------------------------


def _hf_config(layers: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       hidden_size=16 * heads, intermediate_size=32, vocab_size=32)


def test_check_model_layers_and_heads():
    """A plan with more (or fewer) layers than the model, or other head counts, fails up front."""
    plan = ModelPlan(((HeadPattern.dense(),) * 4,) * 3)
    plan.check_model(_hf_config(3, 4))
    ModelPlan().check_model(_hf_config(7, 5))  # a uniform plan fits every model
    with pytest.raises(ConfigError) as e:
        plan.check_model(_hf_config(2, 4))
    assert "the plan has 3 layers, but the model has 2" in str(e.value)
    with pytest.raises(ConfigError, match="the model has 4 "):
        plan.check_model(_hf_config(4, 4))
    with pytest.raises(ConfigError) as e:
        ModelPlan(((HeadPattern.dense(),) * 4, (HeadPattern.dense(),) * 2)).check_model(_hf_config(2, 4))
    assert str(e.value).startswith("layer 1: the plan gives 2 heads, but the model has 4 query heads")
    with pytest.raises(ConfigError, match="no config with num_hidden_layers"):
        plan.check_model(object())


def test_check_model_reads_a_model_and_a_text_config():
    import types

    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=2))
    ModelPlan(((HeadPattern.dense(),) * 2,)).check_model(model)
    outer = types.SimpleNamespace(get_text_config=lambda: model.config)  # a multimodal model's config
    with pytest.raises(ConfigError, match="2 layers, but the model has 1"):
        ModelPlan(((HeadPattern.dense(),) * 2,) * 2).check_model(types.SimpleNamespace(config=outer))


def test_per_layer_plan_default_is_dense():
    """A per-layer plan never consults its default; it is dense unless given (MInference's files have none)."""
    heads = ((HeadPattern.a_shape(4, 64),),)
    assert ModelPlan(heads).default == HeadPattern.dense()
    assert ModelPlan().default == HeadPattern.vertical_slash() == ModelPlan(None).default
    assert ModelPlan(heads, HeadPattern.block_sparse(2)).default == HeadPattern.block_sparse(2)
    assert ModelPlan.from_json({"layers": [[{"pattern": "dense"}]]}).default == HeadPattern.dense()
    assert ModelPlan.from_json({"layers": None}).default == HeadPattern.vertical_slash()
    with pytest.raises(ConfigError, match="default: expected a HeadPattern"):
        ModelPlan(heads, "dense")


def test_score_name():
    mi = [{"0": ["vertical_and_slash", 1000, 6096, 336], "1": ["vertical_and_slash", 30, 800, 0.5]}]
    assert ModelPlan.from_json(mi).score_name() == "score"  # Llama-3-8B-262k's file holds raw scores
    assert ModelPlan(((HeadPattern("dense", (), 1.0), HeadPattern("dense", (), 0.0)),)).score_name() == "recall"
    assert ModelPlan(((HeadPattern.dense(),),)).score_name() is None and ModelPlan().score_name() is None


# -- JSON: ours ----------------------------------------------------------------------------------

head_patterns = st.one_of(
    st.builds(HeadPattern.a_shape, st.integers(1, 10**6), st.integers(1, 10**6)),
    st.builds(HeadPattern.vertical_slash, st.integers(1, 10**6), st.integers(1, 10**6)),
    st.builds(HeadPattern.block_sparse, st.integers(1, 10**4)),
    st.just(HeadPattern.dense()),
)
scores = st.one_of(st.none(), st.floats(0.0, 1.0, allow_nan=False))
scored_heads = st.builds(lambda hp, s: HeadPattern(hp.pattern, hp.budget, s), head_patterns, scores)
plans = st.builds(
    ModelPlan,
    st.lists(st.lists(scored_heads, min_size=1, max_size=5), min_size=1, max_size=4),
    head_patterns,
)


@FEW
@given(plans)
@example(ModelPlan())
@example(ModelPlan.uniform(HeadPattern.dense()))
def test_our_json_round_trip(plan):
    text = json.dumps(plan.to_json())
    obj = json.loads(text)
    assert obj["format"] == "mif-compile/v1"
    back = ModelPlan.from_json(obj)
    assert back == plan
    assert hash(back) == hash(plan)


def test_our_json_file_round_trip(tmp_path):
    plan = ModelPlan(
        ((HeadPattern.vertical_slash(30, 800), HeadPattern("a_shape", (4, 64), 0.25)), (HeadPattern.dense(),) * 2),
        HeadPattern.block_sparse(7),
    )
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    assert load_plan(path) == plan
    assert load_plan(str(path)) == plan
    assert mif_compile.load_plan is load_plan


def test_our_json_errors_name_layer_and_head():
    obj = {"layers": [[{"pattern": "dense"}], [{"pattern": "dense"}, {"pattern": "vertical_slash", "v": 1.5}]]}
    with pytest.raises(ConfigError) as e:
        ModelPlan.from_json(obj)
    assert "layer 1, head 1" in str(e.value) and "1.5" in str(e.value)
    with pytest.raises(ConfigError, match="layer 0, head 0: unknown pattern 'foo'"):
        ModelPlan.from_json({"layers": [[{"pattern": "foo"}]]})
    with pytest.raises(ConfigError, match="layer 1: expected a list of heads"):
        ModelPlan.from_json({"layers": [[], {"pattern": "dense"}]})
    with pytest.raises(ConfigError, match="unknown plan format 'v0'"):
        ModelPlan.from_json({"format": "v0"})
    with pytest.raises(ConfigError, match="'layers' must be a list"):
        ModelPlan.from_json({"layers": {"0": []}})
    with pytest.raises(ConfigError, match="got str"):
        ModelPlan.from_json("vertical_slash")


@pytest.mark.parametrize("value", [True, "7", 2.5, 0, -3])
def test_our_json_bad_budget_values(value):
    obj = {"layers": [[{"pattern": "dense"}] * 3, [{"pattern": "dense"}] * 2 + [{"pattern": "block_sparse", "top_k": value}]]}
    with pytest.raises(ConfigError) as e:
        ModelPlan.from_json(obj)
    msg = str(e.value)
    assert "layer 1, head 2" in msg and "top_k" in msg and repr(value) in msg


# -- JSON: MInference's --------------------------------------------------------------------------


def test_minference_import():
    cfg = [
        {"0": ["vertical_and_slash", 1000, 6096, 0.91], "1": ["stream_llm", 100, 800, 0.5]},
        {"1": ["block_sparse", 8, 0, 0.7], "0": ["vertical_and_slash", 3500.0, 100, 1]},
    ]
    plan = ModelPlan.from_json(cfg)
    assert _same_heads(plan, ModelPlan((
        (HeadPattern.vertical_slash(1000, 6096), HeadPattern.a_shape(100, 800)),
        (HeadPattern.vertical_slash(3500, 100), HeadPattern.block_sparse(8)),
    )))
    assert [hp.score for layer in plan.layers for hp in layer] == [0.91, 0.5, 1.0, 0.7]
    assert all(type(b) is int for layer in plan.layers for hp in layer for b in hp.budget)
    # a stream_llm entry means A-shape (n_init, n_local)
    assert plan.layers[0][1].pattern is Pattern.A_SHAPE and plan.layers[0][1].budget == (100, 800)
    # MInference's vertical-slash budgets are fixed ones: its heads keep that meaning whatever the
    # backend's mass setting (default: the adaptive index), the other patterns have no mass
    assert [hp.mass for layer in plan.layers for hp in layer] == ["fixed", None, "fixed", None]
    # integer keys (a Python list of dicts) work too; the score slot is optional
    assert ModelPlan.from_json([{0: ["vertical_and_slash", 30, 800]}]).layers == (
        (HeadPattern.vertical_slash(30, 800, mass="fixed"),),)
    assert ModelPlan.from_json([{"0": ["vertical_and_slash", 30, 800, "n/a"]}]).layers[0][0].score is None


def test_minference_export():
    plan = ModelPlan((
        (HeadPattern.vertical_slash(30, 800), HeadPattern("a_shape", (4, 64), 0.5)),
        (HeadPattern.block_sparse(8), HeadPattern.dense()),
    ))
    out = plan.to_minference_json()
    assert out == [
        {"0": ["vertical_and_slash", 30, 800, None], "1": ["stream_llm", 4, 64, 0.5]},
        {"0": ["block_sparse", 8, 0, None], "1": ["dense", 0, 0, None]},
    ]
    json.dumps(out)
    with pytest.raises(ConfigError, match="uniform"):
        ModelPlan().to_minference_json()


def _same_heads(a: ModelPlan, b: ModelPlan) -> bool:
    return [[(h.pattern, h.budget) for h in la] for la in a.layers] == [[(h.pattern, h.budget) for h in lb] for lb in b.layers]


@FEW
@given(plans)
def test_minference_round_trip(plan):
    back = ModelPlan.from_json(json.loads(json.dumps(plan.to_minference_json())))
    assert _same_heads(back, plan)
    # scores too (a missing score stays missing); no default in this format; vertical-slash heads come
    # back as what the format means, fixed budgets
    assert back == ModelPlan(plan.layers).without_mass()
    assert all(hp.fixed for layer in back.layers for hp in layer if hp.pattern is Pattern.VERTICAL_SLASH)


def test_minference_round_trip_keeps_a_searched_plans_default(tmp_path):
    """``convert --to minference`` and back: a plan as the search writes it (default dense) comes back equal."""
    plan = ModelPlan(((HeadPattern("vertical_slash", (30, 800), 0.97, "fixed"), HeadPattern("dense", (), 1.0)),) * 2,
                     HeadPattern.dense())
    save_plan(plan, tmp_path / "mi.json", minference_format=True)
    assert load_plan(tmp_path / "mi.json") == plan


def test_minference_round_trip_of_unscored_plan_is_exact():
    plan = ModelPlan(((HeadPattern.vertical_slash(30, 800, mass="fixed"), HeadPattern.block_sparse(2)),))
    assert ModelPlan.from_json(json.loads(json.dumps(plan.to_minference_json()))) == plan


def test_minference_file_round_trip(tmp_path):
    plan = ModelPlan((
        (HeadPattern("vertical_slash", (1000, 6096), 0.75, "fixed"), HeadPattern("a_shape", (4, 64), 0.5)),
        (HeadPattern("block_sparse", (3,), 0.25), HeadPattern("dense", (), 1.0)),
    ))
    path = tmp_path / "minference.json"
    save_plan(plan, path, minference_format=True)
    assert isinstance(json.loads(path.read_text()), list)
    assert load_plan(path) == plan


@pytest.mark.parametrize(
    "cfg, needles",
    [
        ([{"0": ["vertical_and_slash", 1000, 6096, 0.9]}, {"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["sliding", 1, 1, 0]}],
         ["layer 1, head 1", "unknown pattern 'sliding'"]),
        ([{"0": ["vertical_and_slash", 1000, 0, 0.9]}], ["layer 0, head 0", "budget s", "got 0"]),
        ([{"0": ["dense", 0, 0, 0]}, {"0": ["dense", 0, 0, 0], "1": ["stream_llm", -4, 64, 0.5]}],
         ["layer 1, head 1", "n_init", "-4"]),
        ([{"0": ["vertical_and_slash", 1000.5, 6096, 0.9]}], ["layer 0, head 0", "1000.5"]),
        ([{"0": ["vertical_and_slash", True, 6096, 0.9]}], ["layer 0, head 0", "True"]),
        ([{"0": ["vertical_and_slash", "1000", 6096, 0.9]}], ["layer 0, head 0", "'1000'"]),
        ([{"0": ["vertical_and_slash", 1000]}], ["layer 0, head 0", "[pattern, v, s, score]"]),
        ([{"0": ["dense", 0, 0, 0], "2": ["dense", 0, 0, 0]}], ["layer 0", "0..1", "[0, 2]"]),
        ([{"a": ["dense", 0, 0, 0]}], ["layer 0", "integers"]),
        ([{"0": ["dense", 0, 0, 0]}, ["dense"]], ["layer 1", "one dict per layer"]),
    ],
)
def test_minference_errors_name_layer_head_value(cfg, needles):
    with pytest.raises(ConfigError) as e:
        ModelPlan.from_json(cfg)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


# -- load_plan -----------------------------------------------------------------------------------


def test_load_plan_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"0": ["vertical_and_slash", 1000, 6096, 0.9]},\n {"0": ["dense", 0, 0 0]}\n]\n')
    with pytest.raises(ConfigError) as e:
        load_plan(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg


def test_load_plan_bad_entry_names_file_layer_head(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"0": ["dense", 0, 0, 0]}, {"0": ["dense", 0, 0, 0], "1": ["block_sparse", 0, 0, 0]}]))
    with pytest.raises(ConfigError) as e:
        load_plan(path)
    msg = str(e.value)
    assert str(path) in msg and "layer 1, head 1" in msg and "top_k" in msg and "got 0" in msg


def test_load_plan_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="cannot read plan file") as e:
        load_plan(path)
    assert str(path) in str(e.value)


# -- BackendConfig -------------------------------------------------------------------------------


def test_from_options_defaults():
    cfg = BackendConfig.from_options(None)
    assert cfg == BackendConfig() == BackendConfig.from_options({})
    assert cfg.min_seq_len == 32768 and cfg.block_m == 128 and cfg.last_q == 64 and cfg.impl == "auto"
    assert cfg.plan == ModelPlan() and cfg.default_pattern == HeadPattern.vertical_slash()


def test_from_options_config_alias(tmp_path):
    plan = ModelPlan(((HeadPattern.a_shape(4, 64),) * 2,))
    path = tmp_path / "p.json"
    save_plan(plan, path)
    for value in (plan, str(path), path, plan.to_json()):
        cfg = BackendConfig.from_options({"config": value, "min_seq_len": 5})
        assert cfg.plan == plan and cfg.min_seq_len == 5
        assert BackendConfig.from_options({"plan": value}).plan == plan
    save_plan(plan, path, minference_format=True)
    assert _same_heads(BackendConfig.from_options({"config": str(path)}).plan, plan)
    # a BackendConfig as `config`, with overrides
    base = BackendConfig(plan=plan, min_seq_len=7, impl="reference")
    assert BackendConfig.from_options({"config": base}) is base
    cfg = BackendConfig.from_options({"config": base}, block_m=128)
    assert (cfg.plan, cfg.min_seq_len, cfg.impl, cfg.block_m) == (plan, 7, "reference", 128)
    with pytest.raises(ConfigError, match="either 'config' or 'plan'"):
        BackendConfig.from_options({"config": plan, "plan": plan})


def test_from_options_default_pattern():
    assert BackendConfig(default_pattern="a_shape").plan.default == HeadPattern.a_shape()
    assert BackendConfig(default_pattern=Pattern.DENSE).default_pattern == HeadPattern.dense()
    cfg = BackendConfig.from_options({"default_pattern": {"pattern": "block_sparse", "top_k": 3}})
    assert cfg.plan.heads_for(0, 2) == (HeadPattern.block_sparse(3),) * 2
    with pytest.raises(ConfigError, match="unknown pattern 'blocky'"):
        BackendConfig(default_pattern="blocky")
    with pytest.raises(ConfigError, match="default_pattern"):
        BackendConfig(default_pattern=5)
    with pytest.raises(ConfigError, match="got int"):
        BackendConfig(plan=42)


def test_from_options_unknown_option():
    with pytest.raises(ConfigError, match="unknown option") as e:
        BackendConfig.from_options({"min_seqlen": 10, "plan": None})
    msg = str(e.value)
    assert "min_seqlen" in msg and "min_seq_len" in msg and "config" in msg
    # the backend factory checks its settings before anything is traced
    with pytest.raises(ConfigError, match="unknown option"):
        mif_compile.backend(sparse=True)


def test_unknown_option_with_a_backendconfig():
    with pytest.raises(ConfigError, match="unknown option") as e:
        BackendConfig.from_options({"config": BackendConfig(), "min_seqlen": 10})
    assert "min_seqlen" in str(e.value)
    with pytest.raises(ConfigError, match="unknown option"):
        mif_compile.backend(BackendConfig(), min_seqlen=10)


@pytest.mark.parametrize("value", [-1, True, 1.5, 100.0, "100", None])
def test_bad_min_seq_len(value):
    with pytest.raises(ConfigError, match="min_seq_len") as e:
        BackendConfig.from_options({"min_seq_len": value})
    assert repr(value) in str(e.value)
    with pytest.raises(ConfigError, match="min_seq_len"):
        BackendConfig.from_options({"config": BackendConfig(), "min_seq_len": value})


def test_min_seq_len_zero_is_allowed():
    assert BackendConfig.from_options({"min_seq_len": 0}).min_seq_len == 0


@pytest.mark.parametrize("value", [32, 256, 0, -64, True, 64.0, "64"])
def test_bad_block_m(value):
    with pytest.raises(ConfigError, match="block_m") as e:
        BackendConfig.from_options({"block_m": value})
    assert str(value) in str(e.value)


@pytest.mark.parametrize("value", [0, -1, True, 1.0])
def test_bad_last_q(value):
    with pytest.raises(ConfigError, match="last_q"):
        BackendConfig.from_options({"last_q": value})


# ids: a bare "cuda" id would match tests/conftest.py's `"cuda" in item.keywords` and be skipped
@pytest.mark.parametrize("value", ["cuda", "Triton", "", None], ids=lambda v: f"impl={v!r}")
def test_bad_impl(value):
    with pytest.raises(ConfigError, match="impl") as e:
        BackendConfig.from_options({"impl": value})
    assert repr(value) in str(e.value)


def test_good_settings():
    cfg = BackendConfig.from_options({"block_m": 128, "impl": "reference", "last_q": 16, "min_seq_len": 1})
    assert (cfg.block_m, cfg.impl, cfg.last_q, cfg.min_seq_len) == (128, "reference", 16, 1)
    assert BackendConfig.from_options(impl="triton").impl == "triton"
    assert mif_compile.backend(block_m=128, inductor=False).config.block_m == 128


# -- options through torch.compile: errors are ours, the option and value first ---------------------


class _Attn(torch.nn.Module):
    def forward(self, q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


class _OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Attn()])  # "layers.0": the site's layer index

    def forward(self, q, k, v):
        return self.layers[0](q)


def _first_forward_error(**compile_kwargs) -> ConfigError:
    """The error of the first forward of a compiled one-layer SDPA (2 heads, 64 tokens)."""
    q = torch.randn(1, 2, 64, 16)
    compiled = torch.compile(_OneLayer(), **compile_kwargs)
    with pytest.raises(ConfigError) as e:
        compiled(q, q, q)
    return e.value


@pytest.mark.parametrize("options, start", [
    ({"config": "nope.json"}, "config='nope.json': cannot read plan file: No such file or directory"),
    ({"min_seq_len": -1}, "min_seq_len=-1: must be a non-negative integer"),
    ({"max_density": 2}, "max_density=2: must be a number in (0, 1]"),
    ({"default_pattern": "sliding"}, "default_pattern='sliding': unknown pattern 'sliding'"),
    ({"mode": "fast"}, "mode='fast': must be None or one of Inductor's modes"),
    ({"inductor": "no"}, "inductor='no': must be True or False"),
    ({"min_seqlen": 5}, "unknown option(s) ['min_seqlen']"),
])
def test_bad_option_fails_at_first_forward_with_our_message(options, start):
    err = _first_forward_error(backend="minference", options={"inductor": False, **options})
    assert isinstance(err, torch._dynamo.exc.BackendCompilerFailed)  # whoever catches Dynamo's error still can
    msg = str(err)
    assert msg.startswith(start), msg
    assert "backend='minference'" in msg and "PyTorch" not in msg and "TORCHDYNAMO_VERBOSE" not in msg
    # the traceback: the caller, torch.nn and Dynamo's re-raise, the backend (not Dynamo's 30 frames)
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    assert frames[-1].filename.endswith("backend.py") and len(frames) <= 6, frames


def test_plan_for_another_model_names_the_config_file(tmp_path):
    path = tmp_path / "p.json"
    save_plan(ModelPlan(((HeadPattern.a_shape(4, 8),) * 3,)), path)  # 3 heads; the graph has 2
    msg = str(_first_forward_error(backend="minference", options={"config": str(path), "inductor": False,
                                                                  "min_seq_len": 0}))
    assert msg.startswith(f"config={str(path)!r}: layer 0: the plan gives 3 heads") and "2 query heads" in msg
    msg = str(_first_forward_error(backend=mif_compile.backend(ModelPlan(((HeadPattern.a_shape(4, 8),) * 3,)),
                                                                 inductor=False)))
    assert msg.startswith("config=<ModelPlan, 1 layers>: layer 0: the plan gives 3 heads"), msg


def test_backend_factory_validates_at_once(tmp_path):
    """mif_compile.backend(...) raises a plain ConfigError before anything is traced."""
    for kwargs, start in [({"config": "nope.json"}, "config='nope.json': cannot read plan file"),
                          ({"mode": "turbo"}, "mode='turbo'"), ({"prefill_cudagraphs": 1}, "prefill_cudagraphs=1"),
                          ({"last_q": 0}, "last_q=0: must be a positive integer")]:
        with pytest.raises(ConfigError) as e:
            mif_compile.backend(**kwargs)
        assert str(e.value).startswith(start) and not isinstance(e.value, torch._dynamo.exc.BackendCompilerFailed)
    plan = ModelPlan(((HeadPattern.dense(),) * 4,) * 3)
    with pytest.raises(ConfigError) as e:
        mif_compile.backend(plan, model=_hf_config(2, 4))
    assert str(e.value).startswith("config=<ModelPlan, 3 layers>: the plan has 3 layers, but the model has 2")
    assert mif_compile.backend(plan, model=_hf_config(3, 4), mode="reduce-overhead").config.plan == plan


def test_options_must_be_a_dict():
    with pytest.raises(ConfigError, match="options='plan.json': expected a dict"):
        BackendConfig.from_options("plan.json")


# -- clamp_budget ---------------------------------------------------------------------------------


def test_clamp_budget_values():
    vs, ash, bs = Pattern.VERTICAL_SLASH, Pattern.A_SHAPE, Pattern.BLOCK_SPARSE
    assert clamp_budget(vs, (1000, 6096), 100_000) == (1000, 6096)
    assert clamp_budget(vs, (1, 1), 100_000) == (30, 50)  # MInference's floors
    assert clamp_budget(vs, (1000, 6096), 500) == (500, 500)
    assert clamp_budget(vs, (1, 1), 20) == (20, 20)
    assert clamp_budget(ash, (128, 3968), 1000) == (128, 1000)
    assert clamp_budget(ash, (4, 64), 1000) == (4, 64)
    assert clamp_budget(bs, (100,), 1000) == (16,)  # ceil(1000 / 64)
    assert clamp_budget(bs, (3,), 1000) == (3,)
    assert clamp_budget(bs, (100,), 1) == (1,)
    assert clamp_budget(Pattern.DENSE, (), 1000) == ()


@FEW
@given(head_patterns, st.integers(1, 1 << 20))
def test_clamp_budget_properties(hp, n):
    out = clamp_budget(hp.pattern, hp.budget, n)
    assert len(out) == len(hp.budget)
    assert all(isinstance(x, int) and 1 <= x for x in out)
    if hp.pattern is Pattern.BLOCK_SPARSE:
        assert out[0] <= math.ceil(n / 64) and out[0] <= hp.budget[0]
    else:
        assert all(x <= n for x in out)
    if hp.pattern is Pattern.A_SHAPE:
        assert out == tuple(min(n, b) for b in hp.budget)
    # monotone in the length
    bigger = clamp_budget(hp.pattern, hp.budget, n + 64)
    assert all(a <= b for a, b in zip(out, bigger))
