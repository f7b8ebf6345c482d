"""Metadata readers: every source, prefix-agnostic matching, reports."""

import json

import pytest

from mlx_lm_optiq.errors import OptiqError
from mlx_lm_optiq.metadata import (
    LIVE_MODEL,
    canonical,
    module_facts,
    read_sources,
)
from mlx_lm_optiq.plugins import metadata_readers

READERS = metadata_readers()

TARGETS = [
    ("model.layers.1.self_attn.q_proj", 4),
    ("model.layers.1.self_attn.v_proj", 8),
    ("model.layers.1.mlp.down_proj", 4),
]
ALL = [p for p, _ in TARGETS] + [
    "model.layers.0.self_attn.q_proj",
    "model.embed_tokens",
]


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.1.mlp.down_proj",
        "layers.1.mlp.down_proj",
        "language_model.model.layers.1.mlp.down_proj",
        "model.language_model.layers.1.mlp.down_proj",
        "backbone.layers.1.mlp.down_proj",
        "model.layers.1.mlp.down_proj.weight",
    ],
)
def test_canonical_ignores_wrapper_prefixes(key):
    assert canonical(key) == "layers.1.mlp.down_proj"


def test_live_model_bits_when_no_file(tmp_path):
    facts = module_facts(TARGETS, ALL, read_sources(tmp_path, READERS))
    assert {p: (f.bits, f.bits_source) for p, f in facts.items()} == {
        p: (b, LIVE_MODEL) for p, b in TARGETS
    }


def test_unquantized_modules_of_a_quantized_model_count_as_16_bits(tmp_path):
    targets = [(p, None if "down" in p else b) for p, b in TARGETS]
    facts = module_facts(targets, ALL, [])
    assert facts["model.layers.1.mlp.down_proj"].bits == 16
    assert (
        module_facts([(p, None) for p, _ in TARGETS], ALL, [])[
            "model.layers.1.mlp.down_proj"
        ].bits
        is None
    )


@pytest.mark.parametrize("layout", ["top", "optimization", "legacy"])
def test_optiq_metadata_wins_over_config(tmp_path, layout):
    per_layer = {
        "language_model.model.layers.1.self_attn.q_proj": {"bits": 8, "group_size": 64},
        "language_model.model.layers.1.self_attn.v_proj": {
            "bits": 8,
            "group_size": 64,
            "kl": 0.5,
        },
        "language_model.model.layers.1.mlp.down_proj": {"bits": 16, "group_size": 64},
    }
    doc = (
        {"per_layer": per_layer}
        if layout != "optimization"
        else {"optimization": {"per_layer": per_layer}}
    )
    name = "optiq_metadata.json" if layout == "legacy" else "optiq/metadata.json"
    write(tmp_path / name, doc)
    write(
        tmp_path / "config.json",
        {
            "quantization": {
                "bits": 4,
                "group_size": 64,
                "model.layers.1.self_attn.q_proj": {"bits": 4, "group_size": 64},
            }
        },
    )
    said = []
    facts = module_facts(
        TARGETS, ALL, read_sources(tmp_path, READERS), report=said.append
    )
    q = facts["model.layers.1.self_attn.q_proj"]
    assert (q.bits, q.bits_source) == (8, name)
    assert facts["model.layers.1.mlp.down_proj"].bits == 16
    v = facts["model.layers.1.self_attn.v_proj"]
    assert (v.kl, v.kl_source) == (0.5, name)
    # the live model says 4 bits for q_proj: the disagreement is reported
    assert any("q_proj" in s and "says 8 bits" in s for s in said)


def test_config_json_per_module_entries(tmp_path):
    write(
        tmp_path / "config.json",
        {
            "quantization": {
                "bits": 4,
                "group_size": 64,
                "model.layers.1.self_attn.v_proj": {"bits": 8, "group_size": 64},
                "model.layers.1.mlp.down_proj": False,
            }
        },
    )
    facts = module_facts(
        [(p, None) for p, _ in TARGETS], ALL, read_sources(tmp_path, READERS)
    )
    assert facts["model.layers.1.self_attn.v_proj"].bits == 8
    assert facts["model.layers.1.self_attn.v_proj"].bits_source == "config.json"
    assert facts["model.layers.1.mlp.down_proj"].bits == 16
    # no entry: the default applies to what the live model quantized -> here nothing
    assert facts["model.layers.1.self_attn.q_proj"].bits == 16


def test_sensitivity_json_uses_lowest_candidate_bits(tmp_path):
    write(
        tmp_path / "optiq/sensitivity.json",
        {
            "metric": "kl_divergence_vs_reference",
            "candidate_bits": [4, 8],
            "layers": [
                {
                    "layer_name": "model.layers.1.self_attn.q_proj",
                    "sensitivities": {"4": 0.3, "8": 0.01},
                    "param_count": 10,
                },
                {
                    "layer_name": "model.layers.9.self_attn.q_proj",
                    "sensitivities": {"4": 0.3, "8": 0.01},
                    "param_count": 10,
                },
            ],
        },
    )
    said = []
    facts = module_facts(
        TARGETS, ALL, read_sources(tmp_path, READERS), report=said.append
    )
    assert facts["model.layers.1.self_attn.q_proj"].kl == 0.3
    assert facts["model.layers.1.self_attn.v_proj"].kl is None
    assert any("1 entries match no module" in s and "layers.9" in s for s in said)
    assert any("no entry for 2 adapted modules" in s for s in said)


def test_keys_for_modules_that_exist_but_are_not_adapted_are_not_warned(tmp_path):
    write(
        tmp_path / "optiq/metadata.json",
        {
            "per_layer": {
                "model.layers.0.self_attn.q_proj": {"bits": 8},
                **{p: {"bits": b} for p, b in TARGETS},
            }
        },
    )
    said = []
    module_facts(TARGETS, ALL, read_sources(tmp_path, READERS), report=said.append)
    assert not [s for s in said if "warning" in s]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("optiq/metadata.json", '{"per_layer": {"a": {"bits": 4}', "not valid JSON"),
        (
            "optiq/metadata.json",
            {"per_layer": {"a": {"group_size": 64}}},
            "has no 'bits'",
        ),
        (
            "optiq/metadata.json",
            {"per_layer": {"a": {"bits": 7}}},
            "bits must be one of",
        ),
        ("optiq/metadata.json", {"layers": []}, "no 'per_layer'"),
        (
            "optiq_metadata.json",
            {"per_layer": {"a": {"bits": 4, "kl": -1}}},
            "KL must be a finite number",
        ),
        (
            "optiq/sensitivity.json",
            {"layers": [{"layer_name": "a", "sensitivities": {"4": float("nan")}}]},
            "KL must be a finite number",
        ),
        (
            "optiq/sensitivity.json",
            {
                "candidate_bits": [3, 4],
                "layers": [{"layer_name": "a", "sensitivities": {"4": 1.0}}],
            },
            "no KL at 3 bits",
        ),
        ("config.json", "{", "not valid JSON"),
    ],
)
def test_bad_metadata_names_file_and_problem(tmp_path, name, content, problem):
    write(tmp_path / name, content)
    with pytest.raises(OptiqError, match=problem) as e:
        read_sources(tmp_path, READERS)
    assert name in str(e.value)
