"""`llama4_jax.probes` against transformers, fp32, matmul precision highest.

The references are read off transformers' own modules with forward hooks: the router's
logits, the shared expert's output and the MoE output of each MoE layer, and the eager
attention weights of each layer. Tolerance 1e-4 absolute, as for the logits in
test_parity.py (observed ~1e-6 on these 40-token inputs: fp32 summation order).
"""

import numpy as np
import pytest

import llama4_jax as L
from llama4_jax import probes

ATOL = 1e-4


@pytest.fixture(scope="module")
def scout(scout_like):
    config, params = L.load(scout_like.path, dtype="float32")
    return scout_like, config, params


def _hf_capture(model, ids, modules):
    """Run `model` on ids with forward hooks on {name: module}: {name: output}."""
    import torch

    def copy(out):  # transformers adds the routed output into the shared expert's, in place
        return tuple(copy(o) for o in out) if isinstance(out, tuple) else out.clone()

    got, hooks = {}, []
    for name, mod in modules.items():
        hooks.append(mod.register_forward_hook(lambda m, args, out, name=name: got.__setitem__(name, copy(out))))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_moe_trace_matches_transformers(scout):
    ck, config, params = scout
    ids = np.random.RandomState(7).randint(0, config.text.vocab_size, (2, 40))
    layers = ck.hf_model.model.layers
    mods = {}
    for i in config.text.moe_layers:
        ff = layers[i].feed_forward
        mods[("router", i)], mods[("shared", i)], mods[("moe", i)] = ff.router, ff.shared_expert, ff
    ref = _hf_capture(ck.hf_model, ids, mods)
    trace = probes.moe_trace(config, params, ids)
    assert trace.layers == tuple(sorted(config.text.moe_layers))
    B, T = ids.shape
    for m, i in enumerate(trace.layers):
        logits = ref[("router", i)][1].numpy().reshape(B, T, -1)
        shared = ref[("shared", i)].numpy().reshape(B, T, -1)
        moe = ref[("moe", i)][0].numpy().reshape(B, T, -1)
        np.testing.assert_allclose(trace.router_logits[m], logits, atol=ATOL, rtol=0)
        np.testing.assert_allclose(trace.shared[m], shared, atol=ATOL, rtol=0)
        np.testing.assert_allclose(trace.routed[m], moe - shared, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(trace.experts[m, ..., 0], logits.argmax(-1))  # top-1 config
        np.testing.assert_allclose(trace.scores[m, ..., 0], 1 / (1 + np.exp(-logits.max(-1))), atol=1e-6)


def test_attention_weights_match_transformers_eager(scout):
    """Chunk 8 and floor_scale 6 over 40 tokens: both masks and the temperature matter."""
    import transformers

    ck, config, params = scout
    hf = transformers.AutoModelForCausalLM.from_pretrained(ck.path, attn_implementation="eager").float().eval()
    ids = np.random.RandomState(8).randint(0, config.text.vocab_size, (2, 40))
    ref = _hf_capture(hf, ids, {i: layer.self_attn for i, layer in enumerate(hf.model.layers)})
    got = probes.attention_weights(config, params, ids)
    assert sorted(got) == list(range(config.text.num_hidden_layers))
    for i, w in got.items():
        np.testing.assert_allclose(w, ref[i][1].numpy(), atol=ATOL, rtol=0, err_msg=f"layer {i}")
    # Chunked layers see only their own chunk; the NoPE layer sees every earlier token.
    chunk = config.text.attention_chunk_size
    assert got[0][0, 0, chunk, chunk - 1] == 0 and got[3][0, 0, chunk, chunk - 1] > 0
    assert np.allclose(got[3].sum(-1), 1, atol=1e-5)


def test_attention_weights_reproduce_the_layer_output(scout):
    """weights @ V @ W_o of one layer equals that layer's attention output, taken from
    the residual stream (hidden[i] - hidden[i-1] - ffn part is not observable, so the
    check is on layer 0 with a zeroed feed-forward: hidden[0] - embed = attention)."""
    import jax

    _, config, params = scout
    p = jax.tree_util.tree_map(np.array, params)
    for name in ("gate", "up", "down", "router"):
        p["params"]["layers"]["layer_0"]["moe"][name][:] = 0
    p["params"]["layers"]["layer_0"]["moe"]["shared"]["down"][:] = 0
    ids = np.random.RandomState(9).randint(0, config.text.vocab_size, (1, 21))
    _, hidden = L.forward(config, p, ids, return_hidden_states=True)
    attn_out = np.asarray(hidden[0]) - p["params"]["embed"][ids]
    w = probes.attention_weights(config, p, ids, layers=(0,))[0]  # [B, H, T, S]
    layer = jax.tree_util.tree_map(lambda x: x[0], p["params"]["layers"]["layer_0"])
    x = np.asarray(p["params"]["embed"][ids])
    x = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.text.rms_norm_eps) * layer["attn_norm"]["scale"]
    v = np.einsum("btd,dke->btke", x, layer["attn"]["v"])
    G = config.text.kv_groups
    o = np.einsum("bhts,bshe->bthe", w, np.repeat(v, G, axis=2))
    np.testing.assert_allclose(np.einsum("bthe,hed->btd", o, layer["attn"]["o"]), attn_out, atol=ATOL, rtol=0)


def test_probes_refuse_bad_input(scout):
    _, config, params = scout
    ids = np.zeros((1, 5), np.int32)
    L = config.text.num_hidden_layers
    with pytest.raises(ValueError, match=rf"layers \[{L}\] are outside 0..{L - 1}"):
        probes.attention_weights(config, params, ids, layers=(L,))
    with pytest.raises(ValueError, match="attention_mask shape"):
        probes.moe_trace(config, params, ids, attention_mask=np.ones((1, 4)))
    dense = config.replace_text(moe_layers=())
    with pytest.raises(ValueError, match="no MoE layers"):
        probes.moe_trace(dense, params, ids)
