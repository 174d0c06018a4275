"""Helpers shared by the tests: inputs, prompts, and a reference decoder."""

from __future__ import annotations

import torch
from PIL import Image

from cvlm.modeling import CONNECTORS
from cvlm.presets import LM_PRESETS, VISION_PRESETS
from cvlm.trainers.toy_data import write_colour_dataset as make_llava_data  # noqa: F401 (used by tests)

# Every registered connector x every tiny vision preset x every tiny LM preset.
COMBOS = [(v, l, c) for c in CONNECTORS for v in VISION_PRESETS for l in LM_PRESETS]
COMBO_IDS = ["-".join(combo) for combo in COMBOS]


def picture(colour, size=48) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def chat_prompt(processor, question: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def model_inputs(processor, questions=("What colour is the square?",), colours=((200, 30, 30),)):
    texts = [chat_prompt(processor, q) for q in questions]
    images = [picture(c) for c in colours]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def greedy_no_cache(model, inputs, max_new_tokens: int) -> torch.Tensor:
    """Reference decoder: re-runs the whole sequence (image included) each step, no KV cache. Like
    generate(..., min_new_tokens=max_new_tokens), it never ends early: the end-of-sequence tokens are
    suppressed too."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos = model.generation_config.eos_token_id
    suppressed = list(model.generation_config.suppress_tokens or []) + ([eos] if isinstance(eos, int) else list(eos or []))
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False).logits
        next_logits = logits[:, -1].clone()
        next_logits[:, suppressed] = float("-inf")
        next_id = next_logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)
    return ids
