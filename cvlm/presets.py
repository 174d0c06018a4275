"""Tiny backbones built locally, for tests and the offline default run: never downloaded.

Vision presets: `tiny-clip`, `tiny-siglip`. LM presets: `tiny-llama`, `tiny-qwen2`, sharing one
byte-level BPE tokenizer trained here with `tokenizers` on a small fixed corpus (deterministic).
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8

# ChatML over plain-string contents; the processor's template flattens image/text parts into it.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VISION = {
    "tiny-clip": (CLIPVisionConfig, CLIPImageProcessorPil, {}),
    "tiny-siglip": (SiglipVisionConfig, SiglipImageProcessorPil, {"vision_use_head": False}),
}
_LM = {
    "tiny-llama": (LlamaConfig, {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "tiny-qwen2": (Qwen2Config, {"num_key_value_heads": 1, "tie_word_embeddings": True}),
}
VISION_PRESETS = tuple(_VISION)
LM_PRESETS = tuple(_LM)


def _corpus() -> list[str]:
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink"]
    shapes = ["circle", "square", "triangle", "ring", "star", "cross", "digit", "letter", "object", "patch"]
    places = ["left", "right", "top", "bottom", "center", "corner", "above", "below", "next to", "inside"]
    lines = []
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            place = places[(i + j) % len(places)]
            lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
            lines.append(f"Is there a {colour} {shape} {place} the image? Yes. No. There are {i + j} of them.")
            lines.append(f"Describe the image: a {colour} background with a small {shape} at the {place}.")
    lines += [" ".join(str(n) for n in range(100)), "A. B. C. D. (A) (B) (C) (D) Answer with the option's letter."]
    return lines + list(_benchmark_lines())


@functools.cache
def _benchmark_lines() -> tuple[str, ...]:
    """The synthetic benchmark's questions, answers and ChatML roles, repeated so that BPE merges them:
    each answer and role is then one token (a 40-token training sample becomes ~20; an answer is decided
    by one token instead of spelled out letter by letter)."""
    import random

    from cvlm.eval.synthetic import SUBTASKS, Difficulty, make_item

    rng, questions, words = random.Random(0), set(), {"user", "assistant", "system", "Yes", "No"}
    for subtask in SUBTASKS:
        for _ in range(4):
            item = make_item(subtask, rng, Difficulty(image_size=32, object_size=3))
            questions.update([item.mcq_question, item.yes_question, item.no_question])
            words.update(item.options)
    return tuple(sorted(questions) * 10 + [word for word in sorted(words) for _ in range(30)])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-entry byte-level BPE tokenizer with `<image>` and ChatML tokens, trained in ~0.1 s."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def tiny_vision(name: str, image_size: int | None = None, seed: int = 0, width: int = 32, layers: int = 4):
    """(vision model, image processor) of a small random ViT with 8-px patches (default: width 32,
    4 layers, 32-px images -> a 4x4 grid)."""
    config_cls, processor_cls, extra = _VISION[name]
    size = image_size or TINY_IMAGE_SIZE
    config = config_cls(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=max(2, width // 64), image_size=size, patch_size=TINY_PATCH_SIZE, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    if processor_cls is CLIPImageProcessorPil:
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    return model, processor


def tiny_lm(name: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, width: int = 64, layers: int = 2):
    """A small random causal LM over `tokenizer`'s vocabulary (default: width 64, 2 layers, 4 heads).
    Weights start at standard deviation 1/sqrt(width), not transformers' 0.02: measured on the synthetic
    study (128 wide, 3 layers, 1000 steps), the fine-grained phase change then comes before step 1000
    (mlp at 32 px: fine 53.8 -> 82.5 %, reasoning 85.0 -> 95.0 %)."""
    config_cls, extra = _LM[name]
    config = config_cls(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=max(4, width // 64),
        vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
        initializer_range=width ** -0.5,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
