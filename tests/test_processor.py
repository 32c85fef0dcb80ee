"""The numpy image processor against transformers' `Llama4ImageProcessor`.

transformers' Llama 4 image processor exists only with a torchvision backend, and
torchvision is not installable beside torch 2.13 here. When torchvision is missing,
the reference below is still transformers' own `_preprocess` (canvas choice, resize
sizes, padding, bf16 normalization, tiling, the global tile), run with a stand-in for
the five torchvision functions it calls, each written the way torchvision implements
them for CPU tensors: `resize` -> `torch.nn.functional.interpolate` (bilinear,
antialias, on uint8 when the CPU has AVX2/AVX512, else through float32 and rounding),
`pad` -> `torch.nn.functional.pad`, `normalize` -> `(x - mean) / std` in the image
dtype, `grayscale_to_rgb` (a no-op on RGB). With torchvision installed the real one is used. Pixel values must be equal,
bit for bit.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import torch

from llama4_jax.processor import (
    ImageError,
    ImageProcessor,
    best_canvas,
    image_prompt,
    image_token_ids,
    load_tokenizer,
    resize_bilinear_aa,
    resized_size,
    supported_canvases,
)


def _torchvision_stand_in() -> types.ModuleType:
    F = torch.nn.functional

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        assert interpolation == InterpolationMode.BILINEAR and max_size is None
        h, w = (int(s) for s in size)
        if (h, w) == tuple(image.shape[-2:]):
            return image
        native_u8 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        shape = image.shape
        x = image.reshape(-1, *shape[-3:])
        if image.dtype == torch.uint8 and not native_u8:
            x = F.interpolate(x.float(), size=[h, w], mode="bilinear", align_corners=False, antialias=antialias)
            x = x.round_().to(torch.uint8)
        else:
            x = F.interpolate(x, size=[h, w], mode="bilinear", align_corners=False, antialias=antialias)
        return x.reshape(*shape[:-2], h, w)

    def pad(image, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = (int(p) for p in padding)
        fills = set(fill) if isinstance(fill, (list, tuple)) else {fill}
        assert padding_mode == "constant" and len(fills) == 1
        return F.pad(image, (left, right, top, bottom), value=float(fills.pop()))

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

    def grayscale_to_rgb(image):
        return image if image.shape[-3] >= 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:]).clone()

    fn = types.ModuleType("torchvision.transforms.v2.functional")
    fn.InterpolationMode, fn.resize, fn.pad, fn.normalize = InterpolationMode, resize, pad, normalize
    fn.grayscale_to_rgb = grayscale_to_rgb
    return fn


@pytest.fixture(scope="module")
def hf_processor():
    """transformers' Llama4ImageProcessor (default settings), with or without torchvision."""
    try:
        import torchvision  # noqa: F401

        from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

        yield Llama4ImageProcessor
        return
    except ImportError:
        pass
    import transformers.image_processing_backends as backends
    from transformers.image_utils import PILImageResampling

    fn = _torchvision_stand_in()
    mods = {"torchvision": types.ModuleType("torchvision"),
            "torchvision.transforms": types.ModuleType("torchvision.transforms"),
            "torchvision.transforms.v2": types.ModuleType("torchvision.transforms.v2"),
            "torchvision.transforms.v2.functional": fn}
    mods["torchvision.transforms.v2"].functional = fn
    name = "transformers.models.llama4.image_processing_llama4"
    mp = pytest.MonkeyPatch()
    try:
        for k, v in mods.items():
            mp.setitem(sys.modules, k, v)
        mp.setattr(backends, "tvF", fn, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BILINEAR: fn.InterpolationMode.BILINEAR}, raising=False)
        sys.modules.pop(name, None)
        module = importlib.import_module(name)
        yield module.Llama4ImageProcessor
    finally:
        sys.modules.pop(name, None)
        mp.undo()


def _reference(hf_cls, image, **kw):
    out = hf_cls(**kw)(images=[image], return_tensors="pt")
    return out["pixel_values"], [tuple(int(x) for x in r) for r in out["aspect_ratios"][0].reshape(-1, 2)]


@pytest.mark.parametrize("hw,grid,tiles,resized", [
    ((480, 640), (2, 2), 5, (480, 640)),      # LLAMA4_SPEC.md 4.1 worked examples
    ((1080, 1920), (3, 5), 16, (945, 1680)),
    ((200, 300), (1, 1), 1, (224, 336)),
])
def test_spec_worked_examples(hw, grid, tiles, resized):
    canvas = best_canvas(*hw, supported_canvases(16, 336))
    assert (canvas[0] // 336, canvas[1] // 336) == grid
    assert resized_size(*hw, canvas, 336) == resized
    img = np.zeros((*hw, 3), np.uint8)
    out = ImageProcessor()([img])
    assert out.pixel_values.shape == (tiles, 3, 336, 336) and out.pixel_values.dtype == ml_dtypes.bfloat16
    assert out.aspect_ratios == (grid,)
    ids = image_token_ids(grid, 144, dict(image_start=1, image_end=2, image=3, patch=4, tile_x=5, tile_y=6))
    assert ids.count(4) == tiles * 144  # 720 for 480x640, 2304 for 1080p, 144 for 200x300
    assert ids.count(5) == (grid[1] - 1) * grid[0] * (tiles > 1) and ids.count(6) == grid[0] * (tiles > 1)


def test_image_prompt_text_matches_transformers():
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    for grid in ((1, 1), (2, 3), (4, 1)):
        assert image_prompt(grid, 7) == Llama4Processor._prompt_split_image(None, grid, 7)


def test_resize_matches_torch_uint8_kernel():
    """Our integer resize vs torch's uint8 antialiased bilinear (what torchvision calls)."""
    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((97, 131), (41, 263)), ((480, 640), (336, 336)), ((33, 20), (336, 204)),
                           ((1000, 7), (3, 500)), ((336, 336), (200, 336))]:
        img = rng.integers(0, 256, (3, H, W), dtype=np.uint8)
        ref = torch.nn.functional.interpolate(torch.from_numpy(img)[None], size=[h, w], mode="bilinear",
                                              align_corners=False, antialias=True)[0].numpy()
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            np.testing.assert_array_equal(resize_bilinear_aa(img, (h, w)), ref)


@pytest.mark.parametrize("hw", [(480, 640), (200, 300), (1080, 1920), (17, 900), (2000, 333), (336, 336),
                                (337, 1009), (50, 50)])
def test_pixels_equal_transformers(hf_processor, hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    # Smooth content plus noise: resampling errors show up on both.
    y, x = np.mgrid[: hw[0], : hw[1]]
    img = ((np.sin(x / 13.0)[..., None] * 90 + np.cos(y / 7.0)[..., None] * 60 + 128)
           + rng.normal(0, 20, (*hw, 3))).clip(0, 255).astype(np.uint8)
    ref, ratios = _reference(hf_processor, img)
    ours = ImageProcessor()([img])
    assert ours.aspect_ratios == tuple(ratios)
    assert ours.pixel_values.shape == tuple(ref.shape)
    np.testing.assert_array_equal(ours.pixel_values.astype(np.float32), ref.float().numpy())


def test_pil_and_small_tiles_equal_transformers(hf_processor, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (120, 90, 4), dtype=np.uint8), "RGBA")  # alpha composited
    p = tmp_path / "x.png"
    img.save(p)
    ref, ratios = _reference(hf_processor, Image.open(p), size={"height": 42, "width": 42}, max_patches=6)
    ours = ImageProcessor(size=42, max_patches=6)([str(p)])
    assert ours.aspect_ratios == tuple(ratios)
    np.testing.assert_array_equal(ours.pixel_values.astype(np.float32), ref.float().numpy())


def test_bad_images_are_reported(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match=r"image 1: cannot read image .*notes\.png"):
        ImageProcessor()([np.zeros((10, 10, 3), np.uint8), str(bad)])
    with pytest.raises(ImageError, match=r"image 0: image file not found: .*missing\.jpg"):
        ImageProcessor()([str(tmp_path / "missing.jpg")])
    with pytest.raises(ImageError, match=r"uint8 RGB image"):
        ImageProcessor()([np.zeros((10, 10, 3), np.float32)])


def test_processor_from_checkpoint_matches_generate_rendering():
    """`Processor` (text-level expansion) and `generate` (token-level expansion) give the
    same ids and pixels for a chat prompt with two images on the shipped checkpoint."""
    import llama4_jax
    from llama4_jax.generate import DEFAULT_MODEL
    from llama4_jax.prompts import render_images
    from llama4_jax.processor import Processor

    proc = Processor.from_pretrained(DEFAULT_MODEL, backend="numpy")
    config = llama4_jax.load_config(DEFAULT_MODEL)
    assert proc.image_processor.size == 112 and proc.tokens_per_tile == 16
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, (150, 260, 3), dtype=np.uint8), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}]}]
    text = proc.apply_chat_template(msgs)
    assert text.count("<|image|>") == 2
    batch = proc([text, "plain text"], [imgs, []])
    parts = [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "Compare"}, {"type": "image", "image": imgs[1]}]
    ids, px = render_images([{"role": "user", "content": parts}], None, proc.tokenizer, config, "p", 8,
                             proc.image_processor)
    row = batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist()
    assert row == ids
    assert row.count(config.image_token_index) == (5 + 1) * 16  # 2x2 grid (max_patches 4) + global, and one tile
    np.testing.assert_array_equal(batch["pixel_values"].astype(np.float32), px.astype(np.float32))
    with pytest.raises(ValueError, match=r"prompt 0 has 2 <\|image\|> placeholders but 1 images"):
        proc([text], [imgs[:1]])


def test_tokenizer_load_is_quiet_about_llama4_rope_factors():
    """Llama 4 configs set low_freq_factor == high_freq_factor; transformers warns about
    it whenever a tokenizer is loaded from the checkpoint. `load_tokenizer` drops that
    warning, only for the load."""
    import logging

    import transformers

    from llama4_jax.generate import DEFAULT_MODEL

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, log, keep = [], logging.getLogger("transformers.modeling_rope_utils"), Keep()
    log.addHandler(keep)
    try:
        transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL, local_files_only=True)
        assert any("high_freq_factor" in m for m in seen)  # what a plain load logs
        seen.clear()
        tok = load_tokenizer(DEFAULT_MODEL)
        assert seen == []
    finally:
        log.removeHandler(keep)
    assert tok.decode(tok("12+34=")["input_ids"], skip_special_tokens=True) == "12+34="
    assert not log.filters
