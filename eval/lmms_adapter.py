"""An lmms-eval model adapter, so lmms-eval users evaluate any checkpoint of the family with their
harness:

    python -m lmms_eval --model connector_vlm --model_args pretrained=ORG/REPO --tasks mme,seedbench

(after `import cvlm.eval.lmms_adapter`, e.g. through lmms-eval's `--include_path` or a plugin
import). The request handling lives in `ConnectorVLMHarness`, which does not need lmms-eval; the
registered `lmms` subclass exists only where lmms-eval is installed.
"""

from __future__ import annotations

import torch


def _images(visuals) -> list:
    if visuals is None:
        return []
    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    return [v.convert("RGB") for v in visuals if hasattr(v, "convert")]


class ConnectorVLMHarness:
    """`generate_until` and `loglikelihood` over lmms-eval's simple-model requests, whose `args` are
    (context, gen_kwargs | doc_to_target, doc_to_visual, doc_id, task, split)."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32", batch_size: int = 1,
                 max_new_tokens: int = 32, trust_remote_code: bool = False, **kwargs):
        from cvlm.loading import load_checkpoint

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # this family through the installed classes; other models run their own code only when asked
        model, self.processor = load_checkpoint(pretrained, str(trust_remote_code).lower() == "true",
                                                dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.batch_size_per_gpu, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})

    def _prompt(self, context: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = _images(doc_to_visual(self._doc(task, split, doc_id)))
            text = self._prompt(context, len(images))
            inputs = self.processor(images=images or None, text=[text], return_tensors="pt").to(self.device)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                stop_strings=until or None, tokenizer=self.processor.tokenizer if until else None)
            answer = self.processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for stop in until:  # lmms-eval expects the stop sequence cut off
                answer = answer.split(stop)[0]
            answers.append(answer)
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            images = _images(doc_to_visual(doc))
            prompt = self._prompt(context, len(images))
            full = self.processor(images=images or None, text=[prompt + str(continuation)], return_tensors="pt")
            prompt_len = self.processor(images=images or None, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            logits = self.model(**full.to(self.device)).logits[0].float()
            targets = full["input_ids"][0, prompt_len:]
            logprobs = logits[prompt_len - 1 : -1].log_softmax(-1)
            total = float(logprobs.gather(-1, targets[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == targets).all())
            results.append((total, greedy))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("connector_vlm answers single-round tasks; multi-round ones are not supported.")


try:  # registered only where lmms-eval is installed
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the environment
    lmms = None

if lmms is not None:  # pragma: no cover - depends on the environment

    @register_model("connector_vlm")
    class ConnectorVLMLmms(lmms, ConnectorVLMHarness):
        def __init__(self, pretrained: str, **kwargs):
            lmms.__init__(self)
            ConnectorVLMHarness.__init__(self, pretrained, **kwargs)
