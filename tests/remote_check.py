"""Loads checkpoints the way a stranger does, in a process where connector-vlm cannot be imported.

Usage: python remote_check.py JOB.json     (what the tests run)
       python remote_check.py FOLDER       (one checkpoint: load it and answer a question about a picture)
JOB.json: {"checkpoints": [{"path": ..., "inputs": "inputs.safetensors", "output": "out.safetensors"}],
           "max_new_tokens": 5}
For each checkpoint: AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor with
trust_remote_code=True; writes the logits of both Auto classes, the greedy generation, the
processor's input_ids for a chat prompt, and every state-dict tensor to `output` (safetensors).
Imports only the standard library, torch, transformers and safetensors.
"""

import importlib.abc
import json
import os
import sys


class _BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cvlm" or name.startswith("cvlm."):
            raise ImportError(f"{name} is blocked: this process must not see connector-vlm")
        return None


sys.meta_path.insert(0, _BlockProject())
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.abspath(os.path.dirname(__file__) + "/..")]


def main(job_path: str) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "run with HF_HUB_OFFLINE=1"
    try:
        import cvlm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("connector-vlm is importable here; the check would prove nothing")

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    job = json.loads(open(job_path).read())
    for item in job["checkpoints"]:
        path = item["path"]
        inputs = load_file(item["inputs"])
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        assert config.model_type == "connector_vlm", config.model_type
        assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
        model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        model_i2t = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        out = {}
        with torch.no_grad():
            out["logits_automodel"] = model(**inputs).logits
            out["logits_image_text_to_text"] = model_i2t(**inputs).logits
            out["generated"] = model_i2t.generate(
                **inputs, max_new_tokens=job["max_new_tokens"], min_new_tokens=job["max_new_tokens"], do_sample=False
            )
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
            add_generation_prompt=True,
        )
        image = Image.new("RGB", (40, 40), (200, 30, 30))
        processed = processor(images=[image], text=[text], return_tensors="pt")
        out["processor_input_ids"] = processed["input_ids"]
        out["processor_pixel_values"] = processed["pixel_values"]
        out["num_image_tokens"] = torch.tensor(config.num_image_tokens)
        for name, tensor in model_i2t.state_dict().items():
            out["state." + name] = tensor.contiguous().clone()
        save_file({k: v.contiguous() for k, v in out.items()}, item["output"])
        print(f"ok {path}: {type(model).__name__} from {type(model).__module__}")


def answer(folder: str) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    try:
        import cvlm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("connector-vlm is importable here; the check would prove nothing")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[Image.new("RGB", (64, 64), (200, 30, 30))], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == 8, out
    print(f"{type(model).__module__}: {processor.decode(new, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    answer(sys.argv[1]) if os.path.isdir(sys.argv[1]) else main(sys.argv[1])
