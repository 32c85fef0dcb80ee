"""Llama Guard 4 as a safety classifier: conversations in, verdicts out.

    config, params = llama4_jax.load("Llama-Guard-4-12B", dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained("Llama-Guard-4-12B", local_files_only=True)
    verdicts = safety.classify(config, params, [
        [{"role": "user", "content": "How do I bake bread?"}],                 # the prompt
        [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],  # a reply
    ], tokenizer=tokenizer)
    verdicts[0].label, verdicts[0].categories        # "safe", () / "unsafe", ("S1", "S9")
    # a generate prompt (string or messages, images too) and its completion, as Llama Guard reads them
    safety.conversation("How do I bake bread?", completion="Mix flour and water...")

Llama Guard 4 (`preset("llama-guard-4")`) is a dense `Llama4ForConditionalGeneration`
that answers, for the last turn of a conversation rendered through its own chat template
(which lists the hazard categories and asks for an assessment), `safe`, or `unsafe` and a
second line of comma-separated categories `S1`..`S14` (`CATEGORIES`). `classify` renders
each conversation with the checkpoint's chat template, runs the batched greedy
`llama4_jax.generate` (images too, as `{"type": "image", "path": ...}` message parts),
and parses the answer with `parse_verdict`. `conversation` turns a `llama4_jax.generate`
prompt (and its completion) into the conversation to classify; `llama4-jax generate
--safety-model DIR` uses it to record a verdict for each prompt and/or completion.

Real verdicts need the real checkpoint (`meta-llama/Llama-Guard-4-12B`, its weights and
its tokenizer with the chat template); the tests use a tiny random model of the same
shape and a model whose greedy output is forced, which check the plumbing and the
parsing, not the judgement.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

from .prompts import DEFAULT_MAX_IMAGE_PIXELS

__all__ = ["CATEGORIES", "Verdict", "parse_verdict", "conversation", "render", "classify"]

# The MLCommons hazard taxonomy Llama Guard 4 is trained on, plus code interpreter abuse.
CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy",
    "S8": "Intellectual Property", "S9": "Indiscriminate Weapons", "S10": "Hate",
    "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections", "S14": "Code Interpreter Abuse",
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One classification.

    label: "safe", "unsafe", or "invalid" when the model's answer is neither (never
    read as safe). categories: the violated categories of an unsafe verdict, in the
    order given (may be empty if the model named none). text: the model's answer.
    """

    label: str
    categories: tuple[str, ...]
    text: str

    @property
    def safe(self) -> bool:
        return self.label == "safe"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"label": ..., "categories": [...]} plus "text" unless safe."""
        d: dict[str, Any] = {"label": self.label, "categories": list(self.categories)}
        if self.label != "safe":
            d["text"] = self.text
        return d


_CATEGORY = re.compile(r"^S(\d+)$")


def parse_verdict(text: str) -> Verdict:
    """Parse Llama Guard's answer: "safe", or "unsafe" then a line like "S1,S9".

    Whitespace around lines and items is ignored and the first word is case-insensitive.
    Anything else (an empty answer, another first word, a category outside S1..S14, text
    after the categories) is "invalid": a classifier whose output cannot be read must
    not pass content as safe.
    """
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    invalid = Verdict("invalid", (), text)
    if not lines:
        return invalid
    head = lines[0].lower()
    if head == "safe":
        return Verdict("safe", (), text) if len(lines) == 1 else invalid
    if head != "unsafe" or len(lines) > 2:
        return invalid
    cats = tuple(c.strip() for c in lines[1].split(",")) if len(lines) == 2 else ()
    for c in cats:
        m = _CATEGORY.match(c)
        if not m or c not in CATEGORIES:
            return invalid
    return Verdict("unsafe", cats, text)


def _check_conversation(conv, where: str) -> None:
    if not isinstance(conv, (list, tuple)) or not conv:
        raise ValueError(f"{where} must be a non-empty list of messages, got {type(conv).__name__}")
    for j, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"{where}, message {j}: expected {{'role': str, 'content': ...}}, got {m!r}")
    if conv[-1]["role"] not in ("user", "assistant"):
        raise ValueError(f"{where}: the last message is classified, so it must be the user's or the assistant's, "
                         f"got role {conv[-1]['role']!r}")


def conversation(prompt, completion: str | None = None, *, images: Sequence | None = None,
                 with_images: bool = True) -> list[dict]:
    """The conversation Llama Guard classifies for a generation prompt, and its completion.

    prompt: a string (one user turn) or chat messages, as `llama4_jax.generate` takes
      them. Only user and assistant turns are kept (Llama Guard's template reads those
      two roles; a system prompt is the deployer's, not the content classified).
    completion: the model's reply, appended as an assistant turn (then the reply is
      what is classified, in the context of the prompt); None classifies the prompt.
    images: the prompt's images (paths, PIL images or arrays), placed as generate places
      them: the k-th fills the k-th `<|image|>` placeholder of the text, or, for a string
      prompt without placeholders, all of them come first. Image parts of the messages
      are kept as they are.
    with_images: False leaves every image and placeholder out (a classifier with no
      vision tower judges the text alone).

    Every message's content is a list of {"type": "text" | "image", ...} parts, the form
    Llama Guard 4's chat template reads. Raises ValueError when images and placeholders
    do not pair up, or no user or assistant turn is left.
    """
    from .processor import SPECIAL_TOKENS

    mark = SPECIAL_TOKENS["image"]
    images = list(images or ())
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": mark * len(images) + prompt if images and mark not in prompt
                     else prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise TypeError(f"prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")
    if completion is not None and not isinstance(completion, str):
        raise TypeError(f"completion must be a string, got {type(completion).__name__}")
    pending = list(reversed(images))
    turns = []
    for m in messages:
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or ())
        out = []
        for p in parts:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and images:
                pieces = p["text"].split(mark)
                for k, piece in enumerate(pieces):
                    if k:  # a placeholder stood here
                        if not pending:
                            raise ValueError(f"the prompt has more {mark} placeholders than its {len(images)} "
                                             "image(s)")
                        img = pending.pop()
                        if with_images:
                            out.append({"type": "image", "path" if isinstance(img, (str, os.PathLike))
                                        else "image": img})
                    if piece or len(pieces) == 1:
                        out.append({"type": "text", "text": piece})
            elif isinstance(p, dict) and p.get("type") == "image":
                if with_images:
                    out.append(p)
            else:
                out.append(p)
        if m.get("role") in ("user", "assistant"):
            turns.append({"role": m["role"], "content": out})
    if pending:
        raise ValueError(f"the prompt has {len(images)} image(s) but {len(images) - len(pending)} {mark} "
                         "placeholder(s)")
    if not turns:
        raise ValueError("the prompt has no user or assistant message to classify")
    if completion is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": completion}]})
    return turns


def render(conversation, tokenizer, **template_kwargs) -> str:
    """The classifier's prompt text for one conversation: the tokenizer's chat template
    with the generation prompt (template_kwargs go to the template, e.g. Llama Guard 4's
    `excluded_category_keys=["S6"]`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: load the classifier's own tokenizer "
                         "(Llama Guard 4's template lists the categories and asks for the verdict)")
    return tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)


def classify(config, params, conversations: Sequence, *, tokenizer, batch_size: int = 8, max_new_tokens: int = 16,
             image_processor=None, max_images_per_prompt: int = 8, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, mesh=None,
             rules=None, template_kwargs: dict | None = None) -> list[Verdict]:
    """Classify the last turn of each conversation; one `Verdict` per conversation.

    conversations: lists of chat messages ({"role": "user" | "assistant", "content": str
      or a list of {"type": "text", "text": ...} / {"type": "image", "path": ...} parts}).
      A user prompt alone is classified as a prompt, a user prompt and the assistant's
      reply as a response.
      Images are image parts; each is rendered as an `<|image|>` placeholder where it
      stands and expanded to its tiles' tokens.
    tokenizer: the classifier's tokenizer, with its chat template.
    batch_size, image_processor, max_images_per_prompt, max_image_pixels, mesh, rules:
      as for `llama4_jax.generate`, which runs the classifier (greedy: Llama Guard's
      answer is a few tokens, `max_new_tokens`).
    template_kwargs: extra variables for the chat template.
    """
    from .generate import generate
    from .processor import ImageError, collect_message_images

    if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
        raise TypeError(f"conversations must be a list of conversations, got {type(conversations).__name__}")
    prompts, all_images = [], []
    for i, conv in enumerate(conversations):
        _check_conversation(conv, f"conversation {i}")
        try:
            conv, found = collect_message_images(conv)  # image parts become <|image|> placeholders
        except ImageError as e:
            raise ValueError(f"conversation {i}: {e}") from None
        text = render(conv, tokenizer, **(template_kwargs or {}))
        # The template writes the special tokens itself (<|begin_of_text|> included).
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        all_images.append(found or None)
    outs = generate(config, params, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, images=all_images if any(all_images) else None,
                    image_processor=image_processor, max_images_per_prompt=max_images_per_prompt,
                    max_image_pixels=max_image_pixels, mesh=mesh, rules=rules)
    return [parse_verdict(o.text) for o in outs]

