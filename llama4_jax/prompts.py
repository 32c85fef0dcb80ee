"""Prompts to token ids: text, chat messages, token ids, and images.

    ids = render(prompt, tokenizer, "prompt 0")
    ids, pixel_values = render_images(prompt, images, tokenizer, config, "prompt 0", max_images=8)

Image files are untrusted input: `check_image_file` reads only the header and refuses
an image of more than `max_pixels` pixels (our limit, `DEFAULT_MAX_IMAGE_PIXELS` unless
told otherwise) before any pixel is decoded, and PIL's `DecompressionBombWarning` is an
error while images are read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings

import numpy as np

from .config import Llama4Config

__all__ = ["render", "render_images", "image_processor_for", "check_image_file", "DEFAULT_MAX_IMAGE_PIXELS"]

# 40 megapixels (e.g. 8000 x 5000; ~120 MB as RGB). Llama 4's largest canvas is 16 tiles
# of 336 px (1344 x 1344 = 1.8 MP), so larger images only cost memory and time to resize.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def render(prompt, tokenizer, where: str) -> list[int]:
    """Token ids of one prompt: a string, a list of chat messages, or token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{where} is text, which needs a tokenizer (pass tokenizer=...)")
        ids = tokenizer(prompt)["input_ids"]
    elif is_messages(prompt):
        if tokenizer is None:
            raise ValueError(f"{where} is chat messages, which need a tokenizer (pass tokenizer=...)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where} is chat messages, but the tokenizer has no chat template")
        for j, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"{where}, message {j}: expected {{'role': str, 'content': ...}}, got {m!r}")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        # The template writes the special tokens itself (<|begin_of_text|> included).
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"{where} must be a string, a list of chat messages or a list of token ids, "
                         f"got {type(prompt).__name__}: {str(prompt)[:80]!r}")
    if not ids:
        raise ValueError(f"{where} is empty")
    return list(ids)


def is_messages(prompt) -> bool:
    """A non-empty list of chat message dicts."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


@contextlib.contextmanager
def _bombs_are_errors():
    """PIL's DecompressionBombWarning (an image past PIL.Image.MAX_IMAGE_PIXELS) raised as an error."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def check_image_file(path, max_pixels: int) -> None:
    """Refuse an image file of more than `max_pixels` pixels, from its header only.

    Raises `processor.ImageError` naming the path: missing or unreadable files, images
    over the limit, and PIL's decompression-bomb warning or error.
    """
    from PIL import Image, UnidentifiedImageError

    from .processor import ImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(f"image file not found: {path}")
    try:
        with _bombs_are_errors(), Image.open(path) as im:  # lazy: reads the header, decodes nothing
            w, h = im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"image {path} refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    if w * h > max_pixels:
        raise ImageError(f"image {path} has {w} x {h} = {w * h} pixels, more than the limit of {max_pixels} "
                         "(max_image_pixels)")


def render_images(prompt, images, tokenizer, config: Llama4Config, where: str, max_images: int,
                  image_processor=None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """(ids, pixel_values) of a prompt with images; pixel_values None without images.

    Images come from `images` (a list of paths, PIL images or uint8 arrays) or from
    image parts of chat messages ({"type": "image", "path": ...}), not both. Each
    image takes the place of one `<|image|>` placeholder (a text prompt without any gets
    them in front), which expands to its tiles' token layout. Image files are checked
    against `max_pixels` (`check_image_file`) before any of them is decoded, and
    in-memory images against the same limit.
    """
    from .model.vision import tokens_per_tile
    from .processor import (SPECIAL_TOKENS, ImageError, ImageProcessor, collect_message_images, expand_image_ids,
                            special_token_ids)

    images = list(images or [])
    try:
        if is_messages(prompt):
            prompt, found = collect_message_images(prompt)
            if found and images:
                raise ImageError("give images either as image parts of the messages or as a separate list, not both")
            images = images or found
        if not images:
            return render(prompt, tokenizer, where), None
        if config.vision is None:
            raise ImageError(f"{len(images)} image(s) given, but the checkpoint has no vision tower "
                             f"({config.architecture})")
        if len(images) > max_images:
            raise ImageError(f"{len(images)} images, more than the limit of {max_images} per prompt "
                             f"(max_images_per_prompt)")
        if tokenizer is None:
            raise ImageError("images need a tokenizer (for the image special tokens)")
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                check_image_file(im, max_pixels)
            else:
                size = getattr(im, "size", None) if hasattr(im, "mode") else np.shape(im)[:2]
                if size is not None and int(np.prod(size)) > max_pixels:
                    raise ImageError(f"an image of {int(np.prod(size))} pixels, more than the limit of "
                                     f"{max_pixels} (max_image_pixels)")
        if isinstance(prompt, str) and SPECIAL_TOKENS["image"] not in prompt:
            prompt = SPECIAL_TOKENS["image"] * len(images) + prompt
        ids = render(prompt, tokenizer, where)
        proc = image_processor or ImageProcessor(size=config.vision.image_size)
        with _bombs_are_errors():
            out = proc(images)
        ids = expand_image_ids(ids, out.aspect_ratios, tokens_per_tile(config.vision), special_token_ids(tokenizer))
    except ImageError as e:
        raise ValueError(f"{where}: {e}") from None
    return ids, out.pixel_values


@functools.lru_cache(maxsize=4)
def image_processor_for(model_dir: str, config: Llama4Config):
    """The checkpoint's image processor (preprocessor_config.json), None without vision."""
    from .processor import ImageProcessor

    if config.vision is None:
        return None
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            return ImageProcessor.from_dict(json.load(f))
    return ImageProcessor(size=config.vision.image_size)
