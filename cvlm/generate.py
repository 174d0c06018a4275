"""Answering prompts with any checkpoint of the family, through the Auto classes users take."""

from __future__ import annotations

import os

import torch
from PIL import Image

from cvlm.eval.runner import chat_prompt
from cvlm.files import open_image
from cvlm.loading import load_checkpoint
from cvlm.modeling.image_conversion import to_rgb


def demo_image(size: int = 64) -> Image.Image:
    """A deterministic test picture: a blue background with a red square and a yellow disc."""
    image = Image.new("RGB", (size, size), (40, 70, 200))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            if size // 8 <= x < size // 2 and size // 8 <= y < size // 2:
                pixels[x, y] = (220, 30, 30)
            elif (x - 3 * size // 4) ** 2 + (y - 3 * size // 4) ** 2 < (size // 8) ** 2:
                pixels[x, y] = (240, 220, 40)
    return image


def generate(model_id: str, prompt: str, images=None, max_new_tokens: int = 32, trust_remote_code: bool = False) -> list[str]:
    """Greedy answers to one prompt about `images` (paths or PIL images; None for text only)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens!r} is invalid: use a whole number of at least 1.")
    if not prompt or not prompt.strip():
        raise ValueError("--prompt is empty: ask a question.")
    images = [open_image(i, where="--image") if isinstance(i, (str, os.PathLike)) else to_rgb(i) for i in (images or [])]
    model, processor = load_checkpoint(model_id, trust_remote_code)
    text = chat_prompt(processor, prompt, len(images))
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)
