"""ConnectorVLMProcessor: an HF image processor + a tokenizer with a real `<image>` token.

Each `<image>` in the text becomes `num_image_tokens` copies, the value saved from the model
config's `num_image_tokens` (the connector's answer for the configured grid); the model checks
the same count when it writes the image features into those positions.
"""

from __future__ import annotations

from transformers import ProcessorMixin
from transformers.image_utils import is_pil_image, make_flat_list_of_images
from transformers.processing_utils import MultiModalData

from .image_conversion import to_rgb


class ConnectorVLMProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        **kwargs,
    ):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens={num_image_tokens!r} is invalid: pass the model config's num_image_tokens "
                "(a positive int), e.g. ConnectorVLMProcessor(..., num_image_tokens=model.config.num_image_tokens)."
            )
        self.num_image_tokens = num_image_tokens
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {self.image_token!r} token: add it as a special token and resize the LM's "
                "embeddings (cvlm build does both)."
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    to_rgb = staticmethod(to_rgb)  # the one image conversion of the family, for callers that open files themselves

    def __call__(self, images=None, text=None, **kwargs):
        """As ProcessorMixin, with every PIL image made RGB by `to_rgb` first (16-bit, alpha, palette and
        CMYK pictures handled the same way on every path)."""
        return super().__call__(images=_rgb_images(images), text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What one <image> becomes: Q copies of it. The one owner of the expansion, for inference
        (`__call__`) and training (`expand_image_tokens`) alike."""
        return self.image_token * self.num_image_tokens

    def expand_image_tokens(self, text: str) -> str:
        """`text` with each <image> expanded as `__call__` expands it. Training tokenizes each prompt and
        answer apart (to mask the prompts in the labels), so it expands text here rather than in `__call__`."""
        parts = text.split(self.image_token)
        return parts[0] + "".join(self.replace_image_token({}, i) + part for i, part in enumerate(parts[1:]))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**data)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """As the base class, but a mismatch between <image> tokens and images names the sample."""
        if text is not None and images is not None:
            texts = [text] if isinstance(text, str) else list(text)
            counts = [t.count(self.image_token) if isinstance(t, str) else 0 for t in texts]
            per_sample = (
                isinstance(images, (list, tuple))
                and len(images) == len(texts)
                and all(isinstance(x, (list, tuple)) for x in images)
            )
            if per_sample:
                for i, (count, sample_images) in enumerate(zip(counts, images)):
                    if count != len(sample_images):
                        raise ValueError(
                            f"Sample {i} has {count} {self.image_token} token(s) but {len(sample_images)} image(s). "
                            f"Put one {self.image_token} in the text for each image of that sample."
                        )
            else:
                n_images = len(make_flat_list_of_images(images))
                if sum(counts) != n_images:
                    if n_images == len(texts):  # the usual one-image-per-sample batch
                        bad = [i for i, c in enumerate(counts) if c != 1]
                        where = ", ".join(f"sample {i} has {counts[i]}" for i in bad)
                        raise ValueError(
                            f"{n_images} images for {len(texts)} samples, one each, but {where} "
                            f"{self.image_token} token(s). Put exactly one {self.image_token} in each sample's text."
                        )
                    raise ValueError(
                        f"The text has {sum(counts)} {self.image_token} token(s) in all (per sample: {counts}) but "
                        f"{n_images} image(s) were passed. Each {self.image_token} takes one image, in order; "
                        "pass images as one list per sample to see which sample differs."
                    )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


def _rgb_images(images):
    if is_pil_image(images):
        return to_rgb(images)
    if isinstance(images, (list, tuple)):
        return [_rgb_images(image) for image in images]
    return images


__all__ = ["ConnectorVLMProcessor"]
