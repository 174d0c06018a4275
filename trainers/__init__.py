"""Training: Trainer + peft LoRA on LLaVA-format data (cvlm train)."""
