"""Sampling methods: filters, distribution, per-request seeds, parameter checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.sampling import (PENALTY_KEYS, Greedy, MinP, Sampling, Temperature, TopK, TopP, _cutoff, argmax,
                                 derive_seed, penalize, resolve, sample, sample_seed, seen_tokens, top_logprobs,
                                 with_seed)

_sample = jax.jit(sample)


def _rows(samplings, V):
    """Per-row parameter arrays for `sample` from a list of Sampling."""
    return (
        jnp.asarray([s.temperature for s in samplings], jnp.float32),
        jnp.asarray([s.top_k for s in samplings], jnp.int32),
        jnp.asarray([s.top_p for s in samplings], jnp.float32),
        jnp.asarray([s.min_p for s in samplings], jnp.float32),
        jnp.asarray([with_seed(s, 0, i).seed for i, s in enumerate(samplings)], jnp.uint32),
    )


def _kept_reference(logits, s: Sampling):
    """Token ids surviving temperature -> top-k -> top-p -> min-p, in float64 numpy."""
    x = logits.astype(np.float64) / s.temperature
    order = np.argsort(-x, kind="stable")
    srt = x[order]
    n = len(x) if s.top_k == 0 else s.top_k
    p = np.exp(srt[:n] - srt[0])
    p /= p.sum()
    before = np.cumsum(p) - p
    n = min(n, int(np.sum(before < s.top_p)))
    n = min(n, int(np.sum(p[:n] >= s.min_p * p[0])))
    return set(order[:max(n, 1)].tolist())


def test_filters_match_reference():
    rng = np.random.default_rng(0)
    V = 37
    cases = [Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.6), Sampling(1.0, min_p=0.2),
             Sampling(0.9, top_k=9, top_p=0.8, min_p=0.05), Sampling(2.0, top_p=0.05), Sampling(1.0)]
    for s in cases:
        logits = rng.normal(size=V).astype(np.float32) * 3
        t, k, p, m, _ = _rows([s], V)
        cut = float(_cutoff(jnp.asarray(logits)[None] / t[:, None], k, p, m)[0])
        kept = set(np.nonzero(logits / s.temperature >= cut)[0].tolist())
        assert kept == _kept_reference(logits, s), s


def test_empirical_distribution():
    # 4000 rows with the same logits and different seeds: the frequencies of a top-k
    # sample match the renormalised softmax. The binomial std is <= 0.008; 0.03 is ~4 std
    # (deterministic anyway: the seeds are fixed).
    V, n = 11, 4000
    logits = jnp.asarray(np.linspace(2.0, -2.0, V), jnp.float32)
    rows = [Sampling(0.8, top_k=4, seed=i) for i in range(n)]
    toks, _ = _sample(jnp.broadcast_to(logits, (n, V)), *_rows(rows, V), 0)
    freq = np.bincount(np.asarray(toks), minlength=V) / n
    ref = np.exp(np.asarray(logits[:4]) / 0.8)
    ref /= ref.sum()
    np.testing.assert_allclose(freq[:4], ref, atol=0.03)
    assert freq[4:].sum() == 0


def test_greedy_and_logprobs():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
    toks, lps = _sample(logits, *_rows([Greedy().resolve()] * 3, 50), 0)
    np.testing.assert_array_equal(toks, np.argmax(logits, -1))
    # logprobs are of the raw distribution, in jax.nn.log_softmax's fp32 arithmetic:
    # the same numbers, though only the chosen tokens' are computed.
    ref = jax.jit(jax.nn.log_softmax)(logits)[np.arange(3), np.asarray(toks)]
    np.testing.assert_array_equal(lps, ref)


def test_argmax_is_jnp_argmax():
    """The first index of the row max, ties and NaN as jnp.argmax (first tie, first NaN)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 300)).astype(np.float32)
    x[1, [7, 40, 299]] = 9.0  # ties: the first wins
    x[2, [3, 200]] = np.nan  # the first NaN wins
    x[3] = -np.inf  # nothing finite: index 0
    x[4, 299] = np.inf
    x[5] = 0.0
    got = jax.jit(argmax)(jnp.asarray(x))
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
    np.testing.assert_array_equal(got, [np.argmax(x[0]), 7, 3, 0, 299, 0])
    assert got.dtype == jnp.int32


def test_top_logprobs_are_the_raw_distribution():
    """The k alternatives are log_softmax(logits) + top-k in fp32, whatever the row's
    sampling: the chosen token's logprob (from `sample`, here with temperature and
    top-p) equals its alternative's when it is among them."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(5, 40)) * 2, jnp.float32)
    ids, lps = jax.jit(top_logprobs, static_argnums=1)(logits, 6)
    ref = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1, kind="stable")[:, :6])
    np.testing.assert_allclose(lps, np.take_along_axis(ref, np.asarray(ids), -1), atol=1e-6)
    toks, chosen = _sample(logits, *_rows([Sampling(1.7, top_p=0.8, seed=s) for s in range(5)], 40), 3)
    for b in range(5):
        row = np.asarray(ids[b]).tolist()
        if int(toks[b]) in row:
            assert float(chosen[b]) == pytest.approx(float(lps[b, row.index(int(toks[b]))]), abs=1e-6)


def test_sample_seeds():
    """Sample 0 of a request draws with its seed; samples j >= 1 with distinct, fixed
    seeds derived from it (stable across processes: a hash, not hash())."""
    assert sample_seed(123, 0) == 123
    seeds = [sample_seed(123, j) for j in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= x < 2**32 for x in seeds)
    assert sample_seed(123, 1) == derive_seed(123, {"sample": 1}) != derive_seed(123, 1)
    assert sample_seed(124, 1) != sample_seed(123, 1)


def test_seed_independent_of_batch_size_and_position():
    rng = np.random.default_rng(2)
    V = 64
    target = rng.normal(size=V).astype(np.float32)
    s = Sampling(1.0, top_p=0.9, seed=1234)
    for step in (0, 5):
        alone, _ = _sample(jnp.asarray(target)[None], *_rows([s], V), step)
        for B, pos in ((4, 0), (4, 3), (7, 2)):
            others = rng.normal(size=(B, V)).astype(np.float32)
            others[pos] = target
            rows = [Sampling(0.5, top_k=3, seed=int(i)) for i in rng.integers(0, 1000, B)]
            rows[pos] = s
            toks, _ = _sample(jnp.asarray(others), *_rows(rows, V), step)
            assert int(toks[pos]) == int(alone[0]), (step, B, pos)
    # ... and the step matters: different token indices draw different noise.
    draws = {int(_sample(jnp.zeros((1, V)), *_rows([Temperature(1.0, seed=3).resolve()], V), t)[0][0])
             for t in range(10)}
    assert len(draws) > 1


def test_method_classes_resolve():
    assert resolve(None) == Sampling(temperature=0.0)
    assert TopK(5, temperature=0.5, seed=2).resolve() == Sampling(0.5, top_k=5, seed=2)
    assert TopP(0.9).resolve() == Sampling(1.0, top_p=0.9)
    assert MinP(0.1, temperature=0.7).resolve() == Sampling(0.7, min_p=0.1)
    assert Temperature(0.3, seed=9).resolve() == Sampling(0.3, seed=9)


@pytest.mark.parametrize("kw,msg", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, got -0.5"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"min_p": 2}, "min_p must be in [0, 1], got 2"),
    ({"seed": -1}, "seed must be None or an integer in [0, 4294967296), got -1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0, got 0.0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in [-2, 2]"),
    ({"frequency_penalty": True}, "frequency_penalty must be in [-2, 2], got True"),
])
def test_invalid_parameters(kw, msg):
    with pytest.raises(ValueError) as e:
        Sampling(**kw)
    assert msg in str(e.value)


def test_derived_seeds():
    """A request without a seed gets one from (run seed, index or id): distinct per
    request, the same on every call, and an explicit seed is kept."""
    s = TopP(0.9).resolve()
    assert s.seed is None
    seeds = [with_seed(s, 7, i).seed for i in range(100)] + [with_seed(s, 7, "id-a").seed]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**32 for x in seeds)
    assert with_seed(s, 7, 3).seed == derive_seed(7, 3) == with_seed(s, 7, 3).seed
    assert derive_seed(8, 3) != derive_seed(7, 3) and derive_seed(7, "3") != derive_seed(7, 3)
    assert derive_seed(0, 0) == 3025942955  # stable across processes and versions: a fixed hash, not hash()
    assert with_seed(TopP(0.9, seed=5).resolve(), 7, 3).seed == 5


def test_invalid_method():
    with pytest.raises(ValueError, match="TopK.k must be an integer >= 1"):
        TopK(0).resolve()
    with pytest.raises(TypeError, match="sampling must be one of"):
        resolve("greedy")


def test_penalties_match_reference():
    """`penalize` on `seen_tokens` counts, against a float64 numpy reference: the
    repetition penalty (transformers' `RepetitionPenaltyLogitsProcessor`: divide a
    positive logit, multiply a negative one) on tokens of the prompt or completion;
    the frequency and presence penalties (vLLM's) on completion tokens only. Padding
    tokens of the prompt count for nothing; rows with penalties off are unchanged, and
    log-probabilities stay the raw logits'."""
    rng = np.random.default_rng(5)
    V = 12
    prompts = np.asarray([[3, 3, 7, 0], [1, 2, 2, 5], [4, 4, 4, 4]])
    valid = np.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)  # row 0's last is padding
    made = [[3, 9, 9], [2], [6]]  # completion tokens so far
    rows = [Sampling(repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.3),
            Sampling(repetition_penalty=0.8, presence_penalty=-1.0),
            Sampling()]
    seen = seen_tokens(jnp.asarray(prompts), jnp.asarray(valid), V)
    for b, toks in enumerate(made):
        for t in toks:
            seen = seen.at[b, t].add(2)  # what a decode step adds for its token
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    samp = {k: jnp.asarray([getattr(r, k) for r in rows], jnp.float32) for k in PENALTY_KEYS}
    got = np.asarray(penalize(jnp.asarray(logits), seen, samp))
    for b, r in enumerate(rows):
        x = logits[b].astype(np.float64)
        for t in set(prompts[b][valid[b]].tolist()) | set(made[b]):
            x[t] = x[t] / r.repetition_penalty if x[t] > 0 else x[t] * r.repetition_penalty
        counts = np.bincount(made[b], minlength=V)
        x = x - r.frequency_penalty * counts - r.presence_penalty * (counts > 0)
        np.testing.assert_allclose(got[b], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[2], logits[2])
    assert got[0, 0] == logits[0, 0]  # the padding id 0 is not in row 0's prompt
    assert not Sampling().penalized and Sampling(presence_penalty=0.1).penalized
    # The penalized logits pick the token; the log-probability is the raw logits'.
    args = _rows([Greedy().resolve()] * 3, V)
    tok, lp = _sample(jnp.asarray(got), *args, 0, raw=jnp.asarray(logits))
    np.testing.assert_array_equal(tok, np.argmax(got, -1))
    ref = jax.nn.log_softmax(jnp.asarray(logits), -1)[jnp.arange(3), tok]
    np.testing.assert_allclose(lp, ref, atol=1e-6)
