"""Sampling methods: small frozen dataclasses, and the jitted per-row sampler.

    Greedy()                                   argmax of the logits
    Temperature(temperature=0.8, seed=1)       softmax(logits / T)
    TopK(k=40, temperature=0.8)                only the k most likely tokens
    TopP(p=0.9, temperature=0.8)               the smallest set with probability mass >= p
    MinP(p=0.05, temperature=0.8)              tokens with prob >= p * max prob
    Sampling(temperature, top_k, top_p, min_p, seed,  all of them at once, and penalties
             repetition_penalty, presence_penalty, frequency_penalty)

Every method resolves to a `Sampling` (`Greedy` is temperature 0), and a batch is
sampled with one jitted function that takes the parameters per row, so one batch can
mix requests with different settings and nothing recompiles when they change.

Reproducibility: the random key of a row at generated-token index t is
`fold_in(key(seed), t)`, and the Gumbel noise is drawn per row over token ids. The
sample therefore depends only on the request's seed, its logits and t, never on the
batch size, the row's position in the batch, or the other requests in it (the logits
themselves are per-row computations, equal up to float rounding).

Seeds: a method's seed defaults to None, "derive one": `with_seed(sampling, run_seed,
key)` gives the request the seed `derive_seed(run_seed, key)`, a hash of the run's seed
and the request's index or id, so requests sharing one method still draw differently,
and a rerun (or a resumed run) draws the same. An explicit seed is used as given.
Samples: sample j of a request (`n` samples per prompt) draws with
`sample_seed(seed, j)`: the request's seed for j = 0 (so n = 1 is unchanged and
sample 0 is the n = 1 completion), a hash of it and j otherwise.

Log-probabilities (`sample`'s chosen-token ones and `top_logprobs`' alternatives) are
of the model's raw distribution, log_softmax(logits) in fp32, before temperature and
the filters (as vLLM reports by default): they do not change with the sampling method.

Filters apply in the order temperature -> top-k -> top-p -> min-p, each on the
distribution left by the previous one (as transformers' logits warpers do); min-p is
relative to the most likely token, so renormalisation does not change it.

Penalties (`penalize`) change the logits before all of these, greedy rows included:
`repetition_penalty` r, as transformers' `RepetitionPenaltyLogitsProcessor` (and
vLLM), divides a positive logit by r and multiplies a negative one by r for every token
of the prompt or of the completion so far; then, as vLLM and OpenAI's API,
`frequency_penalty` subtracts f times the number of times a token was generated and
`presence_penalty` p once from every token generated at least once (the prompt does
not count for these two). Log-probabilities stay those of the raw distribution.

Minimum lengths (`suppress_stops`): a row that must still generate tokens before it may
stop (a request's `min_new_tokens`, transformers' `min_new_tokens`, vLLM's
`min_tokens`) has its stop tokens' logits set to -inf, after the penalties; its
log-probabilities, too, stay the raw distribution's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Union

import jax
import jax.numpy as jnp

__all__ = ["Greedy", "Temperature", "TopK", "TopP", "MinP", "Sampling", "SamplingMethod", "resolve", "sample", "argmax",
           "top_logprobs", "derive_seed", "with_seed", "sample_seed", "PENALTY_KEYS", "penalize", "seen_tokens",
           "suppress_stops"]

# The per-row penalty arrays of a batch (float32 [B] each, named as `Sampling`'s fields).
PENALTY_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty")

_MAX_SEED = 2**32


def _check(cond: bool, what: str, expected: str, found) -> None:
    if not cond:
        raise ValueError(f"{what} must be {expected}, got {found!r}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """General sampling parameters of one request.

    temperature: 0 means greedy (argmax); > 0 divides the logits.
    top_k: keep the k most likely tokens; 0 disables.
    top_p: nucleus sampling mass in (0, 1]; 1 disables.
    min_p: keep tokens with prob >= min_p * max prob, in [0, 1]; 0 disables.
    seed: the request's seed in [0, 2**32), or None to derive one from the run's seed
        and the request (see the module docstring).
    repetition_penalty: > 0; 1 disables (see the module docstring for the penalties).
    presence_penalty, frequency_penalty: in [-2, 2] (as vLLM and OpenAI's API); 0 disables.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        t, k, p, m, s = self.temperature, self.top_k, self.top_p, self.min_p, self.seed
        r, pp, fp = self.repetition_penalty, self.presence_penalty, self.frequency_penalty
        _check(_number(t) and math.isfinite(t) and t >= 0, "temperature", "a finite number >= 0", t)
        _check(_integer(k) and k >= 0, "top_k", "an integer >= 0", k)
        _check(_number(p) and 0 < p <= 1, "top_p", "in (0, 1]", p)
        _check(_number(m) and 0 <= m <= 1, "min_p", "in [0, 1]", m)
        _check(s is None or _integer(s) and 0 <= s < _MAX_SEED, "seed", f"None or an integer in [0, {_MAX_SEED})", s)
        _check(_number(r) and math.isfinite(r) and r > 0, "repetition_penalty", "a finite number > 0", r)
        _check(_number(pp) and -2 <= pp <= 2, "presence_penalty", "in [-2, 2]", pp)
        _check(_number(fp) and -2 <= fp <= 2, "frequency_penalty", "in [-2, 2]", fp)

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the run then keeps per-row token counts)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def resolve(self) -> "Sampling":
        return self


def _number(x) -> bool:
    """An int or float, not a bool (True is an int to Python, never a setting here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token (ties: the lowest id, as torch.argmax)."""

    def resolve(self) -> Sampling:
        return Sampling(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sample from softmax(logits / temperature)."""

    temperature: float = 1.0
    seed: int | None = None

    def resolve(self) -> Sampling:
        return Sampling(temperature=self.temperature, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Sample among the k most likely tokens."""

    k: int
    temperature: float = 1.0
    seed: int | None = None

    def resolve(self) -> Sampling:
        _check(isinstance(self.k, int) and self.k >= 1, "TopK.k", "an integer >= 1", self.k)
        return Sampling(temperature=self.temperature, top_k=self.k, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens with mass >= p."""

    p: float
    temperature: float = 1.0
    seed: int | None = None

    def resolve(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.p, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class MinP:
    """Sample among tokens whose probability is at least p times the largest one."""

    p: float
    temperature: float = 1.0
    seed: int | None = None

    def resolve(self) -> Sampling:
        return Sampling(temperature=self.temperature, min_p=self.p, seed=self.seed)


SamplingMethod = Union[Sampling, Greedy, Temperature, TopK, TopP, MinP]


def resolve(method: SamplingMethod | None) -> Sampling:
    """The `Sampling` of a method; None means greedy."""
    if method is None:
        return Greedy().resolve()
    if not hasattr(method, "resolve"):
        raise TypeError(f"sampling must be one of Greedy, Temperature, TopK, TopP, MinP, Sampling or None, "
                        f"got {type(method).__name__}")
    return method.resolve()


def derive_seed(run_seed: int, key) -> int:
    """A seed in [0, 2**32) from the run's seed and a request's index or id (any JSON
    value): the first 4 bytes of SHA-256 over both, stable across processes and runs."""
    digest = hashlib.sha256(json.dumps([run_seed, key], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def with_seed(sampling: Sampling, run_seed: int, key) -> Sampling:
    """`sampling` with a concrete seed: its own, or `derive_seed(run_seed, key)` if None."""
    if sampling.seed is not None:
        return sampling
    return dataclasses.replace(sampling, seed=derive_seed(run_seed, key))


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample j of a request whose seed is `seed`: `seed` itself for j = 0,
    else `derive_seed(seed, {"sample": j})` (distinct per sample, reproducible, and
    never the key of a request index or id, which are integers or strings)."""
    return seed if j == 0 else derive_seed(seed, {"sample": j})


def _cutoff(scaled, top_k, top_p, min_p):
    """Per-row logit threshold [B]: tokens with scaled logit >= it survive the filters.

    Every filter keeps a prefix of the tokens sorted by probability, so the survivors
    are those at least as likely as the last kept rank (ties at the cutoff all stay,
    as in transformers' top-k).
    """
    V = scaled.shape[-1]
    srt = -jnp.sort(-scaled, axis=-1)  # descending [B, V]
    rank = jnp.arange(V)[None, :]
    keep = rank < jnp.where(top_k > 0, top_k, V)[:, None]
    # top-p on the distribution renormalised over the top-k survivors; the first
    # token always stays (its preceding mass is 0 < p).
    probs = jax.nn.softmax(jnp.where(keep, srt, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= before < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    n_kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    return jnp.take_along_axis(srt, (n_kept - 1)[:, None], axis=-1)[:, 0]


def argmax(x):
    """int32 [B]: the index of each row's largest entry of x [B, V], the first among ties
    (or the first NaN), as `jnp.argmax`.

    As one max and one min over a select: XLA:CPU lowers `jnp.argmax`'s (value, index)
    reduction to scalar code, 80 us for 4 x 8192 logits against 18 us this way
    (2 cores, fp32); in the benchmark model's decode step of 4 rows per device it cost
    0.17 ms of ~8.5.
    """
    V = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    hit = (x == top) | jnp.isnan(x)  # max is NaN when any entry is; argmax returns the first NaN
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def seen_tokens(ids, valid, vocab: int):
    """int32 [B, V]: the penalty counts of prompts ids [B, T] (valid [B, T]: which are
    tokens): 1 where a token occurs in the row's prompt. A decode step adds 2 for each
    token it generates, so `seen >> 1` counts a token's generations and `seen > 0`
    says it occurred in the prompt or the completion (`penalize`)."""
    B = ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return jnp.zeros((B, vocab), jnp.int32).at[rows, ids].max(valid.astype(jnp.int32))


@jax.named_scope("penalize")
def penalize(logits, seen, samp: dict):
    """logits [B, V] with each row's penalties applied (see the module docstring), from
    `seen_tokens` counts [B, V] and the float32 [B] arrays `samp[k]` of `PENALTY_KEYS`.
    In fp32; a row whose penalties are off is returned unchanged."""
    logits = logits.astype(jnp.float32)
    rep, pres, freq = (samp[k][:, None] for k in PENALTY_KEYS)
    made = (seen >> 1).astype(jnp.float32)
    out = jnp.where((seen > 0) & (rep != 1), jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return out - freq * made - pres * (made > 0)


@jax.named_scope("suppress_stops")
def suppress_stops(logits, stop_ids, early):
    """logits [B, V] with each `early` [B] row's stop tokens set to -inf (fp32):
    stop_ids int32 [B, S], each row's stop tokens padded with -1. -inf, as
    transformers' `MinNewTokensLengthLogitsProcessor`: the row's other tokens keep
    their probabilities relative to each other."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    cols = jnp.where((stop_ids >= 0) & early[:, None], stop_ids, V)  # V: out of range, dropped
    return logits.at[jnp.arange(B)[:, None], cols].set(-jnp.inf, mode="drop")


@jax.named_scope("sample")
def sample(logits, temperature, top_k, top_p, min_p, seeds, step, raw=None):
    """Sample one token per row.

    Args:
      logits: float32 [B, V].
      temperature, top_p, min_p: float32 [B]; top_k: int32 [B]; seeds: uint32 [B].
      step: int32 [B] or scalar, the index of the token being generated (0 for the
        first new token), folded into the row's key.
      raw: the model's logits [B, V] when `logits` are penalized ones (`penalize`):
        the log-probabilities are of these.
    Returns:
      (tokens int32 [B], logprobs float32 [B]): the chosen tokens and their
      log-probability under the model's raw distribution (before penalties,
      temperature and filters, as vLLM reports by default).
    """
    B, V = logits.shape
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    filtered = (top_k > 0) | (top_p < 1) | (min_p > 0)
    # Sorting the vocabulary is the expensive part: skip it when no row filters.
    cutoff = jax.lax.cond(
        jnp.any(filtered & ~greedy),
        lambda: _cutoff(scaled, top_k, top_p, min_p),
        lambda: jnp.full((B,), -jnp.inf, jnp.float32),
    )
    cutoff = jnp.where(filtered, cutoff, -jnp.inf)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,))

    def drawn():
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds.astype(jnp.uint32), step)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
        # Gumbel-max: argmax(logits/T + g) is a sample of softmax(logits/T).
        noisy = jnp.where(scaled >= cutoff[:, None], scaled + gumbel, -jnp.inf)
        return argmax(noisy)

    # The noise (V random draws per row) costs more than the rest of a small model's
    # step: draw it only when some row samples. A row's draw does not depend on the
    # others, so skipping it for an all-greedy batch changes no token.
    sampled = jax.lax.cond(jnp.any(~greedy), drawn, lambda: jnp.zeros((B,), jnp.int32))
    tokens = jnp.where(greedy, argmax(logits), sampled)
    # log_softmax at the chosen token only, in jax.nn.log_softmax's arithmetic (shift by
    # the row max, subtract the log of the shifted exp-sum: the same fp32 result), so no
    # [B, V] log-probabilities are built.
    raw = logits if raw is None else raw.astype(jnp.float32)
    m = jnp.max(raw, axis=-1)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    logprobs = (chosen - m) - jnp.log(jnp.sum(jnp.exp(raw - m[:, None]), axis=-1))
    return tokens, logprobs


@jax.named_scope("top_logprobs")
def top_logprobs(logits, k: int):
    """The k most likely tokens of each row and their log-probabilities, from the
    distribution `sample` reports the chosen token's log-probability in (fp32
    log_softmax of the raw logits, before temperature and filters).

    Args:
      logits: float [B, V]; k: static, 1 <= k <= V.
    Returns:
      (ids int32 [B, k], logprobs float32 [B, k]), most likely first (ties: lower id first).
    """
    lps, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), lps
