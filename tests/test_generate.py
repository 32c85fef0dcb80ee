"""generate(): greedy tokens equal transformers' generate; seeded sampling; API errors."""

import re

import jax
import numpy as np
import pytest

import llama4_jax
from llama4_jax import Greedy, Sampling, TopK, TopP
from llama4_jax.scheduler import Request, run_requests
from tests.hf_models import Checkpoint

MAX_NEW = 20  # with chunk 8 / 16 every completion crosses at least one chunk boundary


def _prompts(vocab: int, lengths, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]  # no pad/bos/eos ids


def _hf_generate(model, prompt, max_new: int, **kw):
    """transformers greedy generate of one prompt: (new tokens up to eos, log-softmax scores [N, V]).

    One prompt at a time: with left padding transformers computes the NoPE temperature
    from the padded cache length, not the row's position (we use the position; see
    `model.attention.temperature_scale`), which the small floor_scale here would show.
    """
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **{"eos_token_id": 2, **kw})
    r = out.sequences[0, len(prompt):].tolist()
    if 2 in r:
        r = r[:r.index(2) + 1]
    return r, torch.log_softmax(torch.cat(out.scores, 0).float(), -1).numpy()


@pytest.fixture(scope="module")
def scout(scout_like: Checkpoint):
    config, params = llama4_jax.load(scout_like.path, dtype="float32")
    return scout_like, config, params


@pytest.mark.parametrize("name,lengths,batch_size", [
    ("scout_like", (7, 13, 3), 2),  # two batches, the second with a filler row
    ("maverick_like", (15, 5), 2),  # dense + MoE layers, top-2, GQA 5:1, chunk 16
])
def test_greedy_matches_transformers(name, lengths, batch_size, request):
    ckpt = request.getfixturevalue(name)
    config, params = llama4_jax.load(ckpt.path, dtype="float32")
    prompts = _prompts(config.text.vocab_size, lengths, seed=len(name))
    ref, ref_logp = zip(*(_hf_generate(ckpt.hf_model, p, MAX_NEW) for p in prompts))
    out = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=batch_size,
                              logprobs=True)
    for b, (o, r) in enumerate(zip(out, ref)):
        assert o.token_ids == r, f"row {b}"
        assert o.finish_reason == ("stop" if r[-1] == 2 else "length")
        assert o.text is None and o.prompt_token_ids == prompts[b]
        # Log-probabilities of the chosen tokens: fp32 log-softmax of logits that agree
        # to ~1e-5; 1e-4 absolute.
        np.testing.assert_allclose(o.logprobs, ref_logp[b][np.arange(len(r)), r], atol=1e-4)
    assert any(len(o.token_ids) > 8 for o in out)  # crossed a chunk boundary while decoding


def test_repetition_penalty_matches_transformers(scout):
    """Greedy with `repetition_penalty` equals transformers' generate with it, token
    for token (the prompt's tokens and the completion's are penalized, in both), and
    changes the completion; the log-probabilities are the raw distribution's, as
    without a penalty (transformers' scores are the penalized ones)."""
    ckpt, config, params = scout
    prompts = _prompts(config.text.vocab_size, (9, 14), seed=31)
    penalized = Sampling(temperature=0.0, repetition_penalty=1.8)
    out = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=2, sampling=penalized,
                              logprobs=True)
    plain = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=2, logprobs=True)
    for b, p in enumerate(prompts):
        ref, _ = _hf_generate(ckpt.hf_model, p, MAX_NEW, repetition_penalty=1.8)
        assert out[b].token_ids == ref, f"row {b}"
        _, raw = _hf_generate(ckpt.hf_model, p + out[b].token_ids[:-1], 1)  # raw logits after the same prefix
        np.testing.assert_allclose(out[b].logprobs[-1], raw[0, out[b].token_ids[-1]], atol=1e-4)
    assert [o.token_ids for o in out] != [o.token_ids for o in plain]


def test_min_new_tokens_and_stop_token_ids_match_transformers(scout):
    """Per-prompt stop tokens end a row at their first occurrence (kept, finish "stop");
    `min_new_tokens` suppresses them before that many tokens, as transformers'
    `min_new_tokens` does its eos ids (greedy tokens equal, the log-probabilities the
    raw distribution's). Rows of one batch each keep their own stops. (`ignore_eos`:
    tests/test_cli_generate.py's `test_stop_controls`, on a model that emits eos.)"""
    ckpt, config, params = scout
    prompts = _prompts(config.text.vocab_size, (9, 14, 6), seed=33)
    plain = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=2)
    # Each row's stop token: the first token of its completion that first occurs at index >= 2.
    at = [next(j for j, t in enumerate(o.token_ids) if j >= 2 and t not in o.token_ids[:j]) for o in plain]
    stops = [[o.token_ids[j]] for o, j in zip(plain, at)]
    out = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=2,
                              stop_token_ids=stops[:2] + [None])
    for b in range(2):
        assert out[b].token_ids == plain[b].token_ids[:at[b] + 1] and out[b].finish_reason == "stop", b
    assert out[2].token_ids == plain[2].token_ids and out[2].finish_reason == "length"
    mins = [at[0] + 3, 0, at[2] + 1]
    late = llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, batch_size=2, stop_token_ids=stops,
                               min_new_tokens=mins, logprobs=True)
    assert late[1].token_ids == out[1].token_ids
    for b in (0, 2):
        ref, _ = _hf_generate(ckpt.hf_model, prompts[b], MAX_NEW, eos_token_id=[2, stops[b][0]],
                              min_new_tokens=mins[b])
        ref = ref[:next((j + 1 for j, t in enumerate(ref) if t == stops[b][0]), len(ref))]
        assert late[b].token_ids == ref and len(ref) > mins[b] - 1 and ref[:at[b]] == plain[b].token_ids[:at[b]], b
        _, raw = _hf_generate(ckpt.hf_model, prompts[b] + ref[:at[b]], 1)  # the suppressed step's raw logits
        np.testing.assert_allclose(late[b].logprobs[at[b]], raw[0, ref[at[b]]], atol=1e-4)
    for kw, match in ((dict(min_new_tokens=MAX_NEW + 1), r"min_new_tokens must be an integer in \[0, max_new_tokens = 20\]"),
                      (dict(min_new_tokens=[1, -1, 0]), r"got -1"),
                      (dict(ignore_eos="yes"), "ignore_eos must be a bool"),
                      (dict(stop_token_ids=[5, 331]), r"stop_token_ids must be token ids in \[0, 331\), got \[331\]"),
                      (dict(stop_token_ids=[[5], [True], None]), r"stop_token_ids\[1\] must be token ids"),
                      (dict(stop_token_ids=[[5]]), "stop_token_ids has 1 entries for 3 prompts"),
                      (dict(stop_token_ids="5"), "stop_token_ids must be a list of token ids")):
        with pytest.raises(ValueError, match=match):
            llama4_jax.generate(config, params, prompts, max_new_tokens=MAX_NEW, **kw)


def test_seeded_sampling_independent_of_batch(scout):
    _, config, params = scout
    a, b, c, d, e = _prompts(config.text.vocab_size, (6, 11, 4, 9, 12), seed=7)
    sa, sd = TopP(0.95, temperature=1.5, seed=11), TopK(20, temperature=1.2, seed=5)
    first = llama4_jax.generate(config, params, [a, b, c, d], sampling=[sa, Greedy(), Sampling(seed=3), sd],
                                max_new_tokens=MAX_NEW, batch_size=2)
    again = llama4_jax.generate(config, params, [a, b, c, d], sampling=[sa, Greedy(), Sampling(seed=3), sd],
                                max_new_tokens=MAX_NEW, batch_size=2)
    # Other prompts, other order, other batch-mates and rows (batches are sorted by length).
    other = llama4_jax.generate(config, params, [e, d, a], sampling=[Sampling(seed=1), sd, sa],
                                max_new_tokens=MAX_NEW, batch_size=2)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert other[2].token_ids == first[0].token_ids
    assert other[1].token_ids == first[3].token_ids
    # Sampling really samples: a different seed changes the completion.
    alt = llama4_jax.generate(config, params, [a, c], sampling=TopP(0.95, temperature=1.5, seed=12),
                              max_new_tokens=MAX_NEW, batch_size=2)
    assert alt[0].token_ids != first[0].token_ids


def test_budgets_stats_and_derived_seeds(scout):
    """max_new_tokens per prompt equals separate calls; return_stats counts what was
    done; requests sharing a seedless method draw differently, reproducibly, from the
    run's seed."""
    _, config, params = scout
    a, b = _prompts(config.text.vocab_size, (6, 11), seed=3)
    greedy = dict(max_new_tokens=[4, MAX_NEW], batch_size=2)
    both, stats = llama4_jax.generate(config, params, [a, b], return_stats=True, **greedy)
    assert both[0].token_ids == llama4_jax.generate(config, params, [a], max_new_tokens=4)[0].token_ids
    assert both[1].token_ids == llama4_jax.generate(config, params, [b], max_new_tokens=MAX_NEW)[0].token_ids
    assert len(both[0].token_ids) <= 4 and len(both[1].token_ids) > 4
    assert (stats.prompts, stats.prompt_tokens) == (2, 17)
    assert stats.generated_tokens == sum(len(o.token_ids) for o in both)
    assert stats.prefill_s > 0 and stats.decode_s > 0 and stats.compile_s >= 0
    hot = TopP(0.95, temperature=2.0)  # no seed: derived from (seed, prompt index)
    run = lambda s: [o.token_ids for o in llama4_jax.generate(  # noqa: E731
        config, params, [a, a], sampling=hot, seed=s, max_new_tokens=MAX_NEW, batch_size=2)]
    first = run(0)
    assert first[0] != first[1]  # the same prompt, two indices: two different draws
    assert run(0) == first and run(1) != first
    fixed = [o.token_ids for o in llama4_jax.generate(config, params, [a, a], sampling=TopP(0.95, 2.0, seed=4),
                                                      seed=0, max_new_tokens=MAX_NEW, batch_size=2)]
    assert fixed[0] == fixed[1]  # an explicit seed is the seed
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        llama4_jax.generate(config, params, [a, b], max_new_tokens=[3])


def test_continuous_batching_equals_one_at_a_time(scout):
    """Rows that finish early free their slot for the next prompt: greedy and
    seeded-sampled tokens, log-probabilities and top-2 alternatives equal those of one
    prompt at a time (a run with one slot), whatever slot a request lands in and
    whenever it enters, also with penalties (each row's counts follow it into its slot). The first three prompts are prefilled together and inserted;
    the refills ride along the decode steps (`engine.ride`, pieces of 8 tokens, the
    chunk): a prompt of one whole piece, ragged ones, and budgets of one token (the row
    is done at its first token)."""
    from llama4_jax import engine

    _, config, params = scout
    assert engine.piece_size(config.text, 512) == 8
    prompts = _prompts(config.text.vocab_size, (6, 23, 3, 11, 17, 8, 9), seed=21)
    budgets = [2, 20, 1, 20, 3, 1, 9]
    penalized = [Sampling(temperature=1.2 * (s % 2), seed=s, repetition_penalty=1.5, presence_penalty=0.5,
                          frequency_penalty=0.7) for s in range(7)]
    for sampling in (None, [TopP(0.95, temperature=1.5, seed=s) for s in range(7)], penalized):
        run = lambda bs: llama4_jax.generate(  # noqa: E731
            config, params, prompts, max_new_tokens=budgets, sampling=sampling, batch_size=bs, logprobs=2,
            return_stats=True)
        out, stats = run(3)
        alone, _ = run(1)
        for b, one in enumerate(alone):
            assert out[b].token_ids == one.token_ids, (sampling, b)
            assert out[b].finish_reason == one.finish_reason
            np.testing.assert_allclose(out[b].logprobs, one.logprobs, atol=1e-5)  # fp32, other batch-mates
            assert [[i for i, _ in t] for t in out[b].top_logprobs] == [[i for i, _ in t] for t in one.top_logprobs]
        assert stats.generated_tokens == sum(len(o.token_ids) for o in out)
        # Seven requests over three slots in fewer steps than the longest three budgets run back to back.
        assert stats.decode_steps < 3 * (20 - 1)
        assert stats.ridden_tokens == 6 + 3 + 8 + 9  # the four refills rode along
        assert f"({stats.ridden_tokens} prefilled along decode steps)" in stats.summary()


def test_mixed_run_compiles_a_bounded_set(scout):
    """40 prompts of 3..60 tokens (prompt buckets 16, 32, 64) and budgets 1..12 over 4
    slots: prefill compiles at most for P = 1 and P = 4 per bucket, insert for M = 1
    and 4, then decode, ride (refills riding along decode) and the empty state once: at
    most 3 * 2 + 4 + 3 executables however many prompts run (a second run of 40 others
    compiles nothing new)."""
    from llama4_jax import engine

    _, config, params = scout
    rng = np.random.default_rng(8)
    lens = rng.integers(3, 61, 80).tolist()
    budgets = rng.integers(1, 13, 80).tolist()
    prompts = _prompts(config.text.vocab_size, lens, seed=9)
    engine.COMPILED.clear()
    _, stats = llama4_jax.generate(config, params, prompts[:40], max_new_tokens=budgets[:40], batch_size=4,
                                   max_model_len=128, return_stats=True)
    first = len(engine.COMPILED)
    assert first <= 3 * 2 + 4 + 3, first
    assert stats.compile_s > 0
    _, stats = llama4_jax.generate(config, params, prompts[40:], max_new_tokens=budgets[40:], batch_size=4,
                                   max_model_len=128, return_stats=True)
    assert len(engine.COMPILED) == first and stats.compile_s == 0


def test_budgets_in_one_bucket_share_executables(scout):
    """New-token buffers round up to powers of two (multiples of 512 past 512), so a
    notebook asking for 40 tokens, then 60, compiles once; 600 tokens add at most 512
    slots of cache."""
    from llama4_jax import engine

    assert [engine.new_token_bucket(n) for n in (1, 16, 17, 40, 60, 64, 65, 512, 513, 600, 1100)] == \
        [16, 16, 32, 64, 64, 64, 128, 512, 1024, 1024, 1536]
    # Prompts round the same way, capped by the context length (but never below the prompt).
    assert [engine.prompt_bucket(n, 4096) for n in (3, 300, 513, 1100, 2048)] == [16, 512, 1024, 1536, 2048]
    assert engine.prompt_bucket(700, 800) == 800 and engine.prompt_bucket(900, 800) == 900
    _, config, params = scout
    (p,) = _prompts(config.text.vocab_size, (7,), seed=12)
    _, stats = llama4_jax.generate(config, params, [p], max_new_tokens=40, return_stats=True)
    _, stats = llama4_jax.generate(config, params, [p], max_new_tokens=60, return_stats=True)
    assert stats.compile_s == 0


def test_prompt_length_pads_to_a_compiled_bucket_when_that_costs_less(monkeypatch):
    """A prefill runs at its prompts' bucket, unless a larger bucket is compiled and
    padding the prompts of its bucket still to run costs less than compiling theirs,
    as measured (`engine.COSTS`)."""
    from llama4_jax import engine, scheduler

    compiled = {128}.__contains__
    pick = lambda n, count: scheduler._prompt_length(n, 4096, 512, compiled, count)  # noqa: E731
    monkeypatch.setattr(engine, "COSTS", engine.Costs())
    assert pick(20, 3) == 32  # nothing measured yet: the bucket
    monkeypatch.setattr(engine, "COSTS", engine.Costs({engine.prefill: [9.0, 10.0, 11.0]}, 1.0, 1000))
    assert engine.COSTS.compile_estimate(engine.prefill) == 10.0 and engine.COSTS.token_seconds() == 1e-3
    assert pick(20, 3) == 128  # 3 prompts x 96 tokens x 1 ms = 0.29 s < 10 s
    assert pick(20, 100) == 128  # 100 x 96 x 1 ms = 9.6 s < 10 s
    assert pick(20, 200) == 32  # 200 x 96 x 1 ms = 19.2 s (64, uncompiled, would cost 6.4 s): compile 32
    assert pick(100, 3) == 128  # its own bucket is compiled
    assert pick(200, 3) == 256  # no compiled bucket above
    assert pick(600, 3) == 1024  # above the largest bucket of the run (512): its own


def _prefill_lengths():
    """(P, T) of the compiled prefills' token ids and masks (not their rows' stop ids,
    [K, 1] for the test model's one eos token)."""
    from llama4_jax import engine

    return sorted({shape for k in engine.COMPILED if k[0] is engine.prefill
                   for shape, dtype, _ in k[2] if len(shape) == 2 and dtype == np.int32 and shape[1] > 1})


def test_short_prompts_reuse_a_compiled_longer_bucket(scout, monkeypatch):
    """With compilation measured as costly, a run's shorter prompts are prefilled in
    the longer bucket already compiled: one prefill executable instead of two, and
    the same tokens and log-probabilities (padding is masked)."""
    from llama4_jax import engine, scheduler

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (40, 10, 12), seed=21)  # buckets 64, 16, 16
    run = lambda: llama4_jax.generate(config, params, prompts, max_new_tokens=5, batch_size=1,  # noqa: E731
                                      logprobs=0, return_stats=True)

    with monkeypatch.context() as m:  # each prompt its own bucket
        m.setattr(scheduler, "_prompt_length", lambda n, max_model_len, *_: engine.prompt_bucket(n, max_model_len))
        engine.COMPILED.clear()
        ref, _ = run()
    assert _prefill_lengths() == [(1, 16), (1, 64)]
    monkeypatch.setattr(engine, "COSTS", engine.Costs({engine.prefill: [100.0]}, 1.0, 1000))
    engine.COMPILED.clear()
    out, stats = run()
    assert _prefill_lengths() == [(1, 64)]
    assert stats.prompt_tokens == 62
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    np.testing.assert_allclose([c.logprobs for c in out], [c.logprobs for c in ref], atol=1e-5)


def test_long_prompts_prefill_one_per_call_on_cpu(scout, monkeypatch):
    """On CPU a fill whose next prompt's bucket is longer than BATCHED_PREFILL_MAX
    prefills its prompts one per call (one device), shorter ones all in one call; the
    tokens and log-probabilities are the same."""
    from llama4_jax import engine, scheduler

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (40, 35, 50), seed=22)  # bucket 64
    run = lambda: llama4_jax.generate(config, params, prompts, max_new_tokens=4, batch_size=4,  # noqa: E731
                                      logprobs=0)
    engine.COMPILED.clear()
    ref = run()
    assert _prefill_lengths() == [(3, 64)]
    monkeypatch.setattr(scheduler, "BATCHED_PREFILL_MAX", 32)
    engine.COMPILED.clear()
    out = run()
    assert _prefill_lengths() == [(1, 64)]
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    np.testing.assert_allclose([c.logprobs for c in out], [c.logprobs for c in ref], atol=1e-5)


@pytest.mark.parametrize("batch_size", [2, 6])  # 2 decode rows <= 5 experts: split; 6: stacked
def test_unrolled_layers_match_the_scan(scout, monkeypatch, batch_size):
    """Large weights on CPU prefill and decode on per-group weights (`unroll_layers`;
    with at most E decode rows, each expert its own array, which decode runs with
    `rowwise`; prefill runs `blocked` on the stacked experts); the tokens and log-probabilities equal
    the scanned layers' (fp32 summation order only)."""
    from llama4_jax.model import views

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (7, 13, 3, 21, 9, 30), seed=14)
    run = lambda: llama4_jax.generate(config, params, prompts, max_new_tokens=6, batch_size=batch_size,
                                      sampling=Sampling(temperature=0.0, seed=0), logprobs=0)
    assert not views.unroll_layers(params)  # the tiny model scans: the reference
    ref = run()
    monkeypatch.setattr(views, "_UNROLL_MIN_BYTES", 0)
    assert views.unroll_layers(params)
    out = run()
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    np.testing.assert_allclose([c.logprobs for c in out], [c.logprobs for c in ref], atol=1e-5)


def test_compiled_executables_are_bounded(monkeypatch):
    """The engine keeps at most MAX_COMPILED executables, dropping the least recently
    used (each maps memory regions; thousands would pass vm.max_map_count). A dropped
    one is compiled again when needed, with the same result."""
    import collections

    import jax
    import jax.numpy as jnp

    from llama4_jax import engine

    monkeypatch.setattr(engine, "MAX_COMPILED", 2)
    monkeypatch.setattr(engine, "COMPILED", collections.OrderedDict())
    double = jax.jit(lambda x: x * 2)
    stats = engine.GenerationStats()
    for n in (1, 2, 1, 3):  # 1 is used again after 2, so 2 is the one dropped by 3
        np.testing.assert_array_equal(engine.call_compiled(stats, double, jnp.ones(n)), np.full(n, 2.0))
    assert [key[2][0][0] for key in engine.COMPILED] == [(1,), (3,)]
    before = stats.compile_s
    np.testing.assert_array_equal(engine.call_compiled(stats, double, jnp.ones(2)), np.full(2, 2.0))
    assert stats.compile_s > before and len(engine.COMPILED) == 2


def test_compiled_executables_are_bounded_by_mapped_regions(monkeypatch):
    """Past `map_budget` mapped memory regions the engine drops the older half of its
    executables and jax's caches, which would otherwise keep every dropped executable
    mapped: 40 compilations of a small function (~12 regions each) stay within the
    budget, where keeping them all would pass it, and every result is right."""
    import collections

    import jax
    import jax.numpy as jnp

    from llama4_jax import engine

    if engine._map_count() is None:
        pytest.skip("no /proc/self/maps on this system")
    monkeypatch.setattr(engine, "COMPILED", collections.OrderedDict())
    jax.clear_caches()
    budget = engine._map_count() + 120
    monkeypatch.setattr(engine, "map_budget", lambda: budget)
    fn = jax.jit(lambda x: jnp.sin(x) * 2 + jnp.cos(x).sum())
    stats = engine.GenerationStats()
    counts = []
    for n in range(1, 41):
        x = jnp.linspace(0, 1, n)
        np.testing.assert_allclose(engine.call_compiled(stats, fn, x), np.sin(x) * 2 + np.cos(x).sum(), rtol=1e-6)
        counts.append(engine._map_count())
    assert max(counts) <= budget + 60, counts  # one compilation's regions over the budget at most
    assert len(engine.COMPILED) < 40
    before = stats.compile_s
    latest = engine.call_compiled(stats, fn, jnp.linspace(0, 1, 40))  # kept, valid after jax.clear_caches
    assert stats.compile_s == before
    np.testing.assert_allclose(latest, np.sin(np.linspace(0, 1, 40)) * 2 + np.cos(np.linspace(0, 1, 40)).sum(),
                               rtol=1e-6)


def test_stats_summary_names_a_part_that_took_no_time():
    """A run whose rows all end at their first token spends no time decoding: the
    summary says so instead of printing a rate of nan."""
    from llama4_jax import engine

    stats = engine.GenerationStats(prompts=1, prompt_tokens=3, generated_tokens=1, prefill_s=0.5)
    line = stats.summary()
    assert "prefill 6.0 tok/s (0.50 s)" in line and "decode no time (0.00 s)" in line and "nan" not in line


def test_finished_slot_is_refilled(scout):
    """batch_size 2, budgets [2, 2, 2, 20], the long request first (the queue runs
    longest prompt first): it decodes beside the short ones as they come and go,
    so the run takes its 19 decode steps, not the 19 + 1 of two static batches."""
    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (4, 5, 6, 14), seed=5)
    seen = []
    requests = [Request(p, Sampling(temperature=0.0, seed=0), n) for p, n in zip(prompts, (2, 2, 2, 20))]
    out, stats = run_requests(config, params, requests, tokenizer=None, stop_token_ids=(), batch_size=2,
                              max_model_len=64, kv_dtype=None, attention_impl="auto", moe_impl=None,
                              on_batch=lambda done: seen.append([i for i, _ in done]))
    assert [len(o.token_ids) for o in out] == [2, 2, 2, 20]
    assert stats.decode_steps == 19  # the long row never waited; static batching: 19 + 1
    assert seen[-1] == [3] and sorted(i for s in seen for i in s) == [0, 1, 2, 3]


def test_n_samples(scout):
    """n samples per prompt: each its own row and seed, so they differ under
    temperature > 0, are reproducible whatever the batch size or batch-mates, and
    sample 0 is the n = 1 completion; the prompt is prefilled once (n <= batch_size);
    greedy gives n equal completions; n = 1 (the default) keeps the flat list."""
    _, config, params = scout
    a, b = _prompts(config.text.vocab_size, (6, 11), seed=31)
    hot = TopP(0.95, temperature=1.5)  # no seed: derived from (seed, prompt index), then per sample
    run = lambda ps, n, bs, smp=hot, **kw: llama4_jax.generate(  # noqa: E731
        config, params, ps, n=n, sampling=smp, seed=0, max_new_tokens=MAX_NEW, batch_size=bs, **kw)
    out, stats = run([a, b], [3, 2], 5, logprobs=True, return_stats=True)
    assert [len(x) for x in out] == [3, 2] and all(c.sample == j for x in out for j, c in enumerate(x))
    assert all(c.prompt_token_ids == p for x, p in zip(out, (a, b)) for c in x)
    ids = [[tuple(c.token_ids) for c in x] for x in out]
    assert len(set(ids[0])) == 3 and len(set(ids[1])) == 2  # sample i differs from sample j
    assert (stats.prompts, stats.prompt_tokens) == (5, len(a) + len(b))  # 5 completions, each prompt prefilled once
    assert stats.generated_tokens == sum(len(c.token_ids) for x in out for c in x)
    # Other batch sizes (n > batch_size: slots refilled with held and re-prefilled samples): the same samples.
    for bs in (2, 1):
        assert [[tuple(c.token_ids) for c in x] for x in run([a, b], [3, 2], bs)] == ids, bs
    # Sample 0 is the n = 1 completion, which keeps the flat list (n=1 given or not).
    flat = run([a, b], 1, 5)
    assert [type(c).__name__ for c in flat] == ["Completion"] * 2
    assert [c.token_ids for c in flat] == [list(x[0]) for x in ids]
    assert [[c.token_ids for c in x] for x in run([a, b], [1, 1], 5)] == [[list(x[0])] for x in ids]  # a list: nested
    # An explicit seed, other batch-mates and prompt order: the same samples of that seed.
    fixed = TopP(0.95, temperature=1.5, seed=9)
    mine = run([a], 3, 3, smp=fixed)[0]
    other = run([b, a], [2, 3], 2, smp=[hot, fixed])[1]
    assert [c.token_ids for c in other] == [c.token_ids for c in mine]
    assert len({tuple(c.token_ids) for c in mine}) == 3
    # Greedy: n equal completions (tokens and log-probabilities).
    (greedy,) = run([a], 3, 3, smp=None, logprobs=True)
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids
    assert greedy[0].logprobs == greedy[1].logprobs == greedy[2].logprobs


def test_top_logprobs_match_forward(scout):
    """logprobs=k: the k most likely tokens per generated token, computed in the decode
    step, equal log_softmax + top-k of `llama4_jax.forward`'s fp32 logits over the
    same sequence (before temperature and filters, also for a sampled row); the
    chosen token's logprob equals its entry among them. Mixed k (5, 2, 0, none) in one
    run share one bucket (8) and are sliced per prompt."""
    import jax

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (6, 11, 4, 9), seed=13)
    smp = [Greedy(), TopP(0.9, temperature=1.3, seed=3), TopK(5, temperature=0.7, seed=1), Greedy()]
    out = llama4_jax.generate(config, params, prompts, sampling=smp, max_new_tokens=MAX_NEW, batch_size=2,
                              logprobs=[5, 2, True, False])
    assert out[3].logprobs is None and out[3].top_logprobs is None
    assert out[2].top_logprobs is None and len(out[2].logprobs) == len(out[2].token_ids)
    checked = 0
    for c, p, k in zip(out[:3], prompts, (5, 2, 0)):
        seq = p + c.token_ids
        logits = llama4_jax.forward(config, params, np.asarray([seq]))[0, len(p) - 1:len(seq) - 1]
        ref = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
        # fp32 logits of the cached decode vs a full forward agree to ~1e-5 (as the
        # greedy test finds against transformers): 1e-4 absolute on log-probabilities.
        np.testing.assert_allclose(c.logprobs, ref[np.arange(len(c.token_ids)), c.token_ids], atol=1e-4)
        if not k:
            continue
        assert len(c.top_logprobs) == len(c.token_ids) and all(len(step) == k for step in c.top_logprobs)
        for t, (step, row, chosen) in enumerate(zip(c.top_logprobs, ref, c.token_ids)):
            ids = [i for i, _ in step]
            lps = np.asarray([lp for _, lp in step])
            assert all(np.diff(lps) <= 0), "most likely first"
            np.testing.assert_allclose(lps, np.sort(row)[::-1][:k], atol=1e-4)
            np.testing.assert_allclose(row[ids], lps, atol=1e-4)  # each id carries its own logprob
            order = np.argsort(-row, kind="stable")[:k]
            gaps = -np.diff(np.sort(row)[::-1][:k + 1])
            assert all(i == j for i, j, g in zip(ids, order, gaps) if g > 1e-3)  # ids agree but for near-ties
            if chosen in ids:  # the same distribution: the chosen logprob is its alternative's
                np.testing.assert_allclose(c.logprobs[t], step[ids.index(chosen)][1], atol=1e-6)
                checked += 1
    assert checked >= len(out[0].token_ids)  # greedy rows: the chosen token is always the first alternative
    assert any(c.token_ids[t] != c.top_logprobs[t][0][0] for c in out[1:2] for t in range(len(c.token_ids)))


def test_stop_strings_with_refilled_slots():
    """Stop strings are checked per row as slots are refilled: each completion (ids,
    text cut before the stop string, reason) equals the prompt's alone (a run with one
    slot)."""
    from transformers import AutoTokenizer

    from llama4_jax.generate import DEFAULT_MODEL

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    config, params = llama4_jax.load(DEFAULT_MODEL, dtype="float32")
    prompts = ["987+654=", "123+456=", "12+34=", "999+999=", "321+345="]  # answered with 2-4 digits
    kw = dict(tokenizer=tok, stop=["4", "9"])
    many, alone = (llama4_jax.generate(config, params, prompts, max_new_tokens=[8, 2, 3, 8, 8], batch_size=bs, **kw)
                   for bs in (2, 1))
    assert {o.finish_reason for o in many} == {"stop", "length"} and any(o.text for o in many)
    for i, one in enumerate(alone):
        assert (many[i].token_ids, many[i].text, many[i].finish_reason) == (one.token_ids, one.text,
                                                                             one.finish_reason), i


def test_chunked_prefill_equals_one_piece(scout):
    """Prompts prefilled in pieces (each reading the cache the earlier ones wrote) give
    the tokens and log-probabilities of one whole prefill: pieces of 8 (the chunk), 5
    (not dividing the bucket or the chunk: equal pieces of 4 or 5 tokens) and
    3 (several pieces per chunk), prompts crossing 3-5 chunk boundaries, left padding."""
    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (29, 41, 6), seed=9)
    run = lambda n: llama4_jax.generate(config, params, prompts, max_new_tokens=12, batch_size=3,  # noqa: E731
                                        logprobs=True, prefill_chunk=n)
    whole = run(10**6)
    for n in (8, 5, 3):
        for o, w in zip(run(n), whole):
            assert o.token_ids == w.token_ids, n
            np.testing.assert_allclose(o.logprobs, w.logprobs, atol=1e-5)  # fp32, another summation order
    with pytest.raises(ValueError, match="prefill_chunk"):
        run(0)


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, scan, cond...)."""
    import jax.extend.core

    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _eqns(sub)


def test_chunked_prefill_computes_only_the_prompt():
    """A prompt bucket that pieces do not divide is prefilled in equal pieces of at most
    the piece size (22 tokens in pieces of at most 7: 4 x 6, two of padding), not
    left-padded to a multiple of the piece (28 tokens: 4 x 7, six of padding; 9,216
    tokens in 8,192-token pieces would be 16,384)."""
    import jax.numpy as jnp

    from llama4_jax import engine
    from llama4_jax.config import preset

    cfg = preset("tiny")
    params = llama4_jax.abstract_params(cfg, dtype="float32")
    B, piece = 2, 7
    samp = dict(temperature=jnp.zeros(B), top_k=jnp.zeros(B, jnp.int32), top_p=jnp.ones(B), min_p=jnp.zeros(B),
                seed=jnp.zeros(B, jnp.uint32), stop_ids=jnp.zeros((B, 1), jnp.int32))

    def scanned_pieces(T):
        ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
        fn = lambda p, i: engine.prefill(p, i, i, samp, jnp.ones(B, jnp.int32),  # noqa: E731
                                         text=cfg.text, max_len=T + 16, max_new=16, attn_impl="xla",
                                         moe_impl="ragged", kv_dtype=None, piece=piece)
        return [v.aval.shape for e in _eqns(jax.make_jaxpr(fn)(params, ids).jaxpr) if e.primitive.name == "scan"
                for v in e.invars if v.aval.ndim == 3 and v.aval.shape[1] == B and v.aval.shape[2] <= piece
                and v.aval.dtype == jnp.int32]  # the pieces' ids, positions and mask, not the cache's

    assert set(scanned_pieces(22)) == {(4, B, 6)}
    assert set(scanned_pieces(28)) == {(4, B, 7)}


def test_incremental_text_equals_full_decode():
    """Each token decoded once (with a window of context) gives the text of the full
    decode at every prefix, also across multi-byte characters; stop strings are found
    at the fewest tokens that contain them."""
    from transformers import AutoTokenizer

    from llama4_jax.generate import DEFAULT_MODEL
    from llama4_jax.scheduler import IncrementalText

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    text = "Grüße, 東京! ok 1+1=2 <|eot|> naïve café ☕ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok)
    for k in range(0, len(ids), 3):  # in segments, as the scheduler feeds it
        inc.extend(ids[k:k + 3])
        full = tok.decode(ids[:k + 3], skip_special_tokens=True)
        assert full.startswith(inc.text) and len(full) - len(inc.text) <= 1, (full, inc.text)
    assert inc.text == tok.decode(ids, skip_special_tokens=True)
    for j in range(len(ids)):  # ends[j]: the text of ids[:j + 1]
        prefix = tok.decode(ids[:j + 1], skip_special_tokens=True)
        assert prefix.startswith(inc.text[:inc.ends[j]])
    n, cut = inc.find_stop(("café", "東京"), 0)
    assert inc.text[:cut] == "Grüße, " and "東京" in tok.decode(ids[:n]) and "東京" not in tok.decode(ids[:n - 1])
    assert inc.find_stop(("xyz",), 0) is None
    # A minimum length: a stop string the first min_tokens - 1 tokens hold whole does not
    # count; the next one that ends later does.
    again = tok(text + " café", add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok)
    inc.extend(again)
    n, cut = inc.find_stop(("café",), 0)  # the first café: n tokens hold it
    assert inc.find_stop(("café",), 0, min_tokens=n) == (n, cut) and cut == inc.text.index("café")
    late_n, late_cut = inc.find_stop(("café",), 0, min_tokens=n + 1)
    assert inc.text[late_cut:] == "café" and late_n == len(again)
    short = IncrementalText(tok)
    short.extend(tok("a b", add_special_tokens=False)["input_ids"])  # fewer than 4 tokens: no stop yet at 5
    assert short.find_stop(("a",), 0) is not None and short.find_stop(("a",), 0, min_tokens=5) is None


def test_api_errors(scout):
    _, config, params = scout
    with pytest.raises(ValueError, match=r"prompt 1 has 40 tokens, longer than the context allows: at most 31"):
        llama4_jax.generate(config, params, [[5, 6], [5] * 40], max_model_len=32)
    with pytest.raises(ValueError, match="prompt 0 is text, which needs a tokenizer"):
        llama4_jax.generate(config, params, ["hello"])
    with pytest.raises(ValueError, match="prompt 0 is chat messages, which need a tokenizer"):
        llama4_jax.generate(config, params, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary \[0, 331\): \[331\]"):
        llama4_jax.generate(config, params, [[5, 331]])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llama4_jax.generate(config, params, [[]])
    with pytest.raises(ValueError, match="sampling has 1 entries for 2 prompts"):
        llama4_jax.generate(config, params, [[5], [6]], sampling=[Greedy()])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        llama4_jax.generate(config, params, [[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        llama4_jax.generate(config, params, [[5]], batch_size=0)
    with pytest.raises(ValueError, match=r"max_model_len must be an integer in \[2, 131072\]"):
        llama4_jax.generate(config, params, [[5]], max_model_len=10**9)
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match=f"^n must be an integer >= 1, got {bad!r}$".replace(".", r"\.")):
            llama4_jax.generate(config, params, [[5]], n=bad)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        llama4_jax.generate(config, params, [[5], [6]], n=[2, 0])
    with pytest.raises(ValueError, match="n has 1 entries for 2 prompts"):
        llama4_jax.generate(config, params, [[5], [6]], n=[2])
    for bad in (-1, 2.0, "3", 332):
        with pytest.raises(ValueError, match=r"^logprobs must be true, false or an integer k in \[0, 331\] \(the top "
                                             r"k alternatives per token\), got " + repr(bad).replace(".", r"\.")):
            llama4_jax.generate(config, params, [[5]], logprobs=bad)
    with pytest.raises(ValueError, match="logprobs has 3 entries for 1 prompts"):
        llama4_jax.generate(config, params, [[5]], logprobs=[1, 2, 3])
    assert llama4_jax.generate(config, params, []) == []
    assert llama4_jax.generate(config, params, [], n=3) == []


def test_generate_on_a_mesh_equals_one_device(maverick_like: Checkpoint):
    """Data- and expert-parallel generation (params loaded onto a data=2 x expert=2 x
    tensor=2 mesh; 6 experts split evenly, so the `ep` MoE is the default) gives the
    single-device tokens, greedy and sampled, across chunk-16 ring-buffer wraps, with
    finished slots refilled (six prompts, four slots, mixed budgets)."""
    from llama4_jax import sharding

    config, params = llama4_jax.load(maverick_like.path, dtype="float32")
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    assert sharding.splits_experts(mesh, None, config.text)
    _, sharded = llama4_jax.load(maverick_like.path, dtype="float32", mesh=mesh)
    assert len(sharded["params"]["layers"]["layer_1"]["moe"]["gate"].sharding.device_set) == 8
    prompts = _prompts(config.text.vocab_size, (9, 4, 12, 6, 7, 5), seed=11)
    budgets = [3, 20, 20, 5, 20, 2]
    for sampling in (None, TopP(p=0.9, temperature=0.8, seed=3)):
        one = llama4_jax.generate(config, params, prompts, max_new_tokens=budgets, batch_size=4, sampling=sampling)
        many = llama4_jax.generate(config, sharded, prompts, max_new_tokens=budgets, batch_size=4,
                                   sampling=sampling, mesh=mesh)
        assert [o.token_ids for o in many] == [o.token_ids for o in one]
    with pytest.raises(ValueError, match="generate splits batches"):
        llama4_jax.generate(config, params, prompts, attention_impl="ring")


# Greedy, and sampled with penalties (the decode state then holds each row's token counts).
SAMPLINGS = (Sampling(temperature=0.0, seed=0),
             Sampling(temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.3, frequency_penalty=0.5))
# Per-row stop tokens and minimum lengths, which the mesh tests' rows carry as well.
STOPS = dict(stop_token_ids=[None, [5, 6, 7], None, [8], [9]], min_new_tokens=[0, 6, 2, 0, 3])
_ONE_DEVICE: dict = {}


def _one_device(config, params, prompts, **kw):
    """One device's completions of `prompts` under each of SAMPLINGS, with the scanned
    layers (`test_unrolled_layers_match_the_scan` equates the unrolled ones to them):
    the reference of the mesh tests below, computed once per (prompts, kw) in this
    process, so the unrolled variants compile only their mesh programs."""
    key = (str(prompts), str(sorted(kw.items())))
    if key not in _ONE_DEVICE:
        _ONE_DEVICE[key] = [llama4_jax.generate(config, params, prompts, sampling=s, **kw) for s in SAMPLINGS]
    return _ONE_DEVICE[key]


@pytest.mark.parametrize("unroll,kv_dtype", [(False, None), (True, None), (True, "int8")])
def test_slot_parallel_decode_equals_one_device(scout, monkeypatch, unroll, kv_dtype):
    """On a mesh that splits only the cache slots, over replicated parameters, each
    device decodes every row over its half of each layer's slots (`shard_map`; a
    prompt is prefilled on one device): the tokens and log-probabilities equal one
    device's (scanned), greedy and sampled, scanned and unrolled, float and int8 cache, with ring
    buffers (chunk 8, 4 slots a device) that wrap, refilled slots, and per-row stop
    tokens and minimum lengths (`STOPS`). The compiled
    decode's collectives are the attention's all-gathers (one per layer) and the
    loop's done test, and its cache arrays hold half the slots."""
    from llama4_jax import engine, sharding
    from llama4_jax.model import views

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (9, 4, 12, 6, 7), seed=22)
    kw = dict(max_new_tokens=[3, 12, 7, 5, 10], batch_size=3, logprobs=0, kv_dtype=kv_dtype, **STOPS)
    ref = _one_device(config, params, prompts, **kw)
    if unroll:
        monkeypatch.setattr(views, "_UNROLL_MIN_BYTES", 0)
    mesh = sharding.make_mesh("seq=2", devices=jax.devices()[:2])
    _, replicated = llama4_jax.load(scout[0].path, dtype="float32", mesh=mesh)
    assert sharding.slot_parallel(mesh, None, replicated) == sharding.SlotShards(("seq",), 2)
    assert sharding.slot_parallel(mesh, None, params) is None  # one device's parameters
    assert sharding.slot_parallel(sharding.make_mesh("data=2,seq=2", devices=jax.devices()[:4]), None,
                                  replicated) is None  # the batch is split too
    assert not sharding.data_parallel(mesh, None, replicated)
    engine.COMPILED.clear()
    for sampling, one in zip(SAMPLINGS, ref):
        two = llama4_jax.generate(config, replicated, prompts, mesh=mesh, sampling=sampling, **kw)
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        # The two programs agree to the last bits of fp32, not bitwise (the shards'
        # partial softmaxes are combined: 2.4e-6 at most with a float cache). An int8
        # cache rounds those values to 8 bits, and one lying on a rounding boundary can
        # round to neighbouring steps in the two: one such step moved a later token's
        # log-probability by 2.8e-4 (AMD EPYC, jax 0.10.2), the others stayed within 1e-5.
        np.testing.assert_allclose(np.concatenate([o.logprobs for o in two]),
                                   np.concatenate([o.logprobs for o in one]), atol=1e-5 if kv_dtype is None else 1e-3)
    decodes = [(key, exe.as_text()) for key, exe in engine.COMPILED.items()
               if key[0] is engine.decode and key[4] is not None]
    assert decodes
    for key, hlo in decodes:
        assert re.findall(r"\b(all-to-all|collective-permute|reduce-scatter)\b", hlo) == []
        assert hlo.count(" all-gather(") >= (config.text.num_hidden_layers if unroll else 1)
        assert ("slot_parallel", sharding.SlotShards(("seq",), 2)) in key[3]
        # The cache's positions [.., B, S] hold S / 2 slots on each device.
        caches = [(shape, sh) for shape, dtype, sh in key[2] if dtype == np.int32 and len(shape) == 3]
        assert caches and all(sh.shard_shape(shape)[-1] * 2 == shape[-1] for shape, sh in caches)


@pytest.mark.parametrize("unroll", [False, True])
def test_data_parallel_decode_equals_one_device(scout, monkeypatch, unroll):
    """On a mesh that splits only the batch, over replicated parameters, each device
    prefills and decodes its own rows as single-device code (`shard_map`): the tokens
    and log-probabilities equal one device's (scanned), greedy and sampled, scanned and unrolled
    (per-group weights, each expert its own array), with the slots rounded up to a
    multiple of the devices (batch_size 3 -> 4) and refilled, each row with its own stop
    tokens and minimum length (`STOPS`). The compiled decode
    moves no data between devices: its only collective is the loop's done test."""
    from llama4_jax import engine, sharding
    from llama4_jax.model import views

    _, config, params = scout
    prompts = _prompts(config.text.vocab_size, (9, 4, 12, 6, 7), seed=22)
    kw = dict(max_new_tokens=[3, 12, 7, 5, 10], batch_size=3, logprobs=0, kv_dtype=None, **STOPS)
    ref = _one_device(config, params, prompts, **kw)  # the slot-parallel test's float reference
    if unroll:
        monkeypatch.setattr(views, "_UNROLL_MIN_BYTES", 0)
    mesh = sharding.make_mesh("data=2", devices=jax.devices()[:2])
    _, replicated = llama4_jax.load(scout[0].path, dtype="float32", mesh=mesh)
    assert sharding.data_parallel(mesh, None, replicated)
    assert not sharding.data_parallel(mesh, None, params)  # one device's parameters
    assert not sharding.data_parallel(sharding.make_mesh("data=2,tensor=2", devices=jax.devices()[:4]), None,
                                      replicated)
    engine.COMPILED.clear()
    for sampling, one in zip(SAMPLINGS, ref):
        two = llama4_jax.generate(config, replicated, prompts, sampling=sampling, mesh=mesh, **kw)
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        np.testing.assert_allclose(np.concatenate([o.logprobs for o in two]),
                                   np.concatenate([o.logprobs for o in one]), atol=1e-5)
    decodes = [exe.as_text() for key, exe in engine.COMPILED.items()
               if key[0] is engine.decode and key[4] is not None]
    assert decodes and all(re.findall(r"\b(all-gather|all-to-all|collective-permute|reduce-scatter)\b", hlo) == []
                           for hlo in decodes)
    assert all(hlo.count(" all-reduce(") <= 2 for hlo in decodes)
    bools = {shape for key in engine.COMPILED if key[0] is engine.decode and key[4] is not None
             for shape, dtype, _ in key[2] if dtype == bool}
    assert bools == {(4,)}  # "done", "stopped": 3 slots rounded up to 4
