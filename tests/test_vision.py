"""Vision tower, merge and multimodal logits against transformers (fp32, tiny odd configs).

The checkpoint is a `Llama4ForConditionalGeneration` saved with `save_pretrained` and
read by our loader, so the name map, the layouts and the numerics are tested together.
Vision sizes are odd where the architecture allows: width 36 with 3 heads (head dim 12,
the smallest odd multiple of 4 the 2D RoPE accepts), 7-pixel patches on 42-pixel tiles
(6 x 6 grid, 9 tokens per tile after the 0.5 pixel shuffle), adapter width 45.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import llama4_jax as L
from llama4_jax.checkpoint import CheckpointError, checkpoint_entries
from llama4_jax.config import Llama4Config, VisionConfig
from llama4_jax.model import vision as V
from llama4_jax.processor import ImageProcessor, image_token_ids
from tests import hf_models

VISION = VisionConfig(
    hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=144, vision_output_dim=45,
    image_size=42, patch_size=7, projector_input_dim=45, projector_output_dim=45,
)
# Special tokens inside the tiny vocabulary (331): HF embeds input_ids before the merge.
TOKENS = dict(boi_token_index=320, eoi_token_index=321, image_token_index=322)
IDS = dict(image_start=320, image_end=321, image=323, patch=322, tile_x=324, tile_y=325)


@pytest.fixture(scope="session")
def mm(tmp_path_factory):
    text = hf_models.TEXT["scout_like"]
    config = Llama4Config(text=text, vision=VISION, architecture="Llama4ForConditionalGeneration", **TOKENS)
    model = hf_models.make_hf(config, seed=7)
    assert model.vision_model.rotary_embedding.freqs_ci.is_complex()
    path = str(tmp_path_factory.mktemp("mm") / "ckpt")
    model.save_pretrained(path)
    cfg, params = L.load(path, dtype="float32")
    return cfg, params, model, path


def _images(rng, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_config_and_name_map_round_trip(mm):
    cfg, params, model, _ = mm
    assert cfg.vision == VISION and cfg.image_token_index == 322
    hf_names = set(model.state_dict())
    ours = {e.hf_name for e in checkpoint_entries(cfg)}
    assert ours == hf_names  # every HF tensor consumed, nothing invented


def test_vision_tower_matches_transformers(mm):
    """Adapter output (HF `last_hidden_state`) within 2e-5 abs of torch fp32.

    Values are O(1) after the last GELU; 3 layers of fp32 matmuls in a different order
    differ by ~1e-6, so 2e-5 leaves margin while a wrong transpose, a CLS in the wrong
    place or a missing RoPE pair gives O(0.1).
    """
    cfg, params, model, _ = mm
    px = np.random.default_rng(0).uniform(-1, 1, (5, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(px)).last_hidden_state.numpy()
    ours = jax.jit(lambda p, x: V.VisionModel(VISION).apply({"params": p}, x))(params["params"]["vision"], px)
    assert ours.shape == ref.shape == (5, 9, 45)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5, rtol=0)


def test_rope_table_matches_transformers():
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    import transformers

    d = L.to_hf(Llama4Config(text=hf_models.TEXT["scout_like"], vision=VISION,
                             architecture="Llama4ForConditionalGeneration"))["vision_config"]
    hf_cfg = transformers.Llama4VisionConfig(**{k: v for k, v in d.items() if k != "model_type"})
    ref = Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_cfg)  # complex [P+1, 1, e/2]
    ang = V.vision_rope_angles(VISION)
    np.testing.assert_allclose(np.cos(ang), ref.real.numpy()[:, 0], atol=1e-6)
    np.testing.assert_allclose(np.sin(ang), ref.imag.numpy()[:, 0], atol=1e-6)
    assert np.all(ang[-1] == 0)  # CLS: identity


def test_pixel_shuffle_matches_transformers():
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle

    x = np.random.default_rng(1).normal(size=(2, 36, 5)).astype(np.float32)
    ref = pixel_shuffle(torch.from_numpy(x), 0.5).numpy()
    np.testing.assert_array_equal(np.asarray(V.pixel_shuffle(x, 0.5)), ref)


def _prompt(rng, n_text, ratios, per_tile):
    ids = [1] + list(rng.integers(3, 300, n_text))
    for r in ratios:
        ids += image_token_ids(r, per_tile, IDS) + list(rng.integers(3, 300, 3))
    return ids


def test_multimodal_logits_match_transformers(mm):
    """A batch of prompts with 0, 1 and 3 images of different aspect ratios, left padded.

    The images go through our processor (42-pixel tiles, so a 60x100 image is a 2x3 grid
    plus the global tile), the same pixel values and ids through both models. Logits
    agree within 5e-5 abs (fp32; O(1) logits; the text-only parity is ~1e-5), on every
    real token, image placeholders included.
    """
    cfg, params, model, _ = mm
    rng = np.random.default_rng(2)
    proc = ImageProcessor(size=42, max_patches=6)
    per_rows = [[], [(50, 40)], [(60, 100), (42, 42), (130, 30)]]
    ids_rows, tiles = [], []
    for sizes in per_rows:
        out = proc(_images(rng, sizes))
        ids_rows.append(_prompt(rng, 4, out.aspect_ratios, V.tokens_per_tile(VISION)))
        tiles += np.split(out.pixel_values, np.cumsum(out.tiles)[:-1]) if sizes else []
    assert [len(proc(_images(rng, s)).aspect_ratios) for s in per_rows] == [0, 1, 3]
    pixel_values = np.concatenate(tiles).astype(np.float32)
    T = max(map(len, ids_rows))
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for b, row in enumerate(ids_rows):
        ids[b, T - len(row):] = row
        mask[b, T - len(row):] = 1
    assert (ids == 322).sum() == pixel_values.shape[0] * 9

    ours = np.asarray(L.forward(cfg, params, ids, attention_mask=mask, pixel_values=pixel_values))
    # Reference: HF on each row alone (unpadded). HF's own left-padded batch shifts the
    # NoPE temperature by the pad count (floor_scale is 6 here), a documented difference.
    k = 0
    for b, row in enumerate(ids_rows):
        n = len(per_rows[b])
        px = np.concatenate(tiles[k:k + n]).astype(np.float32) if n else None
        k += n
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([row]), use_cache=False,
                        pixel_values=None if px is None else torch.from_numpy(px)).logits.numpy()[0]
        np.testing.assert_allclose(ours[b, T - len(row):], ref, atol=5e-5, rtol=0, err_msg=f"row {b}")
    m = mask.astype(bool)
    # The images matter: without them the image rows' logits move by O(1).
    text_only = np.asarray(L.forward(cfg, params, np.where(ids == 322, 5, ids), attention_mask=mask))
    assert np.abs(text_only[m] - ours[m]).max() > 0.1


def test_token_count_mismatch_is_reported(mm):
    cfg, params, _, _ = mm
    ids = np.array([[1] + [322] * 10 + [5]])
    px = np.zeros((1, 3, 42, 42), np.float32)
    with pytest.raises(ValueError, match=r"10 <\|patch\|> tokens.*1 tiles x 9 = 9"):
        L.forward(cfg, params, ids, pixel_values=px)
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 42, 42\]"):
        L.forward(cfg, params, np.array([[1] + [322] * 9]), pixel_values=np.zeros((1, 3, 40, 40), np.float32))


def test_missing_vision_tensor_is_reported(mm, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, _, path = mm
    import os
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(path, dst)
    (f,) = [x for x in os.listdir(dst) if x.endswith(".safetensors")]
    tensors = load_file(str(dst / f))
    del tensors["vision_model.model.layers.1.mlp.fc2.bias"]
    save_file(tensors, str(dst / f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"vision_model\.model\.layers\.1\.mlp\.fc2\.bias"):
        L.load(str(dst), dtype="float32")


def test_parameter_counts_of_real_configs_with_vision():
    """LLAMA4_SPEC.md 1.4 (meta-device count): Scout 108.64B, Maverick 401.58B in total."""
    for name, total in (("scout", 108.64), ("maverick", 401.58)):
        tree = L.abstract_params(L.preset(name))
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
        assert round(n / 1e9, 2) == total, name
        vis = sum(int(np.prod(x.shape)) for k in ("vision", "projector")
                  for x in jax.tree_util.tree_leaves(tree["params"][k]))
        assert round(vis / 1e9, 2) == 0.87
    assert "vision" not in L.abstract_params(L.preset("scout"), vision=False)["params"]


def test_vision_params_have_logical_axes():
    tree = L.abstract_params(L.preset("tiny-vision"), boxed=True)
    for sub in ("vision", "projector"):
        for leaf in jax.tree_util.tree_leaves(tree["params"][sub], is_leaf=lambda x: hasattr(x, "names")):
            assert len(leaf.names) == len(leaf.value.shape)


class _ImageTokenizer:
    """The two tokenizer methods `generate` uses for token-id prompts with images."""

    def convert_tokens_to_ids(self, token):
        from llama4_jax.processor import SPECIAL_TOKENS

        return {v: IDS[k] for k, v in SPECIAL_TOKENS.items()}.get(token)

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_greedy_multimodal_generation_matches_transformers(mm):
    """Greedy tokens equal transformers' `generate`, token for token (prefill with images,
    then decode from the KV cache), for a batch of prompts with 2 and 1 images; the same
    tokens when the prompts are prefilled in pieces of at most 13 (image tokens split
    across pieces)."""
    from llama4_jax.generate import generate

    cfg, params, model, _ = mm
    rng = np.random.default_rng(5)
    prompts = [[1, 40, 41, IDS["image"], 42, IDS["image"], 43, 44], [1, IDS["image"], 50, 51, 52]]
    images = [_images(rng, [(60, 100), (30, 45)]), _images(rng, [(90, 40)])]
    proc = ImageProcessor(size=42, max_patches=6)
    out = generate(cfg, params, prompts, images=images, tokenizer=_ImageTokenizer(), max_new_tokens=10,
                   batch_size=2, image_processor=proc)
    for p, ims, c in zip(prompts, images, out):
        pv = proc(ims)
        assert c.prompt_token_ids.count(322) == sum(pv.tiles) * 9
        with torch.no_grad():
            ref = model.generate(input_ids=torch.tensor([c.prompt_token_ids]),
                                 pixel_values=torch.from_numpy(pv.pixel_values.astype(np.float32)),
                                 max_new_tokens=10, do_sample=False)[0, len(c.prompt_token_ids):].tolist()
        assert c.token_ids == ref
    pieces = generate(cfg, params, prompts, images=images, tokenizer=_ImageTokenizer(), max_new_tokens=10,
                      batch_size=2, image_processor=proc, prefill_chunk=13)
    assert [c.token_ids for c in pieces] == [c.token_ids for c in out]


def test_generate_reports_image_errors(mm, tmp_path):
    from llama4_jax.generate import generate

    cfg, params, _, _ = mm
    tok = _ImageTokenizer()
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=r"prompt 0: 3 images, more than the limit of 2 per prompt"):
        generate(cfg, params, [[1, 5]], images=[[img] * 3], tokenizer=tok, max_images_per_prompt=2)
    with pytest.raises(ValueError, match=r"prompt 1: .*image file not found: .*nope\.png"):
        generate(cfg, params, [[1, 5], [1, IDS["image"]]], images=[None, [str(tmp_path / "nope.png")]],
                 tokenizer=tok)
    with pytest.raises(ValueError, match=r"prompt 0: the prompt has 0 <\|image\|> placeholder\(s\) but 1 image"):
        generate(cfg, params, [[1, 5]], images=[[img]], tokenizer=tok)


def test_cli_generate_with_images(tmp_path, capsys):
    """The shipped default checkpoint takes images from JSONL lines ("images" or image
    parts of "messages"); bad image files and too many images are reported by line."""
    import json

    from PIL import Image

    from llama4_jax.cli import main

    rng = np.random.default_rng(6)
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(b)
    (tmp_path / "notes.png").write_text("not an image")
    lines = [
        {"id": "one", "prompt": "Describe the picture.", "images": [str(a)]},
        {"id": "two", "messages": [{"role": "user", "content": [{"type": "image", "path": str(b)},
                                                                {"type": "text", "text": "And this one?"}]}]},
        {"id": "missing", "prompt": "x", "images": [str(tmp_path / "missing.png")]},
        {"id": "bad", "prompt": "x", "images": [str(tmp_path / "notes.png")]},
        {"id": "many", "prompt": "x", "images": [str(a)] * 3},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = main(["generate", "--input", str(inp), "--output", str(out), "--max-new-tokens", "3", "--no-progress",
               "--max-images-per-prompt", "2", "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{inp}:3: the prompt: image file not found: {tmp_path / 'missing.png'}" in err
    assert f"{inp}:4: the prompt: cannot read image {tmp_path / 'notes.png'}" in err
    assert f"{inp}:5: the prompt: 3 images, more than the limit of 2 per prompt" in err
    recs = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda r: r["id"])
    assert [r["id"] for r in recs] == ["one", "two"]  # the file is in finishing order
    # 150x260 on 112-pixel tiles: a 2x3 grid plus the global tile = 7 tiles of 16 tokens, plus
    # the start/end, separator and <|image|> tokens; 80x60: one tile.
    # The shipped processor (max_patches 4) tiles the 150 x 260 image 2 x 2, plus the global tile.
    assert recs[0]["prompt_tokens"] > 5 * 16 and all(len(r["token_ids"]) >= 1 for r in recs)
