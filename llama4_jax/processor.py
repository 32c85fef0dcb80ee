"""Images -> tiles and prompt tokens, exactly as transformers' Llama 4 processor.

transformers' `Llama4ImageProcessor` exists only with a torchvision backend. Where
torchvision is installed, `Processor.from_pretrained(..., backend="transformers")` uses
`transformers.AutoProcessor` itself. This module is the numpy path, pixel-for-pixel
equal to that processor on x86 CPUs (tests/test_processor.py runs transformers' own
`_preprocess` beside it):

1. Canvases: every (h, w) * tile with h * w <= max_patches, in transformers' order.
2. Scale of a canvas: min(canvas_h / H, canvas_w / W) in float32 (transformers divides
   int64 tensors). Pick the smallest scale >= 1 (the largest with
   `resize_to_max_canvas`), else the largest scale < 1; ties -> smallest area.
3. Resize without distortion into (min(max(H, tile), canvas_h), min(max(W, tile), canvas_w))
   (never upsample past max(original, tile)), with floor.
4. Bilinear antialiased resize of the uint8 image with torch's fixed-point kernel
   (`_upsample_bilinear2d_aa` on uint8: PIL-style separable passes, horizontal first,
   int16 weights at the largest precision that fits, uint8 rounding between passes).
   torchvision takes that kernel on CPUs with AVX2/AVX512; elsewhere (GPU, older
   CPUs) transformers resizes in float and may differ by one grey level.
5. Pad right and bottom with 0; rescale (1/255) and normalize ((x - 0.5) / 0.5) in
   bfloat16 as transformers does (each op in fp32, rounded to bf16); 0 becomes -1.
6. Split into row-major tiles; with more than one tile, append the global tile (the
   whole image resized to tile x tile, with distortion) LAST.

Prompt expansion: every `<|image|>` becomes `<|image_start|>`, then for multi-tile
images each tile's `<|patch|>` run with `<|tile_x_separator|>` between columns and
`<|tile_y_separator|>` after each row, then `<|image|>` and the global tile's run,
then `<|image_end|>` (`image_prompt`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import defaultdict
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "ImageProcessor",
    "ProcessedImages",
    "Processor",
    "ImageError",
    "SPECIAL_TOKENS",
    "supported_canvases",
    "best_canvas",
    "resize_bilinear_aa",
    "image_prompt",
    "image_token_ids",
    "load_image",
    "special_token_ids",
    "expand_image_ids",
    "collect_message_images",
]

SPECIAL_TOKENS = {
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>",
}


class ImageError(ValueError):
    """An image that cannot be read or processed (names the file or the index)."""


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def supported_canvases(max_tiles: int, tile: int) -> tuple[tuple[int, int], ...]:
    """All (height, width) canvases of h x w tiles with h * w <= max_tiles, in pixels.

    The order is transformers' (grouped by aspect ratio in first-seen order, walking
    tile counts downwards), which decides ties between equal-area canvases.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for h in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[h / (n // h)].append((h, n // h))
    return tuple((h * tile, w * tile) for group in by_ratio.values() for h, w in group)


def best_canvas(height: int, width: int, canvases, resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas (h, w) in pixels an image of height x width is placed on (rule 2 above)."""
    c = np.asarray(canvases, np.int64)
    # float32 like transformers (int64 tensor / python int -> float32 tensor).
    sh = c[:, 0].astype(np.float32) / np.float32(height)
    sw = c[:, 1].astype(np.float32) / np.float32(width)
    scales = np.where(sh > sw, sw, sh)
    up = scales[scales >= 1]
    if up.size:
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    cand = c[scales == chosen]
    best = cand[np.argmin(cand[:, 0] * cand[:, 1])]  # first minimum, like torch.argmin
    return int(best[0]), int(best[1])


def _fit_without_distortion(height, width, target_h, target_w, f32_h: bool, f32_w: bool) -> tuple[int, int]:
    """Largest size with the image's aspect ratio inside (target_h, target_w), floored.

    transformers mixes python ints with 0-d int64 tensors here; a tensor target makes
    its scale float32, a python int makes it float64. f32_h / f32_w say which, so the
    floors agree bit for bit.
    """
    sw = np.float32(target_w) / np.float32(width) if f32_w else target_w / width
    sh = np.float32(target_h) / np.float32(height) if f32_h else target_h / height
    if f32_w or f32_h:  # torch compares in float32 when one side is a float32 tensor
        smaller_w = np.float32(sw) < np.float32(sh)
    else:
        smaller_w = sw < sh
    if smaller_w:
        prod = np.float32(height) * sw if f32_w else height * sw
        return min(math.floor(prod), target_h), target_w
    prod = np.float32(width) * sh if f32_h else width * sh
    return target_h, min(math.floor(prod), target_w)


def resized_size(height: int, width: int, canvas: tuple[int, int], tile: int,
                 resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """Size the image is resized to before padding onto `canvas` (rule 3 above)."""
    ch, cw = canvas
    if resize_to_max_canvas:
        th, tw, f32_h, f32_w = ch, cw, True, True
    else:
        # min(python int, tensor) returns the tensor only when it is strictly smaller.
        mh, mw = max(height, tile), max(width, tile)
        th, f32_h = (ch, True) if ch < mh else (mh, False)
        tw, f32_w = (cw, True) if cw < mw else (mw, False)
    h, w = _fit_without_distortion(height, width, th, tw, f32_h, f32_w)
    return max(h, 1), max(w, 1)


# --------------------------------------------------------------------------------------
# Resampling (torch's uint8 antialiased bilinear kernel)
# --------------------------------------------------------------------------------------

def _aa_int16_weights(n_in: int, n_out: int):
    """Per output index: first input index, and int16 weights with their precision.

    Triangle filter with support max(scale, 1), centred at scale * (i + 0.5), weights
    normalised in float64, then scaled by 2^prec and rounded half away from zero, prec
    the largest (< 22) for which the largest weight still fits in int16.
    """
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    ksize = int(math.ceil(support)) * 2 + 1
    xmin = np.zeros(n_out, np.int64)
    w = np.zeros((n_out, ksize), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(hi - lo)
        t = np.abs((j + lo - center + 0.5) * inv)
        wi = np.where(t < 1.0, 1.0 - t, 0.0)
        total = wi.sum()
        if total != 0.0:
            wi = wi / total
        w[i, : hi - lo] = wi
        xmin[i] = lo
    w_max = w.max()
    prec = 0
    while prec < 22 and int(0.5 + w_max * (1 << (prec + 1))) < (1 << 15):
        prec += 1
    wi16 = np.where(w < 0, np.trunc(-0.5 + w * (1 << prec)), np.trunc(0.5 + w * (1 << prec))).astype(np.int64)
    return xmin, wi16, prec


def _resample_axis(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """One separable pass over `axis` of a uint8 array, in exact integer arithmetic."""
    n_in = img.shape[axis]
    xmin, w, prec = _aa_int16_weights(n_in, n_out)
    k = w.shape[1]
    idx = np.minimum(xmin[:, None] + np.arange(k)[None, :], n_in - 1)  # out-of-range taps have weight 0
    x = np.moveaxis(img, axis, -1).astype(np.int64)
    acc = np.einsum("...ok,ok->...o", x[..., idx], w) + (1 << (prec - 1))
    out = np.clip(acc >> prec, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_bilinear_aa(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of uint8 [C, H, W] to [C, h, w] (torch's uint8 kernel).

    Horizontal pass first, then vertical, each rounded to uint8 (as PIL and torch do);
    a pass whose size does not change is skipped, an unchanged image returned as is.
    """
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"resize_bilinear_aa needs a uint8 [C, H, W] array, got {img.dtype} {img.shape}")
    h, w = size
    out = img
    if w != img.shape[2]:
        out = _resample_axis(out, w, axis=2)
    if h != img.shape[1]:
        out = _resample_axis(out, h, axis=1)
    return out


# --------------------------------------------------------------------------------------
# The image processor
# --------------------------------------------------------------------------------------

def pil_to_rgb(image) -> np.ndarray:
    """A PIL image -> uint8 RGB [H, W, 3], transparency composited onto white.

    The rule of transformers 5.23's `convert_to_rgb` (LLAMA4_SPEC's version), done with
    PIL here: that function warns on every call without `return_numpy=True`, and the
    releases before 5.23 that this package also runs with take no such argument and drop
    the alpha channel instead of compositing it.
    """
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def load_image(image) -> np.ndarray:
    """An image (path, PIL image, or uint8 [H, W, 3] / [H, W] array) -> uint8 RGB [3, H, W].

    PIL images are converted by `pil_to_rgb`, the conversion transformers' processor
    applies.
    """
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"cannot read image {path}: {e}") from None
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        arr = pil_to_rgb(image)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 RGB image [H, W, 3], got {arr.dtype} array of shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
    """pixel_values: [N_tiles, 3, S, S] bfloat16 (all tiles of all images, in order);
    aspect_ratios: (rows, cols) tile grid of each image; tiles: tiles per image
    (rows * cols, plus one global tile when that exceeds 1)."""

    pixel_values: np.ndarray
    aspect_ratios: tuple[tuple[int, int], ...]
    tiles: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Numpy Llama 4 image processor (transformers' `Llama4ImageProcessor` defaults)."""

    size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageProcessor":
        """From a `preprocessor_config.json` dict; unsupported settings raise."""
        size = d.get("size") or {"height": 336, "width": 336}
        if size.get("height") != size.get("width"):
            raise ImageError(f"preprocessor size must be square, got {size}")
        for k, ok in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("resample", 2)):
            if k in d and d[k] is not None and d[k] != ok:
                raise ImageError(f"preprocessor_config: {k}={d[k]!r} is not supported (only {ok!r})")
        return cls(
            size=int(size["height"]),
            max_patches=int(d.get("max_patches", 16)),
            resize_to_max_canvas=bool(d.get("resize_to_max_canvas", False)),
            image_mean=tuple(float(x) for x in d.get("image_mean", (0.5,) * 3)),
            image_std=tuple(float(x) for x in d.get("image_std", (0.5,) * 3)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    def _normalize(self, x_u8: np.ndarray) -> np.ndarray:
        """uint8 [..., 3, H, W] -> bfloat16, as transformers: bf16(x) * (1/255), - mean, / std,
        each op computed in fp32 and rounded to bf16."""
        import ml_dtypes

        bf16 = ml_dtypes.bfloat16
        x = x_u8.astype(bf16).astype(np.float32)
        x = (x * np.float32(self.rescale_factor)).astype(bf16).astype(np.float32)
        mean = np.asarray(self.image_mean, bf16).astype(np.float32)[:, None, None]
        std = np.asarray(self.image_std, bf16).astype(np.float32)[:, None, None]
        x = (x - mean).astype(bf16).astype(np.float32)
        return (x / std).astype(bf16)

    def process_one(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (tiles [n, 3, S, S] bfloat16, (rows, cols))."""
        img = load_image(image)
        _, H, W = img.shape
        S = self.size
        canvas = best_canvas(H, W, supported_canvases(self.max_patches, S), self.resize_to_max_canvas)
        h, w = resized_size(H, W, canvas, S, self.resize_to_max_canvas)
        x = resize_bilinear_aa(img, (h, w))
        padded = np.zeros((3, *canvas), np.uint8)
        padded[:, :h, :w] = x
        rows, cols = canvas[0] // S, canvas[1] // S
        tiles = self._normalize(padded).reshape(3, rows, S, cols, S).transpose(1, 3, 0, 2, 4).reshape(-1, 3, S, S)
        if rows * cols > 1:
            glob = self._normalize(resize_bilinear_aa(img, (S, S)))[None]
            tiles = np.concatenate([tiles, glob], axis=0)
        return tiles, (rows, cols)

    def __call__(self, images: Sequence) -> ProcessedImages:
        """A flat list of images (paths, PIL images or uint8 [H, W, 3] arrays)."""
        import ml_dtypes

        tiles, ratios = [], []
        for i, im in enumerate(images):
            try:
                t, r = self.process_one(im)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
            tiles.append(t)
            ratios.append(r)
        pv = np.concatenate(tiles) if tiles else np.zeros((0, 3, self.size, self.size), ml_dtypes.bfloat16)
        return ProcessedImages(pv, tuple(ratios), tuple(len(t) for t in tiles))


def image_prompt(aspect_ratio: tuple[int, int], tokens_per_tile: int) -> str:
    """The text an `<|image|>` placeholder expands to (transformers' `_prompt_split_image`)."""
    t = SPECIAL_TOKENS
    rows, cols = aspect_ratio
    s = t["image_start"]
    if rows * cols > 1:
        for _ in range(rows):
            s += t["tile_x"].join([t["patch"] * tokens_per_tile] * cols) + t["tile_y"]
    return s + t["image"] + t["patch"] * tokens_per_tile + t["image_end"]


def image_token_ids(aspect_ratio: tuple[int, int], tokens_per_tile: int, ids: Mapping[str, int]) -> list[int]:
    """`image_prompt` as token ids; ids maps the keys of SPECIAL_TOKENS to token ids."""
    rows, cols = aspect_ratio
    out = [ids["image_start"]]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [ids["patch"]] * tokens_per_tile
                if c < cols - 1:
                    out.append(ids["tile_x"])
            out.append(ids["tile_y"])
    return out + [ids["image"]] + [ids["patch"]] * tokens_per_tile + [ids["image_end"]]


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the image special tokens (keys of SPECIAL_TOKENS) in `tokenizer`'s vocabulary."""
    ids = {}
    for k, tok in SPECIAL_TOKENS.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == getattr(tokenizer, "unk_token_id", None):
            raise ImageError(f"the tokenizer has no {tok} token, so it cannot take images")
        ids[k] = int(i)
    return ids


def expand_image_ids(ids: Sequence[int], aspect_ratios: Sequence[tuple[int, int]], tokens_per_tile: int,
                     special: Mapping[str, int]) -> list[int]:
    """Replace the k-th `<|image|>` id of a tokenized prompt with image k's token layout.

    Token-level expansion equals transformers' text-level one: special tokens always
    tokenize to themselves and split the text around them. Raises ImageError when the
    placeholder count differs from the number of images.
    """
    n = sum(1 for t in ids if t == special["image"])
    if n != len(aspect_ratios):
        raise ImageError(f"the prompt has {n} {SPECIAL_TOKENS['image']} placeholder(s) but {len(aspect_ratios)} "
                         f"image(s)")
    out, k = [], 0
    for t in ids:
        if t == special["image"]:
            out += image_token_ids(aspect_ratios[k], tokens_per_tile, special)
            k += 1
        else:
            out.append(int(t))
    return out


_IMAGE_KEYS = ("image", "path", "url")


def collect_message_images(messages: Sequence[Mapping]) -> tuple[list[dict], list]:
    """Chat messages with image parts -> (messages with each image part replaced by a
    text part holding `<|image|>`, the image sources in order).

    Image parts are {"type": "image", "image" | "path" | "url": source}; a source is a
    local path, a PIL image or a uint8 array. Rendering the placeholder as text works
    with any chat template that renders text parts.
    """
    out, sources = [], []
    for j, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(dict(m))
            continue
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image":
                src = next((part[k] for k in _IMAGE_KEYS if k in part), None)
                if src is None:
                    raise ImageError(f"message {j}: an image part needs one of {list(_IMAGE_KEYS)}, got {dict(part)}")
                sources.append(src)
                parts.append({"type": "text", "text": SPECIAL_TOKENS["image"]})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, sources


# --------------------------------------------------------------------------------------
# Text + images
# --------------------------------------------------------------------------------------

def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


class _SameFreqFactorsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "high_freq_factor field must be greater than low_freq_factor" not in record.getMessage()


def load_tokenizer(path: str | os.PathLike, *, processor: bool = False):
    """`transformers.AutoTokenizer` (or `AutoProcessor` with processor=True) from a
    checkpoint directory, local files only.

    transformers reads config.json to pick the class and validates its rope fields on
    the way. Llama 4 checkpoints, Meta's included, set llama3 rope scaling with
    low_freq_factor == high_freq_factor == 1.0, which its validator warns about though
    the scaling is well defined (no smoothing band: wavelengths up to the original
    context keep their frequency, longer ones are divided by `factor`; LLAMA4_SPEC).
    That warning says nothing about the tokenizer, so this load filters it out.
    """
    import transformers

    auto = transformers.AutoProcessor if processor else transformers.AutoTokenizer
    log, quiet = logging.getLogger("transformers.modeling_rope_utils"), _SameFreqFactorsFilter()
    log.addFilter(quiet)
    try:
        return auto.from_pretrained(os.fspath(path), local_files_only=True)
    finally:
        log.removeFilter(quiet)


class Processor:
    """Tokenizer + image processor: prompts with images -> model inputs.

    `from_pretrained(path)` reads the tokenizer (`AutoTokenizer`, local files only) and
    `preprocessor_config.json` from a checkpoint directory. backend="transformers"
    delegates everything to `transformers.AutoProcessor` (needs torchvision);
    "numpy" uses `ImageProcessor`; "auto" picks transformers when torchvision exists.
    """

    def __init__(self, tokenizer, image_processor: ImageProcessor | None = None, *, tokens_per_tile: int = 144,
                 hf_processor=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.tokens_per_tile = tokens_per_tile
        self.hf_processor = hf_processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, backend: str = "auto") -> "Processor":
        from .config import load_config
        from .model.vision import tokens_per_tile

        path = os.fspath(path)
        if backend not in ("auto", "numpy", "transformers"):
            raise ValueError(f"backend must be 'auto', 'numpy' or 'transformers', got {backend!r}")
        config = load_config(path)
        per_tile = tokens_per_tile(config.vision) if config.vision is not None else 144
        use_hf = backend == "transformers" or (backend == "auto" and _torchvision_available())
        if use_hf:
            hf = load_tokenizer(path, processor=True)
            return cls(hf.tokenizer, None, tokens_per_tile=per_tile, hf_processor=hf)
        tok = load_tokenizer(path)
        pre = os.path.join(path, "preprocessor_config.json")
        ip = ImageProcessor()
        if os.path.exists(pre):
            with open(pre) as f:
                ip = ImageProcessor.from_dict(json.load(f))
        return cls(tok, ip, tokens_per_tile=per_tile)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        """Chat messages (content may list {"type": "image"} entries) -> prompt text with
        one `<|image|>` per image, through the checkpoint's chat template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, texts: Sequence[str], images: Sequence[Sequence] | None = None, *,
                 add_special_tokens: bool = False) -> dict[str, np.ndarray]:
        """Prompts (one `<|image|>` per image) and their images -> left-padded inputs.

        Returns input_ids / attention_mask int32 [B, T] and, when there are images,
        pixel_values bfloat16 [N_tiles, 3, S, S] (all tiles, prompt by prompt).
        """
        images = [list(x) for x in images] if images is not None else [[] for _ in texts]
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(images)} image lists")
        marker = SPECIAL_TOKENS["image"]
        for i, (t, ims) in enumerate(zip(texts, images)):
            if t.count(marker) != len(ims):
                raise ValueError(f"prompt {i} has {t.count(marker)} {marker} placeholders but {len(ims)} images")
        flat = [im for ims in images for im in ims]
        if self.hf_processor is not None:
            return self._call_hf(texts, flat, add_special_tokens)
        proc = self.image_processor(flat)
        expanded, k = [], 0
        for t in texts:
            parts = t.split(marker)
            s = parts[0]
            for p in parts[1:]:
                s += image_prompt(proc.aspect_ratios[k], self.tokens_per_tile) + p
                k += 1
            expanded.append(s)
        enc = [self.tokenizer(s, add_special_tokens=add_special_tokens)["input_ids"] for s in expanded]
        out = _left_pad(enc, self.tokenizer.pad_token_id or 0)
        if flat:
            out["pixel_values"] = proc.pixel_values
        return out

    def _call_hf(self, texts, flat, add_special_tokens):
        import ml_dtypes

        res = self.hf_processor(text=list(texts), images=flat or None, add_special_tokens=add_special_tokens,
                                padding=True, padding_side="left", return_tensors="pt")
        out = {"input_ids": res["input_ids"].numpy().astype(np.int32),
               "attention_mask": res["attention_mask"].numpy().astype(np.int32)}
        if flat:
            out["pixel_values"] = res["pixel_values"].float().numpy().astype(ml_dtypes.bfloat16)
        return out


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    T = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}
