"""Config parsing, the per-layer pattern of the real models, presets and sizes."""

import json

import jax
import numpy as np
import pytest
import transformers

import llama4_jax as L
from llama4_jax.config import ConfigError, RopeScaling, from_hf, rope_inv_freq, to_hf

SCOUT_HF = {  # the published Scout config.json (text part), with the corrected RoPE scaling
    "architectures": ["Llama4ForConditionalGeneration"],
    "model_type": "llama4",
    "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
    "text_config": {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192,
        "attention_dropout": 0.0, "attn_scale": 0.1, "attn_temperature_tuning": 4,
        "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192,
        "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
        "moe_layers": list(range(48)), "no_rope_layers": [], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
        "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
    },
    "vision_config": {
        "model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34,
        "num_attention_heads": 16, "intermediate_size": 5632, "vision_output_dim": 4096, "image_size": 336,
        "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
        "rope_theta": 10000, "norm_eps": 1e-05, "hidden_act": "gelu", "num_channels": 3,
        "attention_dropout": 0.0, "initializer_range": 0.02, "multi_modal_projector_bias": False,
        "projector_dropout": 0.0, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    },
}


def test_scout_config_json_with_integer_temperature_tuning():
    # `for_llm_compressor: False` is an unknown key with a default value: accepted.
    c = from_hf(SCOUT_HF)
    assert c.text.attn_temperature_tuning is True  # the integer 4 means "on"
    assert c.text.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    assert c.text == L.preset("scout").text
    assert c.vision == L.preset("scout").vision


def test_real_layer_patterns_pinned():
    scout, mav = L.preset("scout").text, L.preset("maverick").text
    for t in (scout, mav):
        f = t.layer_flags
        assert [i for i in range(48) if not f[i].uses_rope] == list(range(3, 48, 4))  # NoPE: 3, 7, ..., 47
        assert all(x.is_chunked == x.uses_rope for x in f)  # chunked mask on the RoPE layers only
        assert t.scan_period == 4 and t.num_groups == 12
    assert all(x.is_moe for x in scout.layer_flags)
    assert [i for i, x in enumerate(mav.layer_flags) if x.is_moe] == list(range(1, 48, 2))
    assert mav.use_qk_norm is False and mav.rope_scaling is None


def test_legacy_rope_scaling_and_rope_parameters():
    base = {"model_type": "llama4_text", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
    old = from_hf({**base, "rope_theta": 1e4, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new = from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert old == new and old.text.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and old.text.rope_theta == 1e4
    plain = from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.text.rope_scaling is None
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


def test_explicit_layer_lists():
    base = {"model_type": "llama4_text", "num_hidden_layers": 6, "hidden_size": 32, "num_attention_heads": 2,
            "moe_layers": [0, 5], "no_rope_layers": [1, 0, 1, 1, 0, 1],
            "layer_types": ["chunked_attention", "full_attention", "full_attention", "chunked_attention",
                            "full_attention", "chunked_attention"]}
    t = from_hf(base).text
    assert [f.is_moe for f in t.layer_flags] == [True, False, False, False, False, True]
    assert [f.uses_rope for f in t.layer_flags] == [True, False, True, True, False, True]
    assert [f.is_chunked for f in t.layer_flags] == [True, False, False, True, False, True]
    assert t.scan_period == 6 and t.num_groups == 1  # aperiodic: one unrolled group
    assert from_hf(to_hf(L.Llama4Config(text=t))).text == t


def test_unknown_and_unsupported_fields_refused():
    base = {"model_type": "llama4_text", "num_hidden_layers": 4}
    with pytest.raises(ConfigError, match=r"sliding_window=4096"):
        from_hf({**base, "sliding_window": 4096})
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="attention_bias"):
        from_hf({**base, "attention_bias": True})
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="moe_layers"):
        from_hf({**base, "moe_layers": [7]})


@pytest.mark.parametrize("name", ["scout", "maverick", "tiny", "tiny-vision"])
def test_to_hf_round_trip_loads_in_transformers(name, tmp_path):
    c = L.preset(name)
    d = to_hf(c)
    assert from_hf(json.loads(json.dumps(d))) == c
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    text = hf.text_config if c.vision is not None else hf
    assert text.num_hidden_layers == c.text.num_hidden_layers
    assert list(text.moe_layers) == list(c.text.moe_layers)
    assert list(text.no_rope_layers) == list(c.text.no_rope_layers)
    assert from_hf(hf.to_dict()) == c  # and what transformers writes back reads the same


def test_configs_are_hashable_and_frozen():
    c = L.preset("scout")
    assert hash(c) == hash(from_hf(to_hf(c)))
    with pytest.raises(Exception):
        c.text.hidden_size = 1


@pytest.mark.parametrize("scaling", [None, RopeScaling(16.0, 1.0, 1.0, 8192), RopeScaling(8.0, 1.0, 4.0, 8192)])
def test_rope_table_bitwise_equal_to_transformers(scaling):
    t = L.preset("scout").text.__class__(rope_scaling=scaling)
    d = to_hf(L.Llama4Config(text=t))
    hf_cfg = transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k not in ("model_type",)})
    from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

    ref = Llama4TextRotaryEmbedding(hf_cfg).inv_freq.numpy()
    ours = rope_inv_freq(t)
    np.testing.assert_array_equal(ours, ref)
    if scaling == RopeScaling(16.0, 1.0, 1.0, 8192):  # Scout: 0..34 kept, 35..63 divided by 16
        base = rope_inv_freq(t.__class__(rope_scaling=None))
        np.testing.assert_array_equal(ours[:35], base[:35])
        np.testing.assert_allclose(ours[35:], base[35:] / 16, rtol=1e-7)


def _counts(config):
    tree = L.abstract_params(config, vision=False)  # text decoder only
    total = active = 0
    t = config.text
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", None) for k in path]
        n = int(np.prod(x.shape))
        total += n
        routed = "moe" in keys and "shared" not in keys and keys[-1] in ("gate", "up", "down")
        active += n * t.num_experts_per_tok // t.num_local_experts if routed else n
    return total, active


def test_text_parameter_counts_of_real_configs():
    """Text decoder only (the vision tower, 0.87B, is counted with the vision model).

    LLAMA4_SPEC.md: Scout 108.64B total / 17.17B active text; Maverick 401.58B / 17.18B.
    The text-only totals are those minus the 0.87B vision tower + projector.
    """
    scout, mav = _counts(L.preset("scout")), _counts(L.preset("maverick"))
    assert round(scout[0] / 1e9, 2) == 107.77 and round(scout[1] / 1e9, 2) == 17.17
    assert round(mav[0] / 1e9, 2) == 400.71 and round(mav[1] / 1e9, 2) == 17.18
