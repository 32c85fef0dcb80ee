"""Logit parity with transformers' Llama4ForCausalLM, fp32, matmul precision highest.

Tolerance: max |ours - HF| <= 1e-4 on logits of magnitude ~1-5 (observed ~1e-5: fp32
summation order differs between XLA and PyTorch; a real bug, e.g. temperature tuning
off or the chunk mask on the wrong layers, moves logits by 1e-3 to 1).
"""

import numpy as np
import pytest

import llama4_jax as L
from tests import hf_models

ATOL = 1e-4


def _check(ours, ref, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = np.abs(ours - ref).max()
    rel = err / np.abs(ref).max()
    assert err <= ATOL, f"{what}: max abs diff {err:.3g} (relative {rel:.3g}) > {ATOL}"
    return err, rel


@pytest.fixture(scope="module")
def scout(scout_like):
    config, params = L.load(scout_like.path, dtype="float32")
    return scout_like, config, params


@pytest.fixture(scope="module")
def maverick(maverick_like):
    config, params = L.load(maverick_like.path, dtype="float32")
    return maverick_like, config, params


def test_loaded_config_matches(scout, maverick):
    for ck, config, _ in (scout, maverick):
        assert config == ck.config


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_scout_like_logits(scout, moe_impl):
    # 61 tokens: chunk 8 -> 8 chunk boundaries; floor_scale 6 -> the NoPE temperature
    # takes 4 distinct values (positions 5, 11, 17, ... step it).
    ck, config, params = scout
    ids = np.random.RandomState(0).randint(0, config.text.vocab_size, (2, 61))
    ref = hf_models.hf_logits(ck.hf_model, ids)
    _check(L.forward(config, params, ids, moe_impl=moe_impl), ref, moe_impl)


def test_scout_like_hidden_states_per_layer(scout):
    ck, config, params = scout
    ids = np.random.RandomState(1).randint(0, config.text.vocab_size, (1, 40))
    _, hf_hidden = hf_models.hf_logits(ck.hf_model, ids, output_hidden_states=True)
    _, hidden = L.forward(config, params, ids, return_hidden_states=True)
    n = config.text.num_hidden_layers
    # HF's tuple is [embeddings, layer 0, ..., layer L-2, final-normed output]: its last
    # entry is after the final norm, so layers 0..L-2 compare directly.
    for i in range(n - 1):
        _check(hidden[i], hf_hidden[i + 1], f"hidden state after layer {i}")


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_maverick_like_logits_top2(maverick, moe_impl):
    ck, config, params = maverick
    ids = np.random.RandomState(2).randint(0, config.text.vocab_size, (2, 70))
    ref = hf_models.hf_logits(ck.hf_model, ids)
    _check(L.forward(config, params, ids, moe_impl=moe_impl), ref, moe_impl)


def test_dense_and_ragged_moe_agree(maverick):
    _, config, params = maverick
    ids = np.random.RandomState(3).randint(0, config.text.vocab_size, (3, 33))
    a = np.asarray(L.forward(config, params, ids, moe_impl="dense"))
    b = np.asarray(L.forward(config, params, ids, moe_impl="ragged"))
    assert np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_rows(scout, side):
    """Each row of a padded batch equals HF on that row alone.

    With left padding the chunk boundaries and the NoPE temperature follow each row's
    real tokens (HF's own batched forward shifts the temperature by the pad count, a
    documented difference), so the reference is HF on the unpadded row.
    """
    ck, config, params = scout
    rng = np.random.RandomState(4)
    lengths = [45, 30, 17]
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    rows = [rng.randint(3, config.text.vocab_size, n) for n in lengths]
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    ours = np.asarray(L.forward(config, params, ids, attention_mask=mask))
    for b, r in enumerate(rows):
        ref = hf_models.hf_logits(ck.hf_model, r[None])[0]
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        _check(ours[b, sl], ref, f"row {b} ({side} padded)")


def test_real_constants_past_8192(tmp_path_factory):
    """Chunk 8192 and floor_scale 8192 with Scout's RoPE scaling, 8256 tokens.

    Tokens 8192.. start a new chunk (they must not see the first 8192 on RoPE layers)
    and positions >= 8191 get temperature 1 + 0.1 ln 2 on the NoPE layer.
    """
    ck = hf_models.build("real_constants", tmp_path_factory)
    config, params = L.load(ck.path, dtype="float32")
    ids = np.random.RandomState(5).randint(0, config.text.vocab_size, (1, 8256))
    ref = hf_models.hf_logits(ck.hf_model, ids)
    ours = np.asarray(L.forward(config, params, ids))
    _check(ours[:, 8000:], ref[:, 8000:], "tokens 8000..8255")
    _check(ours, ref, "all 8256 tokens")
