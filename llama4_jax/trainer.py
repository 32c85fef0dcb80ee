"""The training loop: resumable orbax checkpoints, a progress bar, and `llama4-jax train`.

    state, history = trainer.fit(config, params, batches, train_config=tc, steps=1000,
                                 ckpt_dir="run/ckpt", save_every=200)

`batches(step) -> dict` gives the batch of a step (a pure function of the step, so a
resumed run sees the batches an uninterrupted one would). Checkpoints are orbax
train states (parameters, optimizer state, step) written atomically (orbax writes a
temporary directory and renames it when complete); `fit` resumes from the latest one
in `ckpt_dir`, and appends each logged step's metrics to `ckpt_dir/metrics.jsonl`.
A non-finite loss stops the run with the step number; the last good checkpoint stays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import distributed, sharding
from . import train as T
from .processor import load_tokenizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _manager(ckpt_dir: str, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=opts)


def _as_tree(state: T.TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save_state(mngr, state: T.TrainState) -> None:
    import orbax.checkpoint as ocp

    mngr.save(int(state.step), args=ocp.args.StandardSave(_as_tree(state)), force=True)
    mngr.wait_until_finished()


def restore_state(mngr, like: T.TrainState, step: int | None = None) -> T.TrainState:
    """The checkpoint of `step` (default: the latest), shaped and placed like `like`."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), _as_tree(like))
    t = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return T.TrainState(t["step"], t["params"], t["opt_state"])


def _truncate_log(path: str, step: int) -> None:
    """Drop logged steps after `step` (run after the checkpoint a resumed run restarts
    from; they are run and logged again), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _gather(tree):
    """Host copies of a tree of arrays, gathered from every process when they span several."""
    from jax.experimental import multihost_utils

    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(tree)):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _put(batch: dict, mesh, rules):
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        if k == "pixel_values":
            out[k] = jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        else:
            out[k] = jax.device_put(v, sharding.batch_sharding(mesh, rules, v.shape))
    return out


def fit(config, params, batches: Callable[[int], dict], *, train_config: T.TrainConfig, steps: int,
        ckpt_dir: str | None = None, save_every: int = 500, keep: int = 2, moe_impl: str = "ragged",
        attention_impl: str = "xla", mesh=None, rules=None, teacher=None, progress: bool = True,
        log_every: int = 10, on_log: Callable[[int, dict], None] | None = None,
        time_limit_s: float | None = None):
    """Train for `steps` steps (in total, counting resumed ones); returns (state, history).

    teacher: optional (config, params) for distillation (its logits are computed in
    the step, without gradient). history: a list of per-step metric dicts (floats)
    of the steps run in this call. time_limit_s: stop (with a checkpoint) at the first
    log boundary after this many seconds of this call; a later call resumes.

    The loop does not wait for each step: metrics stay on the device and are fetched
    every `log_every` steps (and before every checkpoint), so the host prepares the
    next batch while the device computes. A non-finite loss among them stops the run
    naming the first bad step; checkpoints are only written after their steps' losses
    were checked, so the last one written is good.
    """
    from tqdm.auto import tqdm

    state = T.init_state(config, params, train_config)
    if mesh is not None:
        state = jax.device_put(state, T.state_shardings(config, state, mesh, rules, train_config))
    step_fn = T.make_train_step(config, train_config, moe_impl=moe_impl, attention_impl=attention_impl, mesh=mesh,
                                rules=rules, teacher_config=teacher[0] if teacher else None)
    mngr = None
    if ckpt_dir is not None:
        mngr = _manager(ckpt_dir, keep)
        if mngr.latest_step() is not None:
            state = restore_state(mngr, state)
    start = int(state.step)
    history, pending = [], []  # pending: (step, device metrics, real tokens) not yet fetched
    log = None
    if ckpt_dir and jax.process_index() == 0:
        path = os.path.join(ckpt_dir, "metrics.jsonl")
        _truncate_log(path, start)
        log = open(path, "a")
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    t_start = t_last = time.perf_counter()
    tok_last = 0.0

    def flush():
        """Fetch the pending steps' metrics, check them, log the last one."""
        nonlocal t_last, tok_last
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        for (s, _, real), mv in zip(pending, fetched):
            m = {k: float(v) for k, v in mv.items()}
            if not math.isfinite(m["loss"]):
                last = mngr.latest_step() if mngr else None
                raise TrainingDiverged(
                    f"loss is {m['loss']} at step {s}; stopped. The last good checkpoint "
                    f"({'step ' + str(last) if last else 'none'}) is kept; lower the learning rate or check the data")
            m["step"], m["real_tokens"] = s, real
            history.append(m)
            tok_last += real
        pending.clear()
        now = time.perf_counter()
        m["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
        t_last, tok_last = now, 0.0
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
        if log:
            log.write(json.dumps(m) + "\n")
            log.flush()
        if on_log:
            on_log(m["step"], m)

    try:
        for s in range(start, steps):
            host_batch = batches(s)
            real = float(np.sum(host_batch["attention_mask"]))
            batch = _put(host_batch, mesh, rules)
            state, metrics = step_fn(state, batch, teacher[1]) if teacher else step_fn(state, batch)
            pending.append((s + 1, metrics, real))
            bar.update(1)
            last = s + 1 == steps
            out_of_time = time_limit_s is not None and time.perf_counter() - t_start > time_limit_s
            if (s + 1) % log_every == 0 or last or out_of_time:
                flush()
            if mngr is not None and ((s + 1) % save_every == 0 or last or out_of_time):
                flush()
                save_state(mngr, state)
            if out_of_time:
                break
    finally:
        bar.close()
        if log:
            log.close()
    return state, history


# --------------------------------------------------------------------------------------
# llama4-jax train
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint to start from (Hugging Face format or converted)")
    p.add_argument("--data", required=True, help='JSONL: {"text": ...} or {"prompt": ..., "completion": ...} lines')
    p.add_argument("--out", required=True, help="output directory (Hugging Face format); checkpoints in OUT.ckpt")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (master weights and optimizer state stay float32)")
    p.add_argument("--remat", action="store_true", help="recompute activations per layer group (less memory)")
    p.add_argument("--moe-impl", default=None,
                   help="ragged, dense or ep; default: ep when --mesh splits the experts, else ragged")
    p.add_argument("--teacher", default=None, help="teacher checkpoint for distillation (same vocabulary)")
    p.add_argument("--distill-weight", default="0.5", help="weight of the teacher term in [0, 1], or 'dynamic'")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,expert=4")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    distributed.add_arguments(p)


def _err(msg: str) -> int:
    print(f"llama4-jax train: error: {msg}", file=sys.stderr)
    return 2


def _distill_weight(s: str):
    if s == "dynamic":
        return s
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"--distill-weight must be a number in [0, 1] or 'dynamic', got {s!r}") from None


def export(config, params, src_dir: str, out: str, *, overwrite: bool) -> None:
    """Write params as a Hugging Face directory at `out`, with the tokenizer, generation
    and processor files of `src_dir`, atomically (see `checkpoint.atomic_dir`)."""
    from .checkpoint import atomic_dir, save_hf
    from .checkpoint.hf import copy_side_files

    def write(tmp):
        save_hf(config, params, tmp)
        copy_side_files(src_dir, tmp)

    atomic_dir(out, overwrite=overwrite, write=write)


def run(args) -> int:
    for name in ("steps", "batch_size", "seq_len", "save_every"):
        if getattr(args, name) < 1:
            return _err(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        return _err(f"--lr must be > 0, got {args.lr}")
    if not os.path.isfile(args.data):
        return _err(f"--data: no such file: {args.data}")
    if not os.path.isdir(args.model) or not os.path.exists(os.path.join(args.model, "config.json")):
        return _err(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        return _err(f"--out {args.out} exists; pass --overwrite to replace it")
    if os.path.abspath(args.model) == out or os.path.abspath(args.data).startswith(out + os.sep):
        return _err("--out must not be the model directory or contain the data")
    try:
        tc = T.TrainConfig(learning_rate=args.lr, total_steps=args.steps,
                           warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
                           weight_decay=args.weight_decay, grad_clip=args.grad_clip, compute_dtype=args.dtype,
                           remat=args.remat, distill_weight=_distill_weight(args.distill_weight),
                           distill_temperature=args.distill_temperature)
    except ValueError as e:
        return _err(str(e))

    from . import load
    from .config import load_config
    from .data import DataError, batch_rows, make_batch, pack, read_jsonl
    from .prompts import image_processor_for

    try:
        config = load_config(args.model)
    except Exception as e:
        return _err(f"--model: cannot read its config: {e}")
    ctx = config.text.max_position_embeddings
    if args.seq_len > ctx:
        return _err(f"--seq-len {args.seq_len} is above the model's context ({ctx} tokens)")
    try:
        mesh, main_process = distributed.start(args, "llama4-jax train")
    except ValueError as e:
        return _err(str(e))
    try:
        tokenizer = load_tokenizer(args.model)
    except Exception as e:
        return _err(f"--model: cannot load its tokenizer: {type(e).__name__}: {e}")
    try:
        examples = read_jsonl(args.data, tokenizer, config, image_processor_for(args.model, config))
        pad = config.text.pad_token_id if config.text.pad_token_id is not None else 0
        packed = pack(examples, args.seq_len, pad)
    except DataError as e:
        return _err(str(e))
    teacher = None
    if args.teacher:
        if not os.path.isdir(args.teacher) or not os.path.exists(os.path.join(args.teacher, "config.json")):
            return _err(f"--teacher: {args.teacher} is not a checkpoint directory (no config.json)")
        t_cfg = load_config(args.teacher)
        if t_cfg.text.vocab_size != config.text.vocab_size:
            return _err(f"--teacher has a vocabulary of {t_cfg.text.vocab_size} tokens, the model "
                        f"{config.text.vocab_size}: distillation needs the same vocabulary")
        teacher = load(args.teacher, dtype="float32", mesh=mesh)
    config, params = load(args.model, dtype="float32", mesh=mesh)
    moe_impl = args.moe_impl or ("ep" if mesh is not None and sharding.splits_experts(mesh, None, config.text)
                                 else "ragged")
    n_tok = int(packed.attention_mask.sum())
    print(f"llama4-jax train: {len(examples)} examples, {len(packed)} rows of {args.seq_len} tokens "
          f"({n_tok} real tokens), {args.steps} steps of {args.batch_size} rows", file=sys.stderr)
    ckpt = out + ".ckpt"
    try:
        state, hist = fit(config, params, lambda s: make_batch(packed, batch_rows(len(packed), args.batch_size, s,
                                                                                  args.seed)),
                          train_config=tc, steps=args.steps, ckpt_dir=ckpt, save_every=args.save_every,
                          moe_impl=moe_impl, mesh=mesh, teacher=teacher,
                          progress=not args.no_progress and main_process)
    except TrainingDiverged as e:
        return _err(str(e))
    except ValueError as e:
        return _err(str(e))
    params = _gather(state.params)
    if not main_process:  # process 0 writes the result
        return 0
    export(config, params, args.model, out, overwrite=args.overwrite)
    last = hist[-1] if hist else {}
    print(f"llama4-jax train: wrote {out} (step {int(state.step)}, loss {last.get('loss', float('nan')):.4f}); "
          f"train state in {ckpt}", file=sys.stderr)
    return 0
