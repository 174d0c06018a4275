"""`cvlm eval`: any checkpoint of the family on MME / MMBench / SEED-Bench, scored by the metric
modules in eval/metrics, with the granularity breakdown and speed figures from the same run.

Outputs in `--output`: `predictions.jsonl` (one line per question: raw answer, parsed answer,
timing), `results.json`, `results.md`. An interrupted run resumes from `predictions.jsonl` without
asking finished questions again. Under `torchrun` / `accelerate launch` each process answers its
share of the questions; the first one merges and scores them.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import stat
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from cvlm.files import CHECKPOINT_MARKERS, check_output, model_digest, path_digest, read_json, write_atomic

from .loaders import CIRCULAR_OFFSET, LETTERS, Question, load_benchmark

logger = logging.getLogger(__name__)
METRICS_DIR = Path(__file__).parent / "metrics"
MAPPING_FILE = Path(__file__).parent / "granularity_mapping.json"
MODES = ("generate", "likelihood")
FINGERPRINT = "eval_fingerprint.json"  # what the predictions in an output folder came from


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def metric_function(metric, name: str):
    """A helper function of a loaded metric script (its answer parser), so parsing lives in one place."""
    return getattr(sys.modules[type(metric).__module__], name)


class _PrefillClock(BaseStreamer):
    """Timestamps the end of prefill: `generate` hands the streamer the prompt first, then each new token."""

    def __init__(self):
        self.calls, self.first_token = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first_token = time.perf_counter()

    def end(self):
        pass


def process_state():
    """accelerate's view of the processes launched together (torchrun, accelerate launch, a job with several
    tasks): it joins their process group, or starts it; a lone process is process 0 of 1."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _read_predictions(folder: Path) -> dict:
    done = {}
    for path in sorted(folder.glob("predictions*.jsonl")):
        for line in path.read_text().splitlines():
            if _parses(line):  # a line cut by an interruption is asked again
                row = json.loads(line)
                done[row["id"]] = row
    return done


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def chat_prompt(processor, text: str, n_images: int) -> str:
    """The checkpoint's chat template around one user turn: its pictures first, then the text."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.inference_mode()
def generate_answers(model, processor, prompts: list[str], images: list, max_new_tokens: int,
                     stop_strings: list[str] | None = None) -> tuple[list[str], dict]:
    """Greedy answers to a left-padded batch of chat prompts (`images`: every picture, in prompt order),
    with the batch's prefill / decode timing. `stop_strings` end an answer and are cut from it."""
    inputs = processor(images=images or None, text=prompts, padding=True, return_tensors="pt").to(model.device)
    clock = _PrefillClock()
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                            stop_strings=stop_strings or None, tokenizer=processor.tokenizer if stop_strings else None)
    end = time.perf_counter()
    new = output[:, inputs["input_ids"].shape[1]:]
    answers = processor.batch_decode(new, skip_special_tokens=True)
    for stop in stop_strings or ():
        answers = [a.split(stop)[0] for a in answers]
    first = clock.first_token or end
    pad = processor.tokenizer.pad_token_id
    decoded = int((new != pad).sum()) - len(prompts)  # tokens after the first, which prefill produced
    return answers, {"prefill_s": first - start, "decode_s": end - first, "decode_tokens": max(decoded, 0)}


@torch.inference_mode()
def option_loglikelihoods(model, processor, prompts: list[str], images: list[list], options: list[list[str]]
                          ) -> list[list[tuple[float, bool]]]:
    """For each prompt (with its pictures) and each of its options: the mean log-likelihood of the option's
    tokens after the prompt, and whether greedy decoding would produce exactly them. Every picture is
    encoded once, and every option of every prompt is scored in one right-padded forward (each option
    sits at the positions it would have alone)."""
    flat_images = [image for group in images for image in group]
    inputs = processor(images=flat_images or None, text=prompts, padding=True, return_tensors="pt").to(model.device)
    prompt_ids = [ids[mask.bool()] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]  # <image> expanded
    tokenizer = processor.tokenizer
    rows, spans, image_of_row = [], [], []
    for q, question_options in enumerate(options):
        for ids in tokenizer(list(question_options), add_special_tokens=False)["input_ids"]:
            if not ids:
                raise ValueError(f"An option of {question_options!r} has no tokens: every option needs some text to score.")
            rows.append(torch.cat([prompt_ids[q], torch.tensor(ids, device=model.device)]))
            spans.append((len(prompt_ids[q]), torch.tensor(ids, device=model.device)))
            image_of_row.append(q)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long, device=model.device)  # [R, T]
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention_mask[i, : len(row)] = row, 1
    extra = {}
    if flat_images:
        image_outputs = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        features = list(image_outputs.pooler_output)  # per picture [Q, D]
        first = [sum(map(len, images[:q])) for q in range(len(images))]  # each prompt's first picture
        image_outputs.pooler_output = [features[first[q] + k] for q in image_of_row for k in range(len(images[q]))]
        extra["mm_encoder_outputs"] = {"image": image_outputs}
    logprobs = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float().log_softmax(-1)
    results = [[] for _ in options]
    for i, (start, ids) in enumerate(spans):
        predicted = logprobs[i, start - 1 : start - 1 + len(ids)]  # position t predicts token t + 1
        results[image_of_row[i]].append((float(predicted.gather(-1, ids[:, None]).mean()),
                                         bool((predicted.argmax(-1) == ids).all())))
    return results


def _answer_generate(model, processor, batch: list[Question], max_new_tokens: int) -> tuple[list[str], dict]:
    prompts = [chat_prompt(processor, q.prompt, int(q.image is not None)) for q in batch]
    images = [q.load_image() for q in batch if q.image is not None]
    return generate_answers(model, processor, prompts, images, max_new_tokens)


def _answer_likelihood(model, processor, batch: list[Question], max_new_tokens: int) -> tuple[list[str], dict]:
    """Ranks each question's options by the mean log-likelihood of their tokens after the bare question,
    the options not listed (SEED-Bench's official protocol: the lowest loss wins; a sum would favour
    short options); the answer is the best option's letter (Yes/No for MME)."""
    start = time.perf_counter()
    images = [[q.load_image()] if q.image is not None else [] for q in batch]
    prompts = [chat_prompt(processor, q.question or q.prompt, len(pictures)) for q, pictures in zip(batch, images)]
    answers = []
    for q, scored in zip(batch, option_loglikelihoods(model, processor, prompts, images, [q.choices for q in batch])):
        best = max(range(len(scored)), key=lambda i: scored[i][0])
        answers.append(q.choices[best] if q.benchmark == "mme" else LETTERS[best])
    return answers, {"prefill_s": time.perf_counter() - start, "decode_s": 0.0, "decode_tokens": 0}


def _parse(benchmark: str, metric, raw: str, question: Question):
    if benchmark == "mme":
        return metric_function(metric, "parse_yes_no")(raw)
    if benchmark == "mmbench":
        return metric_function(metric, "extract_option")(raw, question.choices)
    return metric_function(metric, "parse_letter")(raw)


def question_outcomes(benchmark: str, rows: list[dict]) -> dict[str, dict]:
    """Per question: its subtask and whether it was answered right, as the metric counts it (MMBench: a
    question is right only when every circular pass is; MME: per question, not per picture pair). The
    unit of the study's paired comparisons."""
    out: dict[str, dict] = {}
    for r in rows:
        if benchmark == "mmbench":
            key = str(int(r["fields"]["index"]) % CIRCULAR_OFFSET)
            subtask = r["fields"]["category"]
        elif benchmark == "seed_bench":
            key = r["id"]
            subtask = subtask_of(Question("seed_bench", r["id"], None, "", r["answer"], fields=r["fields"]))
        else:
            key, subtask = r["id"], r["fields"]["category"]
        right = r["parsed"] is not None and str(r["parsed"]).strip().lower() == str(r["answer"]).strip().lower()
        entry = out.setdefault(key, {"subtask": subtask, "right": True})
        entry["right"] = entry["right"] and right
    return out


def score(benchmark: str, rows: list[dict], metric=None, mapping_file: str | Path = MAPPING_FILE) -> dict:
    """The metric module's result and the granularity breakdown for prediction rows."""
    metric = metric or load_metric(benchmark)
    predictions, references = [r["raw"] for r in rows], [r["answer"] for r in rows]
    fields = {k: [r["fields"][k] for r in rows] for k in rows[0]["fields"]}
    if benchmark == "mmbench":
        fields["choices"] = [r["choices"] for r in rows]
    result = metric.compute(predictions=predictions, references=references, **fields)
    if benchmark == "mme":
        subtasks = {k: (v["score"], v["num_questions"]) for k, v in result["subtasks"].items()}
    elif benchmark == "mmbench":
        subtasks = {k: (v["circular"], v["num_questions"]) for k, v in result["per_category"].items()}
    else:
        subtasks = {k: (v["accuracy"], v["num_questions"]) for k, v in result["per_dimension"].items()}
    granularity = load_metric("granularity").compute(
        benchmark=[benchmark] * len(subtasks), subtask=list(subtasks), score=[s for s, _ in subtasks.values()],
        num_questions=[n for _, n in subtasks.values()], mapping_file=str(mapping_file))
    return {"metrics": result, "granularity": granularity}


def _check_settings(limit, batch_size, max_new_tokens, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is invalid. Allowed values: {', '.join(MODES)}.")
    for flag, value in (("--limit", limit), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{flag} {value!r} is invalid: use a whole number of at least 1.")


def subtask_of(question: Question) -> str:
    """The subtask a question is scored under, as the granularity mapping names it."""
    if question.benchmark == "seed_bench":
        dimensions = sys.modules[type(load_metric("seed_bench")).__module__].DIMENSIONS
        qtype = question.fields["question_type_id"]
        return dimensions.get(qtype, f"dimension {qtype}")
    return question.fields["category"]


def check_mapping(mapping_file: str | Path, benchmark: str, questions: list[Question]) -> None:
    """The granularity mapping, read and checked before any inference: its layout, its granularities, and
    that it covers every subtask of the questions."""
    from . import GRANULARITIES

    mapping = read_json(mapping_file, "--mapping")
    table = mapping.get("mapping") if isinstance(mapping, dict) else None
    if not isinstance(table, dict) or not isinstance(table.get(benchmark, {}), dict):
        raise ValueError(f"--mapping {mapping_file} is not a granularity mapping: it needs "
                         f'{{"mapping": {{"{benchmark}": {{"subtask": "coarse" | "fine" | "reasoning"}}}}}}.')
    ours = table.get(benchmark, {})
    wrong = {k: v for k, v in ours.items() if v not in GRANULARITIES}
    if wrong:
        k, v = next(iter(wrong.items()))
        raise ValueError(f"--mapping {mapping_file}: {benchmark}/{k} maps to {v!r}. Allowed values: "
                         f"{', '.join(GRANULARITIES)}.")
    unmapped = sorted({subtask_of(q) for q in questions} - set(ours))
    if unmapped:
        raise ValueError(f"--mapping {mapping_file} has no granularity for {benchmark} subtask(s) "
                         f"{', '.join(unmapped[:8])}{' ...' if len(unmapped) > 8 else ''}: add them to the mapping.")


def _fingerprint(model_id, benchmark, data, image_folder, mode, max_new_tokens, batch_size, dtype) -> dict:
    """What the predictions depend on: the checkpoint's files, the data's bytes and the settings."""
    return {"model": model_digest(model_id), "data": path_digest(data), "image_folder": image_folder and
            path_digest(image_folder), "benchmark": benchmark, "mode": mode, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "dtype": dtype}


def _claim_output(out: Path, fingerprint: dict, overwrite: bool, rank: int) -> None:
    """Predictions in `out` are resumed only when they came from the same model, data and settings;
    otherwise they are refused, or with `overwrite` deleted (only the files this runner writes)."""
    check_output(out, overwrite)
    record = out / FINGERPRINT
    theirs = read_json(record, "eval fingerprint") if record.exists() else None
    has_predictions = any(out.glob("predictions*.jsonl"))
    if theirs == fingerprint or rank != 0:
        return
    if has_predictions and not overwrite:
        changed = ", ".join(k for k in fingerprint if (theirs or {}).get(k) != fingerprint[k]) if theirs else "unknown origin"
        raise ValueError(f"--output {out} holds predictions of another run ({changed} differ), which would be "
                         "reused. Pick another --output, or pass --overwrite to answer every question again.")
    for stale in [*out.glob("predictions*.jsonl"), out / "results.json", out / "results.md"]:
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(fingerprint, indent=2) + "\n")


def evaluate_model(model_id: str, benchmark: str, data: str, output: str, limit: int | None = None,
                   batch_size: int = 8, mode: str = "generate", max_new_tokens: int = 16,
                   image_folder: str | None = None, mapping_file: str | None = None, dtype: str = "float32",
                   overwrite: bool = False, trust_remote_code: bool = False, update_card: bool = True) -> dict | None:
    """Scores `model_id` on a benchmark into `output`; with `update_card`, a local checkpoint this project
    wrote also gets the results in its eval_results/ and card (see `record_in_checkpoint`)."""
    from cvlm.loading import load_checkpoint

    _check_settings(limit, batch_size, max_new_tokens, mode)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r} is invalid. Allowed values: float32, bfloat16, float16.")
    state = process_state()
    rank, world = state.process_index, state.num_processes
    out = Path(output)
    questions, problems = load_benchmark(benchmark, data, image_folder=image_folder)
    questions = questions[:limit] if limit else questions
    if not questions:
        raise ValueError(f"{data} gave no readable {benchmark} question ({len(problems)} unreadable rows"
                         + (f"; first: {problems[0]}" if problems else "") + ").")
    check_mapping(mapping_file or MAPPING_FILE, benchmark, questions)
    _claim_output(out, _fingerprint(model_id, benchmark, data, image_folder, mode, max_new_tokens, batch_size, dtype),
                  overwrite, rank)
    state.wait_for_everyone()
    metric = load_metric(benchmark)
    done = _read_predictions(out)
    with state.split_between_processes(questions) as mine:  # a contiguous share of the questions each
        mine = list(mine)
    # Batches keep their places in the question order, so a resumed run asks each unfinished
    # question in the same batch (same padding) as an uninterrupted run would.
    batches = [[q for q in mine[i : i + batch_size] if q.id not in done] for i in range(0, len(mine), batch_size)]
    batches = [b for b in batches if b]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_checkpoint(model_id, trust_remote_code, dtype=getattr(torch, dtype))
    model = model.to(device)
    processor.tokenizer.padding_side = "left"  # batches end where generation starts, whatever the checkpoint says
    path = out / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    _answer_batches(model, processor, batches, path, benchmark, metric, mode, max_new_tokens, rank)
    state.wait_for_everyone()
    if rank != 0:
        return None

    done = _read_predictions(out)
    rows = [done[q.id] for q in questions if q.id in done]
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for stale in out.glob("predictions.rank*.jsonl"):
        stale.unlink()
    results = {"benchmark": benchmark, "model": model_id, "data": data, "mode": mode, "num_questions": len(rows),
               "processes": world, "unreadable_rows": problems, **score(benchmark, rows, metric, mapping_file or MAPPING_FILE),
               "questions": question_outcomes(benchmark, rows), "speed": _speed(rows, model, device, batch_size)}
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "results.md", markdown(results))
    if update_card:
        record_in_checkpoint(model_id, benchmark, results)
    return results


def _answer_batches(model, processor, batches: list[list[Question]], path: Path, benchmark: str, metric, mode: str,
                    max_new_tokens: int, rank: int) -> None:
    """Answers each batch and appends its rows to `path`, flushed to disk batch by batch (what a resumed
    run reads back)."""
    answer = _answer_generate if mode == "generate" else _answer_likelihood
    if path.exists():  # drop a line an interruption cut short, so that appended lines stay whole
        kept = [line for line in path.read_text().splitlines() if _parses(line)]
        write_atomic(path, "".join(line + "\n" for line in kept))
    with open(path, "a") as handle, tqdm(total=sum(map(len, batches)), desc=f"{benchmark} ({mode})",
                                         disable=rank != 0) as bar:
        for batch in batches:
            raws, timing = answer(model, processor, batch, max_new_tokens)
            batch_id = f"{rank}:{time.time_ns()}"  # timing is per batch
            for q, raw in zip(batch, raws):
                row = {"id": q.id, "raw": raw, "parsed": _parse(benchmark, metric, raw, q), "answer": q.answer,
                       "choices": q.choices, "fields": q.fields, "batch": batch_id, "batch_size": len(batch), **timing}
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))


def _speed(rows: list[dict], model, device: str, batch_size: int) -> dict:
    batches = {r["batch"]: r for r in rows}  # timing is per batch: count each batch once
    decode_s = sum(b["decode_s"] for b in batches.values())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "visual_tokens_per_image": model.config.num_image_tokens,
        "mean_prefill_latency_s": sum(b["prefill_s"] for b in batches.values()) / len(batches),
        "decode_tokens_per_s": (sum(b["decode_tokens"] for b in batches.values()) / decode_s) if decode_s else None,
        "peak_memory_mb": peak, "peak_memory_kind": "cuda allocated" if device == "cuda" else "process max RSS",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "batch_size": batch_size,
    }


def _writable(path: Path) -> bool:
    """Writable by its owner and by us (the mode bits too: for root, os.access says yes to everything)."""
    return bool(path.stat().st_mode & stat.S_IWUSR) and os.access(path, os.W_OK)


def record_in_checkpoint(model_id: str, benchmark: str, results: dict) -> bool:
    """Writes the results into a local checkpoint's eval_results/<benchmark>.json and rewrites its card,
    saying so; a Hub id, a folder another tool wrote, a Hub cache snapshot or a read-only folder is
    left untouched, with a line saying why. True when written."""
    from cvlm.model_cards.card import EVAL_DIR, write_card

    folder = Path(model_id)
    if not (folder / "config.json").is_file():
        return False  # a Hub id: its card is the Hub's
    reason = None
    if not any((folder / marker).is_file() for marker in CHECKPOINT_MARKERS):
        reason = f"it was not written by cvlm (none of {', '.join(CHECKPOINT_MARKERS)})"
    elif (folder / "config.json").is_symlink():
        reason = "it is a Hub cache snapshot (its files are links into the cache)"
    elif not all(_writable(p) for p in (folder, folder / EVAL_DIR, folder / "README.md") if p.exists()):
        reason = "it is read-only"
    if reason:
        logger.warning("Results not recorded in %s: %s. They are in the --output folder.", folder, reason)
        return False
    (folder / EVAL_DIR).mkdir(exist_ok=True)
    write_atomic(folder / EVAL_DIR / f"{benchmark}.json", json.dumps(results, indent=2) + "\n")
    write_card(model_id)
    logger.info("Recorded the results in %s and its card %s (--no-card leaves the checkpoint as it was).",
                folder / EVAL_DIR / f"{benchmark}.json", folder / "README.md")
    return True


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(results: dict) -> str:
    m, g, s = results["metrics"], results["granularity"], results["speed"]
    if results["benchmark"] == "mme":
        head = f"perception {m['perception_score']:.2f} / 2000, cognition {m['cognition_score']:.2f} / 800"
        subtasks = {k: f"{v['score']:.2f} (acc {100 * v['acc']:.1f}, acc+ {100 * v['acc_plus']:.1f})" for k, v in m["subtasks"].items()}
    elif results["benchmark"] == "mmbench":
        head = f"CircularEval {100 * m['circular_accuracy']:.1f} %, single pass {100 * m['single_pass_accuracy']:.1f} %"
        subtasks = {k: f"{100 * v['circular']:.1f} (single pass {100 * v['single_pass']:.1f})" for k, v in m["per_category"].items()}
    else:
        head = f"accuracy {100 * m['accuracy']:.1f} %"
        subtasks = {k: f"{100 * v['accuracy']:.1f}" for k, v in m["per_dimension"].items()}
    lines = [f"# {results['benchmark']}: {results['model']}", "", f"{results['num_questions']} questions, "
             f"{results['mode']} mode: {head}", "", "| granularity | macro % | micro % | subtasks |", "|---|---|---|---|"]
    for name in ("coarse", "fine", "reasoning"):
        lines.append(f"| {name} | {_pct(g[name]['macro'])} | {_pct(g[name]['micro'])} | {g[name]['num_subtasks']} |")
    lines += ["", "| subtask | score |", "|---|---|"] + [f"| {k} | {v} |" for k, v in subtasks.items()]
    rate = s["decode_tokens_per_s"]
    lines += ["", f"Speed ({s['device']}, batch {s['batch_size']}): {s['visual_tokens_per_image']} visual tokens per "
              f"image, mean prefill {1000 * s['mean_prefill_latency_s']:.1f} ms per batch, decode "
              f"{'-' if rate is None else f'{rate:.1f}'} tokens/s, peak memory {s['peak_memory_mb']:.0f} MB "
              f"({s['peak_memory_kind']})."]
    if results["unreadable_rows"]:
        lines += ["", f"Unreadable rows ({len(results['unreadable_rows'])}): " + "; ".join(results["unreadable_rows"][:20])]
    return "\n".join(lines) + "\n"
