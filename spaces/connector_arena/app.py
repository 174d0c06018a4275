"""Connector arena: every loaded connector variant answers the same image and question, side by
side, with what it costs and a picture of what it keeps of the image.

Which checkpoints: `CVLM_SPACE_MODELS` (comma-separated Hub ids or folders), else `models.txt`
next to this file (one per line), else — where connector-vlm is installed — untrained tiny
presets built on the spot, labelled as such. Deploys to a Hugging Face Space as is.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

HERE = Path(__file__).parent
MAX_SIDE = 1024  # larger uploads are downscaled to this
REFUSE_PIXELS = 80_000_000  # beyond this an upload is refused (decompression-bomb guard)
TIME_LIMIT_S = float(os.environ.get("CVLM_SPACE_TIME_LIMIT", "60"))
MAX_NEW_TOKENS = 32
PRESET_CONNECTORS = ("mlp", "avgpool", "pixel_shuffle", "qformer")


@dataclass
class Variant:
    source: str
    label: str
    model: object = None
    processor: object = None
    error: str | None = None
    scores: dict = field(default_factory=dict)  # granularity -> macro %, from the checkpoint's eval results

    @property
    def config(self):
        return self.model.config

    def info(self) -> dict:
        if self.error:
            return {"name": self.label, "error": self.error}
        connector = self.model.model.connector
        return {"name": self.label, "connector": self.config.connector_type, "family": connector.family,
                "visual_tokens": self.config.num_image_tokens,
                "connector_parameters": connector.num_parameters(), "scores": self.scores}


def model_sources() -> list[tuple[str, str]]:
    """(source, label) pairs, from the environment, models.txt, or untrained presets."""
    listed = os.environ.get("CVLM_SPACE_MODELS", "").strip()
    if not listed and (HERE / "models.txt").exists():
        listed = ",".join(line.strip() for line in (HERE / "models.txt").read_text().splitlines()
                          if line.strip() and not line.startswith("#"))
    if listed:
        return [(s.strip(), Path(s.strip()).name or s.strip()) for s in listed.split(",") if s.strip()]
    try:
        from cvlm.build import build
    except ImportError:
        raise RuntimeError("No checkpoints: set CVLM_SPACE_MODELS (Hub ids or folders) or list them in models.txt.")
    root = Path(tempfile.mkdtemp(prefix="cvlm-space-presets-"))
    out = []
    for connector in PRESET_CONNECTORS:
        build(root / connector, vision="tiny-clip", llm="tiny-llama", connector=connector, image_size=64)
        out.append((str(root / connector), f"{connector} (untrained tiny preset)"))
    return out


def _load(source: str):
    """Where connector-vlm is installed (`cvlm space`), its own classes load the checkpoint and none of
    the checkpoint's code runs; deployed alone, the Space runs the code of the checkpoints its owner listed."""
    try:
        from cvlm.loading import load_checkpoint
    except ImportError:
        model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True, dtype=torch.float32).eval()
        return model, AutoProcessor.from_pretrained(source, trust_remote_code=True)
    return load_checkpoint(source)


def load_variant(source: str, label: str) -> Variant:
    try:
        model, processor = _load(source)
    except Exception as error:  # noqa: BLE001 - any failure becomes an error card; the others still work
        return Variant(source, label, error=f"could not load {source}: {type(error).__name__}: {error}")
    scores = {}
    for path in sorted(Path(source).glob("eval_results/*.json")) if Path(source).is_dir() else []:
        granularity = json.loads(path.read_text()).get("granularity", {})
        scores.update({f"{path.stem} {k}": round(v["macro"], 1) for k, v in granularity.items()
                       if isinstance(v, dict) and v.get("macro") is not None})
    return Variant(source, label, model, processor, scores=scores)


# ---- input checks ----------------------------------------------------------------------------------
def received_path(value, cache_dir: str) -> str | None:
    """The path of an image gradio received (an upload, or an example it cached), else gr.Error: a value
    naming any other file on the server is never read."""
    if value is None:
        return None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise gr.Error("Pick an example or upload an image.")
    resolved = Path(path).resolve()
    received = [Path(cache_dir).resolve(), Path(gr.utils.get_upload_folder()).resolve()]
    if not any(resolved.is_relative_to(folder) for folder in received):
        raise gr.Error("Upload the image through this page (or pick an example); other paths are not read.")
    return str(resolved)


def read_image(path, to_rgb=None) -> tuple[Image.Image, str]:
    """The upload as RGB (`to_rgb`: the checkpoints' own conversion, so that 16-bit, alpha and palette
    pictures look as they do in training), downscaled when huge; a note on what was done. gr.Error on
    bad input."""
    if path is None:
        raise gr.Error("Pick an example or upload an image.")
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if width * height > REFUSE_PIXELS:
                raise gr.Error(f"The image is {width}x{height} pixels; the limit is {REFUSE_PIXELS:,} pixels.")
            mode = handle.mode
            handle.load()
            image = to_rgb(handle) if to_rgb else handle.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise gr.Error("That file is not an image this page can read: upload a PNG, JPEG or WebP picture.") from None
    notes = [] if mode == "RGB" else [f"converted from {mode} to RGB"]
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        notes.append(f"downscaled from {width}x{height} to {image.size[0]}x{image.size[1]}")
    return image, "; ".join(notes)


# ---- what each connector keeps ------------------------------------------------------------------
def keep_picture(variant: Variant, image: Image.Image) -> Image.Image:
    """The input as the encoder sees it, with the region each output token covers drawn over it
    (pooling / pixel-shuffle cells, one cell per patch for preserving connectors), or the Q-Former
    queries' attention over the patches as a heat map."""
    config = variant.config
    size = 256
    base = image.resize((size, size))
    grid_h, grid_w = config.vision_grid
    connector = variant.model.model.connector
    cells = connector.token_cells()  # the connector class says which cells its tokens cover
    if cells is None:  # learned queries: where they look
        pixels = variant.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            _, attentions = connector(variant.model.model.select_vision_features(pixels), return_attentions=True)
        heat = attentions[-1][0].mean((0, 1))  # [N] over heads and queries
        heat = heat[-grid_h * grid_w:].reshape(grid_h, grid_w)
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-9)
        overlay = Image.fromarray((heat.numpy() * 255).astype("uint8"), "L").resize((size, size), Image.NEAREST)
        red = Image.new("RGB", (size, size), (255, 0, 0))
        return Image.composite(red, base, overlay.point(lambda v: int(v * 0.6)))
    draw = ImageDraw.Draw(base)
    for i in range(1, cells[0]):
        draw.line([(0, i * size / cells[0]), (size, i * size / cells[0])], fill=(255, 255, 0), width=1)
    for j in range(1, cells[1]):
        draw.line([(j * size / cells[1], 0), (j * size / cells[1], size)], fill=(255, 255, 0), width=1)
    label = f"{config.num_image_tokens} tokens"
    if len(config.connector_vision_layers) > 1:  # several encoder layers read (Dense Connector)
        label += f" from layers {config.connector_vision_layers[1:]} + {config.connector_vision_layers[0]}"
    draw.rectangle([0, 0, 8 + 6 * len(label), 14], fill=(0, 0, 0))
    draw.text((4, 2), label, fill=(255, 255, 0))
    return base


# ---- answering ---------------------------------------------------------------------------------
def answer_stream(variant: Variant, image: Image.Image, question: str):
    """Yields (text so far, costs) while the variant generates."""
    processor, model = variant.processor, variant.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=TIME_LIMIT_S)
    kwargs = dict(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, streamer=streamer, max_time=TIME_LIMIT_S)
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: model.generate(**kwargs), daemon=True)
    thread.start()
    first, pieces, tokens = None, [], 0
    try:
        for piece in streamer:
            first = first or time.perf_counter()
            tokens += 1
            pieces.append(piece)
            yield "".join(pieces), None
    except queue.Empty:  # nothing more within the time limit
        pass
    thread.join(timeout=TIME_LIMIT_S)
    end = time.perf_counter()
    first = first or end
    costs = {"visual_tokens": variant.config.num_image_tokens, "prefill_latency_ms": round(1000 * (first - start), 2),
             "decode_tokens_per_s": round((tokens - 1) / (end - first), 1) if tokens > 1 and end > first else None,
             "stopped_at_time_limit": end - start >= TIME_LIMIT_S}
    text = "".join(pieces)
    if costs["stopped_at_time_limit"]:
        text += f" [stopped: this variant reached the {TIME_LIMIT_S:.0f} s time limit]"
    yield text, costs


COST_HEADERS = ["cost of this request", "value"]


def cost_rows(costs: dict) -> list[list]:
    """The costs as rows a person reads at a glance (the table beside each answer)."""
    rate = costs["decode_tokens_per_s"]
    return [["visual tokens", str(costs["visual_tokens"])],
            ["prefill latency", f"{costs['prefill_latency_ms']:.1f} ms"],
            ["decode speed", "-" if rate is None else f"{rate:.1f} tokens/s"],
            ["stopped at the time limit", "yes" if costs["stopped_at_time_limit"] else "no"]]


def padded(values: list[float], fraction: float = 0.12) -> list[float]:
    """Axis limits around `values` with a margin, so no point sits on the plot's frame."""
    low, high = min(values), max(values)
    margin = (high - low) * fraction or max(abs(high) * fraction, 1.0)
    return [low - margin, high + margin]


def variant_column(v: Variant) -> list:
    """One variant's column: what it is, then (filled per request) what it keeps, its answer, its costs."""
    with gr.Column(min_width=220):
        info = v.info()
        if v.error:
            gr.Markdown(f"### {v.label}\n**Failed to load.** {v.error}")
            return []
        scores = ", ".join(f"{k} {s}" for k, s in info["scores"].items()) or "no scores recorded"
        gr.Markdown(f"### {v.label}\n`{info['connector']}` · {info['family']} · Q = "
                    f"{info['visual_tokens']} · {info['connector_parameters']:,} connector parameters\n\n"
                    f"Scores (macro %): {scores}")
        keeps = gr.Image(label="what it keeps", height=200, interactive=False)
        answer = gr.Textbox(label="answer", lines=2)
        costs = gr.Dataframe(headers=COST_HEADERS, label="costs of this request", interactive=False, wrap=True)
        return [keeps, answer, costs]


def scatter(variants: list[Variant]) -> None:
    """Fine-grained accuracy against visual tokens, for the variants whose cards record it."""
    scored = [(v, s) for v in variants for k, s in v.scores.items() if k.endswith("fine")]
    if scored:
        import pandas as pd

        tokens, fine = [v.config.num_image_tokens for v, _ in scored], [s for _, s in scored]
        gr.ScatterPlot(pd.DataFrame({"visual tokens": tokens, "fine-grained %": fine,
                                     "variant": [v.label for v, _ in scored]}),
                       x="visual tokens", y="fine-grained %", color="variant", title="accuracy vs visual tokens",
                       x_lim=padded(tokens), y_lim=padded(fine))


def build_demo(variants: list[Variant]) -> gr.Blocks:
    ok = [v for v in variants if not v.error]
    with gr.Blocks(title="Connector arena") as demo:
        gr.Markdown("# Connector arena\nOne image and question, every connector variant side by side: what each "
                    "answers, what it costs, and what it keeps of the image (the paper's \"preserve or compress?\").")
        with gr.Row():
            image_in = gr.Image(type="filepath", image_mode=None, label="Image", height=260)  # modes converted here
            with gr.Column():
                question_in = gr.Textbox(label="Question", value="What colour is the background?")
                submit = gr.Button("Compare", variant="primary")
                status = gr.Markdown()
        examples = sorted((HERE / "examples").glob("*.png")) + sorted((HERE / "examples").glob("*.jpg"))
        if examples:
            questions = json.loads((HERE / "examples" / "questions.json").read_text()) \
                if (HERE / "examples" / "questions.json").exists() else {}
            gr.Examples([[str(p), questions.get(p.name, "What is in the image?")] for p in examples],
                        inputs=[image_in, question_in])
        outputs = []
        with gr.Row():
            for v in variants:
                outputs += variant_column(v)
        scatter(ok)

        def compare(image_path, question):
            if not question or not question.strip():
                raise gr.Error("Type a question.")
            image, note = read_image(received_path(image_path, image_in.GRADIO_CACHE),
                                     getattr(ok[0].processor, "to_rgb", None) if ok else None)
            status_text = f"*{note}*" if note else ""
            first = []
            for v in ok:
                first += [keep_picture(v, image), "", None]
            yield (status_text, *first)
            for i, v in enumerate(ok):
                # while streaming, only this variant's answer and costs change: the rest is skipped
                for text, costs in answer_stream(v, image, question.strip()):
                    first[3 * i + 1] = text
                    table = None if costs is None else cost_rows(costs)
                    if table is not None:
                        first[3 * i + 2] = table
                    partial = [gr.skip()] * len(first)
                    partial[3 * i + 1], partial[3 * i + 2] = text, table if table is not None else gr.skip()
                    yield (gr.skip(), *partial)
            yield (status_text, *first)  # the complete result, for API clients

        workers = max(1, (os.cpu_count() or 1) // 2)
        # preprocess=False: the upload reaches `read_image` as it is, so a bad file gets this page's message;
        # `received_path` lets through only files gradio received
        submit.click(compare, [image_in, question_in], [status, *outputs], api_name="compare", preprocess=False,
                     concurrency_limit=workers, time_limit=TIME_LIMIT_S * max(1, len(ok)) + 30)
        demo.queue(max_size=64, default_concurrency_limit=workers)
    return demo


def create_demo() -> gr.Blocks:
    return build_demo([load_variant(source, label) for source, label in model_sources()])


def server_name() -> str:
    """All interfaces on a Hugging Face Space (it sets SPACE_ID), this machine only anywhere else."""
    return os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")


if __name__ == "__main__":
    create_demo().launch(server_name=server_name(), theme=gr.themes.Soft())
