"""Vision throughput: the vision tower and multimodal prefill, llama4_jax vs transformers.

    python benchmarks/vision.py                  # 1 and 8 images of 480x640 (5 tiles each)
    python benchmarks/vision.py --repeats 3 --images 1,4

Both sides read one checkpoint: a small `Llama4ForConditionalGeneration` with the real
tile geometry (336-pixel tiles, 14-pixel patches: 577 tokens per tile in the encoder,
144 after the pixel shuffle) on small widths (vision hidden 256, 4 encoder layers, 4
heads; text hidden 256, 4 layers, 4 experts top-1), built with transformers and
written with `save_pretrained`. Images are 480x640 (a 2x2 grid plus the global tile)
run through our processor; both sides get the same pixel values and token ids.

Measured, each side in its own process (its own peak RSS, no thread contention),
median of `--repeats` calls after one warm-up, fp32:
  * the vision tower (through the adapter) on the tiles of N images: images/s;
  * end-to-end prefill (tower + projector + merge + decoder logits) of one prompt
    holding N images and a short text.
The max abs difference of the outputs is printed as a sanity check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.forward import peak_rss_mib, time_calls  # noqa: E402

SPECIAL = dict(image_start=4000, image_end=4001, patch=4002, image=4003, tile_x=4004, tile_y=4005)


def config():
    from llama4_jax.config import PRESETS, Llama4Config, VisionConfig

    text = dataclasses.replace(
        PRESETS["tiny"].text, vocab_size=4096, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
        moe_layers=(1, 3), no_rope_layers=(1, 1, 1, 0), attention_chunk_size=8192, floor_scale=8192,
    )
    vision = VisionConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                          vision_output_dim=256, projector_input_dim=256, projector_output_dim=256)
    return Llama4Config(text=text, vision=vision, architecture="Llama4ForConditionalGeneration",
                        boi_token_index=SPECIAL["image_start"], eoi_token_index=SPECIAL["image_end"],
                        image_token_index=SPECIAL["patch"])


def build_checkpoint(path: str) -> None:
    import torch
    import transformers

    from llama4_jax.config import to_hf

    d = to_hf(config())
    cfg = transformers.Llama4Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    transformers.Llama4ForConditionalGeneration(cfg).save_pretrained(path)


def inputs(n_images: int, workdir: str):
    """(pixel_values fp32 [5n, 3, 336, 336], input_ids [1, T]) cached in workdir."""
    f = os.path.join(workdir, f"inputs_{n_images}.npz")
    if not os.path.exists(f):
        from llama4_jax.model.vision import tokens_per_tile
        from llama4_jax.processor import ImageProcessor, image_token_ids

        rng = np.random.default_rng(n_images)
        out = ImageProcessor()([rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n_images)])
        ids = [1] + list(rng.integers(5, 3000, 16))
        for r in out.aspect_ratios:
            ids += image_token_ids(r, tokens_per_tile(config().vision), SPECIAL) + list(rng.integers(5, 3000, 4))
        np.savez(f, pixel_values=out.pixel_values.astype(np.float32), input_ids=np.array([ids], np.int64))
    z = np.load(f)
    return z["pixel_values"], z["input_ids"]


def run_jax(args) -> dict:
    import jax

    import llama4_jax
    from llama4_jax.model.vision import VisionModel

    cfg, params = llama4_jax.load(args.ckpt, dtype="float32")
    px, ids = inputs(args.n, args.workdir)
    tower = jax.jit(lambda p, x: VisionModel(cfg.vision).apply({"params": p}, x))
    out = {}

    def call_tower():
        out["tower"] = jax.block_until_ready(tower(params["params"]["vision"], px))

    def call_prefill():
        out["logits"] = jax.block_until_ready(llama4_jax.forward(cfg, params, ids, pixel_values=px,
                                                                 attention_impl=args.attention_impl))

    t_first, t_med = time_calls(call_tower, args.repeats)
    p_first, p_med = time_calls(call_prefill, args.repeats)
    np.savez(os.path.join(args.workdir, "jax.npz"), tower=np.asarray(out["tower"]),
             logits=np.asarray(out["logits"][0, -8:]))
    return {"tower_s": t_med, "prefill_s": p_med, "first_s": t_first + p_first, "peak_rss_mib": peak_rss_mib(),
            "tokens": int(ids.shape[1])}


def run_hf(args) -> dict:
    import torch
    import transformers

    model = transformers.Llama4ForConditionalGeneration.from_pretrained(
        args.ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    px, ids = inputs(args.n, args.workdir)
    px_t, ids_t = torch.from_numpy(px), torch.from_numpy(ids)
    out = {}

    def call_tower():
        with torch.inference_mode():
            out["tower"] = model.vision_model(px_t).last_hidden_state

    def call_prefill():
        with torch.inference_mode():
            out["logits"] = model(input_ids=ids_t, pixel_values=px_t, use_cache=False).logits

    t_first, t_med = time_calls(call_tower, args.repeats)
    p_first, p_med = time_calls(call_prefill, args.repeats)
    np.savez(os.path.join(args.workdir, "hf.npz"), tower=out["tower"].numpy(), logits=out["logits"][0, -8:].numpy())
    return {"tower_s": t_med, "prefill_s": p_med, "first_s": t_first + p_first, "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


def child(side: str, args, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--ckpt", args.ckpt, "--workdir", args.workdir,
           "--n", str(n), "--repeats", str(args.repeats), "--attention-impl", args.attention_impl]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="1,8", help="comma-separated image counts per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call (median)")
    p.add_argument("--attention-impl", default="auto",
                   help="llama4_jax decoder attention backend (auto: blockwise past the xla length on CPU)")
    p.add_argument("--side", choices=("jax", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps((run_jax if args.side == "jax" else run_hf)(args)))
        return 0

    counts = [int(x) for x in args.images.split(",") if x.strip()]
    print(f"vision hidden 256 x 4 layers, 336-px tiles (577 tokens), text hidden 256 x 4 layers; fp32; "
          f"480x640 images = 5 tiles each; median of {args.repeats} after 1 warm-up; {os.cpu_count()} CPU cores; "
          f"llama4_jax attention_impl={args.attention_impl}, transformers sdpa")
    print(f"{'images':>6s} {'side':14s}{'tower ms':>10s}{'images/s':>10s}{'prefill ms':>12s}{'tokens':>8s}"
          f"{'peak RSS MiB':>14s}")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir, args.ckpt = tmp, os.path.join(tmp, "ckpt")
        build_checkpoint(args.ckpt)
        for n in counts:
            jx, hf = child("jax", args, n), child("hf", args, n)
            a, b = np.load(os.path.join(tmp, "jax.npz")), np.load(os.path.join(tmp, "hf.npz"))
            for name, r in (("llama4_jax", jx), (f"transformers({hf['threads']})", hf)):
                print(f"{n:6d} {name:14s}{r['tower_s'] * 1e3:10.1f}{n / r['tower_s']:10.2f}"
                      f"{r['prefill_s'] * 1e3:12.1f}{jx['tokens']:8d}{r['peak_rss_mib']:14.0f}")
            print(f"{'':6s} ratio (transformers time / llama4_jax time): tower {hf['tower_s'] / jx['tower_s']:.2f}x, "
                  f"prefill {hf['prefill_s'] / jx['prefill_s']:.2f}x; max |diff| tower "
                  f"{np.abs(a['tower'] - b['tower']).max():.1e}, logits {np.abs(a['logits'] - b['logits']).max():.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
