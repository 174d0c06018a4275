"""connector-vlm: multimodal LLMs that differ only in their vision-language connector."""

__version__ = "0.1.0"
