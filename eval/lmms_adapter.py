"""The lmms-eval model `connector_vlm`, so lmms-eval users score any checkpoint of the family with
their harness:

    pip install "connector-vlm[lmms]"
    python -m lmms_eval --model connector_vlm --model_args pretrained=ORG/REPO --tasks mme

lmms-eval (0.6 and later) finds the model through the `lmms_eval.models` entry point this package
declares (`lmms_manifest`). Questions are asked exactly as `cvlm eval` asks them (the checkpoint's
chat template, pictures first, greedy decoding; options ranked by the mean log-likelihood of their
tokens), through the same two functions of `cvlm.eval.runner`, so one checkpoint gives the same
answers through both. `ConnectorVLMHarness` holds the request handling and does not need lmms-eval.
"""

from __future__ import annotations

import torch

from .runner import chat_prompt, generate_answers, option_loglikelihoods

MODEL_NAME = "connector_vlm"
DTYPES = ("float32", "bfloat16", "float16")


def _images(visuals) -> list:
    if visuals is None:
        return []
    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    return [v.convert("RGB") for v in visuals if hasattr(v, "convert")]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ConnectorVLMHarness:
    """lmms-eval's simple-model requests: `generate_until` takes (context, gen_kwargs, doc_to_visual,
    doc_id, task, split); `loglikelihood` takes (context, continuation | doc_to_target, doc_to_visual,
    doc_id, task, split). Requests are answered in batches of `batch_size`, in the order given."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32", batch_size=1,
                 max_new_tokens: int = 16, trust_remote_code: bool = False, **kwargs):
        from cvlm.loading import load_checkpoint

        size = str(batch_size)  # settings checked before the model loads
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid for {MODEL_NAME}: use a whole number of at least 1.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid for {MODEL_NAME}. Allowed values: {', '.join(DTYPES)}.")
        self.batch_size_per_gpu, self.max_new_tokens = int(size), int(max_new_tokens)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # this family through the installed classes; other models run their own code only when asked
        model, self.processor = load_checkpoint(pretrained, str(trust_remote_code).lower() == "true",
                                                dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # generation starts where every prompt ends
        self.task_dict = getattr(self, "task_dict", {})

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        return _images(doc_to_visual(self.task_dict[task][split][doc_id]))

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        """Greedy answers; requests that share generation settings are batched together."""
        answers: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            for batch in _batches(indices, self.batch_size_per_gpu):
                prompts, images = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    prompts.append(chat_prompt(self.processor, context, len(visuals)))
                    images += visuals
                texts, _ = generate_answers(self.model, self.processor, prompts, images, max_new_tokens, until)
                answers.update(zip(batch, texts))
        return [answers[i] for i in range(len(requests))]

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation's tokens, greedy) per request: a loss, as
        lmms-eval's own models return and its multiple-choice scorer expects (the lowest is chosen).
        The options of one question share one encoding of its pictures and one forward."""
        questions: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            questions.setdefault((context, doc_id, task, split), []).append(i)
        results: dict[int, tuple[float, bool]] = {}
        for batch in _batches(list(questions.items()), self.batch_size_per_gpu):
            prompts, images, options = [], [], []
            for (context, doc_id, task, split), indices in batch:
                doc_to_visual = requests[indices[0]].args[2]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                prompts.append(chat_prompt(self.processor, context, len(visuals)))
                images.append(visuals)
                options.append([self._continuation(requests[i].args) for i in indices])
            scored = option_loglikelihoods(self.model, self.processor, prompts, images, options)
            for (_, indices), question_scores in zip(batch, scored):
                for i, (mean_logprob, greedy) in zip(indices, question_scores):
                    results[i] = (-mean_logprob, greedy)
        return [results[i] for i in range(len(requests))]

    def _continuation(self, args) -> str:
        _, target, _, doc_id, task, split = args
        return str(target(self.task_dict[task][split][doc_id]) if callable(target) else target)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME} answers single-round tasks (generate_until, loglikelihood, "
                                  "multiple_choice); multi-round tasks are not supported.")


def lmms_manifest():
    """lmms-eval's `lmms_eval.models` entry point: where the model class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.ConnectorVLMLmms")


def _pairs_reach_the_scorer() -> bool:
    """False for lmms-eval 0.7.x, whose evaluator turns every model result that is not text into its
    str() (`unwrap_generation_output`), so a (loss, greedy) pair reaches the multiple-choice scorer as
    a string and every multiple-choice task fails, with lmms-eval's own models too."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # before 0.7: results are passed on as they are
        return True
    return unwrap_generation_output((0.5, True))[0] == (0.5, True)


try:  # the lmms-eval model class exists only where lmms-eval is installed
    from lmms_eval.api.model import lmms
except ImportError:
    lmms = None

if lmms is not None:

    class ConnectorVLMLmms(ConnectorVLMHarness, lmms):
        """The harness first in the MRO, so its methods implement lmms' abstract ones."""

        is_simple = True

        def __init__(self, pretrained: str, **kwargs):
            lmms.__init__(self)
            ConnectorVLMHarness.__init__(self, pretrained, **kwargs)

        def loglikelihood(self, requests) -> list:
            results = ConnectorVLMHarness.loglikelihood(self, requests)
            if _pairs_reach_the_scorer():
                return results
            from lmms_eval.api.instance import GenerationResult

            # the one result type lmms-eval 0.7.x passes on untouched: the pair inside it arrives as a pair
            return [GenerationResult(text=pair) for pair in results]
