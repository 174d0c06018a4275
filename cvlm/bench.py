"""`cvlm bench connectors`: what compression buys, measured side by side in one run.

For every registered connector, on the same image and prompt: connector parameters, Q, the
connector's forward time, and the LM prefill time for one image + a short prompt (the image
features precomputed, `logits_to_keep=1` as in generation). The prefill speed-up against `mlp`
stands next to the token bound P/Q. Times are medians over repeats after a warm-up.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from cvlm.build import build_model
from cvlm.eval.runner import chat_prompt
from cvlm.files import write_atomic
from cvlm.trainers.data import load_image
from cvlm.generate import demo_image
from cvlm.modeling import CONNECTORS

PROMPT = "What is in the image?"


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _connector_case(name: str, target: torch.device, **build_args) -> tuple:
    """(name, model, inputs, connector forward, prefill, their times): one connector, built and ready to time."""
    model, processor = build_model(**build_args)
    model.to(target).eval()
    text = chat_prompt(processor, PROMPT, 1)
    inputs = processor(images=[demo_image(256)], text=[text], return_tensors="pt").to(target)
    pixel_values = inputs["pixel_values"].to(model.dtype)
    features = model.model.select_vision_features(pixel_values)
    image = model.model.get_image_features(pixel_values)

    def connector_forward():
        model.model.connector(features)

    def prefill():
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs={"image": image},
              logits_to_keep=1)

    return name, model, inputs, connector_forward, prefill, {"connector": [], "prefill": []}


@torch.inference_mode()
def bench_connectors(vision: str = "tiny-clip", llm: str = "tiny-llama", image_size: int | None = None,
                     connectors: list[str] | None = None, repeats: int = 20, warmup: int = 3,
                     dtype: str = "float32", device: str = "cpu", seed: int = 0, **preset_size) -> list[dict]:
    """One row per connector (see the module docstring). All models are built first, then timed in
    interleaved rounds (every connector once per round), so that drifts of a noisy machine hit all
    of them alike; each time is the median over the rounds. `preset_size`: vision_width,
    vision_layers, llm_width, llm_layers for the tiny presets."""
    names = connectors or list(CONNECTORS)
    unknown = [n for n in names if n not in CONNECTORS]
    if unknown:
        raise ValueError(f"Unknown connector(s) {unknown}. Allowed values: {', '.join(CONNECTORS)}.")
    if "mlp" not in names:
        names = ["mlp", *names]  # the reference for the speed-up
    target = torch.device(device)
    cases = [_connector_case(name, target, vision=vision, llm=llm, connector=name, image_size=image_size, seed=seed,
                             dtype=dtype, **preset_size) for name in names]
    for round_index in range(warmup + repeats):
        for *_, connector_forward, prefill, times in cases:
            connector_s, prefill_s = _timed(connector_forward, target), _timed(prefill, target)
            if round_index >= warmup:
                times["connector"].append(connector_s)
                times["prefill"].append(prefill_s)

    rows = []
    for name, model, inputs, _, _, times in cases:
        grid_h, grid_w = model.config.vision_grid
        rows.append({
            "connector": name,
            "family": CONNECTORS[name].family,
            "params": model.model.connector.num_parameters(),
            "patches_P": grid_h * grid_w,
            "tokens_Q": model.config.num_image_tokens,
            "sequence_length": int(inputs["input_ids"].shape[1]),
            "connector_ms": statistics.median(times["connector"]) * 1e3,
            "prefill_ms": statistics.median(times["prefill"]) * 1e3,
        })
    reference = next(r for r in rows if r["connector"] == "mlp")
    for row in rows:
        row["prefill_speedup_vs_mlp"] = reference["prefill_ms"] / row["prefill_ms"]
        row["token_bound_P_over_Q"] = row["patches_P"] / row["tokens_Q"]
        row["share_of_bound"] = row["prefill_speedup_vs_mlp"] / row["token_bound_P_over_Q"]
        # The prompt's text tokens are not compressed: the sequence ratio is the reachable bound.
        row["sequence_bound"] = reference["sequence_length"] / row["sequence_length"]
        row["share_of_sequence_bound"] = row["prefill_speedup_vs_mlp"] / row["sequence_bound"]
    return rows


# ---- the study's quiet timing phase ------------------------------------------------------------------
def _timing_case(label: str, checkpoint: str, train_data: str, question: str, batch_size: int,
                 image_folder: str | None = None) -> dict:
    """A trained checkpoint with what one training step and one prefill take as inputs: a batch of the
    study's own training samples (encoder features precomputed, as the feature cache gives them during
    training) and one picture with a question."""
    from torch.utils.flop_counter import FlopCounterMode

    from cvlm.loading import load_processor
    from cvlm.modeling import ConnectorVLMForConditionalGeneration
    from cvlm.trainers.data import Collator, SupervisedDataset, read_records, tokenize_all

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ConnectorVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    processor = load_processor(checkpoint)
    records = [r for r in read_records(train_data, image_folder) if r.get("image")][:batch_size]
    batch = Collator(processor)([SupervisedDataset(tokenize_all(records, processor, 2048))[i] for i in range(len(records))])
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        batch["vision_features"] = torch.stack(model.model.select_vision_features(batch.pop("pixel_values")), dim=1)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*model.model.connector.parameters(), *model.model.language_model.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=0.0)  # the arithmetic of a step; the weights need not move
    image = records[0]["image"][0]
    text = chat_prompt(processor, question, 1)
    prompt = processor(images=[load_image(image)], text=[text], return_tensors="pt").to(device)

    def train_step():
        model.train()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    def prefill():
        model.eval()
        with torch.inference_mode():
            model(**prompt, logits_to_keep=1)

    # FLOPs of the forward passes, counted from the shapes by torch (its module tracker needs no parameter
    # to require grad); a training step is counted as 3 forwards (backward about twice the forward)
    for p in trainable:
        p.requires_grad_(False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**batch)
    train_flops = 3 * counter.get_total_flops() / len(records)
    with FlopCounterMode(display=False) as counter:
        prefill()
    for p in trainable:
        p.requires_grad_(True)
    return {"label": label, "model": model, "device": device, "train_step": train_step, "prefill": prefill, "tokens": model.config.num_image_tokens,
            "train_flops_per_sample": train_flops, "prefill_flops": counter.get_total_flops(),
            "times": {"train_step": [], "prefill": []}}


def time_checkpoints(cases: list[dict], rounds: int = 10, warmup: int = 2, batch_size: int = 16) -> list[dict]:
    """cases: {"label", "checkpoint", "train_data", "question", ...}. Every checkpoint's training step and
    prefill timed in interleaved rounds (each case once per round) in this one process, so that the
    machine's drifts hit all alike; medians over the rounds, with analytic FLOPs (torch's FLOP counter)
    and visual tokens beside them. Call it with nothing else running."""
    built = [{**case, **_timing_case(case["label"], case["checkpoint"], case["train_data"], case["question"],
                                     batch_size, case.get("image_folder"))} for case in cases]
    for round_index in range(warmup + rounds):
        for case in built:
            for name in ("train_step", "prefill"):
                seconds = _timed(case[name], case["device"])
                if round_index >= warmup:
                    case["times"][name].append(seconds)
    rows = []
    for case in built:
        row = {k: v for k, v in case.items() if k not in ("model", "device", "train_step", "prefill", "times",
                                                           "checkpoint", "train_data", "question", "image_folder")}
        row["train_step_ms"] = 1e3 * statistics.median(case["times"]["train_step"])
        row["prefill_ms"] = 1e3 * statistics.median(case["times"]["prefill"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'connector':<14}{'family':<12}{'params':>12}{'P':>6}{'Q':>6}{'seq':>6}{'conn ms':>9}"
            f"{'prefill ms':>11}{'speed-up':>9}{'P/Q':>6}{'of P/Q':>7}{'seq bound':>10}{'of seq':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        compressing = r["tokens_Q"] < r["patches_P"]
        share = f"{100 * r['share_of_bound']:.0f}%" if compressing else "-"
        seq_share = f"{100 * r['share_of_sequence_bound']:.0f}%" if compressing else "-"
        lines.append(
            f"{r['connector']:<14}{r['family']:<12}{r['params']:>12,}{r['patches_P']:>6}{r['tokens_Q']:>6}"
            f"{r['sequence_length']:>6}{r['connector_ms']:>9.2f}{r['prefill_ms']:>11.2f}"
            f"{r['prefill_speedup_vs_mlp']:>8.2f}x{r['token_bound_P_over_Q']:>6.2f}{share:>7}"
            f"{r['sequence_bound']:>9.2f}x{seq_share:>7}"
        )
    return "\n".join(lines)


def write_results(rows: list[dict], path: str | Path, settings: dict) -> None:
    """results.json, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


def bench_train(steps: int = 20, batch_size: int = 8, image_size: int = 128, vision_width: int = 256,
                vision_layers: int = 6, llm_width: int = 512, llm_layers: int = 4, repeats: int = 2,
                workdir: str | None = None) -> list[dict]:
    """Training samples/s of: align without and with the feature cache, finetune with LoRA and with
    the full LM, on the same tiny-preset backbones resized to the given widths. Runs alternate
    (A, B, C, D, A, B, ...) `repeats` times; the median is reported."""
    import tempfile

    from transformers import TrainingArguments

    from cvlm.build import build
    from cvlm.trainers.toy_data import write_colour_dataset
    from cvlm.trainers.train import DataArguments, LoraArguments, ModelArguments, train

    root = Path(workdir or tempfile.mkdtemp(prefix="cvlm-bench-train-"))
    data = write_colour_dataset(root / "data", n=64, text_only=0, size=image_size)
    build(root / "base", vision="tiny-clip", llm="tiny-llama", connector="mlp", image_size=image_size,
          vision_width=vision_width, vision_layers=vision_layers, llm_width=llm_width, llm_layers=llm_layers)
    cache = str(root / "cache")

    def run(output, model, stage, cache_features=None, lm_full=False) -> dict:
        train(ModelArguments(model=str(model), stage=stage, lm_full=lm_full),
              DataArguments(data=data, cache_features=cache_features), LoraArguments(),
              TrainingArguments(output_dir=str(output), max_steps=steps, per_device_train_batch_size=batch_size,
                                save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=steps))
        return json.loads((Path(output) / "cvlm_training.json").read_text())

    run(root / "warm", root / "base", "align", cache)  # fills the cache, so the cached runs only read it
    runs = {
        "align, encoder run each step": dict(model=root / "base", stage="align"),
        "align, feature cache": dict(model=root / "base", stage="align", cache_features=cache),
        "finetune, LoRA r=8": dict(model=root / "warm", stage="finetune", cache_features=cache),
        "finetune, full LM": dict(model=root / "warm", stage="finetune", cache_features=cache, lm_full=True),
    }
    speeds = {name: [] for name in runs}
    for r in range(repeats):
        for i, (name, settings) in enumerate(runs.items()):
            speeds[name].append(run(root / f"run-{r}-{i}", **settings)["samples_per_second"])
    return [{"run": name, "samples_per_second": statistics.median(values)} for name, values in speeds.items()]


def bench_overhead(image_size: int = 192, vision_width: int = 256, vision_layers: int = 6, llm_width: int = 512,
                   llm_layers: int = 4, new_tokens: int = 16, repeats: int = 10, warmup: int = 2, dtype: str = "float32",
                   device: str = "cpu", workdir: str | None = None, llm: str = "tiny-llama") -> list[dict]:
    """Our model vs transformers' LlavaForConditionalGeneration on the same converted weights and the
    same processed inputs: forward time and greedy generate time (prefill + `new_tokens` decode
    steps), timed in interleaved rounds; each row's ratio is ours / LLaVA's median. `llm` is any LM
    `cvlm build` takes; `llm_width` / `llm_layers` resize the tiny presets only."""
    import tempfile

    from transformers import LlavaForConditionalGeneration

    from cvlm.build import build
    from cvlm.convert import to_llava
    from cvlm.modeling import ConnectorVLMForConditionalGeneration

    root = Path(workdir or tempfile.mkdtemp(prefix="cvlm-bench-overhead-"))
    from cvlm.presets import LM_PRESETS

    preset = llm in LM_PRESETS
    build(root / "ours", vision="tiny-clip", llm=llm, connector="mlp", image_size=image_size,
          vision_width=vision_width, vision_layers=vision_layers, llm_width=llm_width if preset else None,
          llm_layers=llm_layers if preset else None)
    to_llava(root / "ours", root / "llava")
    torch_dtype, target = getattr(torch, dtype), torch.device(device)
    ours = ConnectorVLMForConditionalGeneration.from_pretrained(root / "ours", dtype=torch_dtype).to(target).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(root / "llava", dtype=torch_dtype).to(target).eval()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(root / "llava")
    text = chat_prompt(processor, PROMPT, 1)
    inputs = processor(images=[demo_image(256)], text=[text], return_tensors="pt").to(target)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    tasks = {
        "forward": lambda m: m(**inputs),
        f"generate ({new_tokens} tokens)": lambda m: m.generate(**inputs, max_new_tokens=new_tokens,
                                                                min_new_tokens=new_tokens, do_sample=False),
    }
    times = {(task, who): [] for task in tasks for who in ("ours", "llava")}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for task, fn in tasks.items():
                for who, model in (("ours", ours), ("llava", llava)):
                    seconds = _timed(lambda: fn(model), target)
                    if round_index >= warmup:
                        times[(task, who)].append(seconds)
    rows = []
    for task in tasks:
        ours_ms = statistics.median(times[(task, "ours")]) * 1e3
        llava_ms = statistics.median(times[(task, "llava")]) * 1e3
        rows.append({"task": task, "ours_ms": ours_ms, "llava_ms": llava_ms, "ratio": ours_ms / llava_ms})
    return rows
