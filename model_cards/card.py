"""Model cards filled from what the project recorded in a checkpoint folder, never typed numbers.

Reads `config.json` (the connector, the backbones) and, when present, `cvlm_training.json` (the
training run). A fact the folder does not hold is written as "not recorded".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cvlm.files import atomic_path

NOT_RECORDED = "not recorded"
BUILD_FACTS = "cvlm_build.json"
EVAL_DIR = "eval_results"  # one <benchmark>.json (cvlm eval's results.json) per benchmark
BENCHMARK_NAMES = {"mme": "MME", "mmbench": "MMBench", "seed_bench": "SEED-Bench"}
PAPERS = {"connectors": "To Preserve or To Compress (arXiv 2410.06765)"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A connector-vlm checkpoint: **{{ vision }}** vision encoder → **`{{ connector }}`** connector
({{ family }}, {{ num_tokens }} visual tokens per image) → **{{ llm }}** language model.

## Connector

| | |
|---|---|
| connector | `{{ connector }}` ({{ family }}), {{ connector_params }} parameters |
| hyper-parameters | {{ hyper }} |
| visual tokens Q | {{ num_tokens }} for {{ image_size }} px images ({{ grid }} patch grid) |
| vision features | hidden-state layer(s) {{ layers }}, strategy `{{ strategy }}` |
| from | {{ source }} |

## Training

{{ training }}

## Evaluation

{{ evaluation }}

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

repo = "{{ repo }}"
model = AutoModel.from_pretrained(repo, trust_remote_code=True, dtype=torch.float32)  # pin revision= for safety
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=[text], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Limitations

{{ limitations }}

## Citation

{{ citations }}
"""


def _training_section(facts: dict | None) -> str:
    if not facts:
        return f"Training: {NOT_RECORDED} (the connector is freshly initialised unless trained elsewhere)."
    stages = [*facts.get("previous_stages", []), facts]
    rows = ["| stage | data | samples | steps | batch | learning rate | LoRA | trainable parameters | final loss | hardware | wall time |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in stages:
        lora = (f"r={s['lora']['lora_r']}, alpha={s['lora']['lora_alpha']}" if s.get("lora")
                else ("full LM" if s.get("lm_full") else "-"))
        trainable = ", ".join(f"{k} {v:,}" for k, v in (s.get("trainable_parameters") or {}).items() if v)
        loss = f"{s['final_loss']:.4f}" if isinstance(s.get("final_loss"), (int, float)) else NOT_RECORDED
        rows.append(f"| {s.get('stage')} | {Path(str(s.get('data'))).name} | {s.get('samples', NOT_RECORDED)} | "
                    f"{s.get('steps', NOT_RECORDED)} | {s.get('train_batch_size', NOT_RECORDED)} | "
                    f"{s.get('learning_rate', NOT_RECORDED)} | {lora} | {trainable or NOT_RECORDED} | {loss} | "
                    f"{s.get('hardware', NOT_RECORDED)} | {s.get('wall_time_s', NOT_RECORDED)} s |")
    return "\n".join(rows)


def headline_metrics(results: dict) -> list[tuple[str, str, float]]:
    """(metric type, metric name, value in %) of one `cvlm eval` results.json: the benchmark's own
    numbers, then the granularity breakdown (macro)."""
    m, rows = results["metrics"], []
    if results["benchmark"] == "mme":
        rows += [("mme_perception_score", "MME perception (max 2000)", m["perception_score"]),
                 ("mme_cognition_score", "MME cognition (max 800)", m["cognition_score"])]
    elif results["benchmark"] == "mmbench":
        rows += [("circular_accuracy", "CircularEval accuracy (%)", 100 * m["circular_accuracy"]),
                 ("single_pass_accuracy", "single-pass accuracy (%)", 100 * m["single_pass_accuracy"])]
    else:
        rows += [("accuracy", "accuracy (%)", 100 * m["accuracy"])]
    for granularity in ("coarse", "fine", "reasoning"):
        value = results["granularity"][granularity]["macro"]
        if value is not None:
            rows.append((f"{granularity}_macro", f"{granularity} (macro %)", value))
    return rows


def _evaluation_section(evals: dict[str, dict]) -> str:
    if not evals:
        return f"Evaluation results: {NOT_RECORDED} (run `cvlm eval --model THIS_FOLDER ...`)."
    lines = ["| benchmark | data | questions | result | coarse % | fine % | reasoning % |", "|---|---|---|---|---|---|---|"]
    speed = ["| benchmark | visual tokens / image | prefill (ms / batch) | decode tokens/s | peak memory (MB) | device |",
             "|---|---|---|---|---|---|"]
    for name, r in sorted(evals.items()):
        head = "; ".join(f"{label} {value:.2f}" for _, label, value in headline_metrics(r)[:2])
        g = r["granularity"]
        cells = [f"{g[k]['macro']:.1f}" if g[k]["macro"] is not None else "-" for k in ("coarse", "fine", "reasoning")]
        lines.append(f"| {BENCHMARK_NAMES.get(name, name)} | {Path(str(r['data'])).name} | {r['num_questions']} | "
                     f"{head} | {' | '.join(cells)} |")
        s = r["speed"]
        rate = "-" if s.get("decode_tokens_per_s") is None else f"{s['decode_tokens_per_s']:.1f}"
        speed.append(f"| {BENCHMARK_NAMES.get(name, name)} | {s['visual_tokens_per_image']} | "
                     f"{1000 * s['mean_prefill_latency_s']:.1f} | {rate} | {s['peak_memory_mb']:.0f} | {s['device']} |")
    return "\n".join(lines + ["", "Speed, measured during the same runs:", ""] + speed)


def _eval_results(evals: dict[str, dict]) -> list[EvalResult]:
    results = []
    for name, r in sorted(evals.items()):
        for metric_type, label, value in headline_metrics(r):
            results.append(EvalResult(task_type="image-text-to-text", dataset_type=name,
                                      dataset_name=BENCHMARK_NAMES.get(name, name), metric_type=metric_type,
                                      metric_name=label, metric_value=round(float(value), 4)))
    return results


def _backbone_name(spec: str | None, sub_config: dict) -> str:
    """The Hub id the backbone came from, or what it is when it was built or read locally."""
    if spec and not os.path.exists(spec) and "/" in spec:
        return spec
    kind = "tiny preset, built locally" if spec and spec.startswith("tiny-") else "local folder"
    return f"{spec or sub_config.get('model_type')} ({kind}, width {sub_config.get('hidden_size')}, " \
           f"{sub_config.get('num_hidden_layers')} layers)"


def write_card(folder: str | os.PathLike, repo_id: str | None = None, title: str | None = None) -> Path:
    """(Re)writes README.md in a checkpoint folder from its recorded facts."""
    from cvlm.files import MODEL_TYPE, read_json
    from cvlm.loading import outside_references

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: `cvlm card` writes the card of a checkpoint folder.")
    config = read_json(folder / "config.json", "checkpoint config")
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{folder} is not a connector-vlm checkpoint (model_type "
                         f"{config.get('model_type') if isinstance(config, dict) else None!r}); its card is not ours to write.")
    outside = outside_references(folder)
    if outside:
        raise ValueError(f"{folder}: auto_map entries point outside the checkpoint ({'; '.join(outside)}), so loading "
                         "it would run code it does not carry. Rebuild it with cvlm build or cvlm train.")
    facts_path, build_path = folder / "cvlm_training.json", folder / BUILD_FACTS
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else None
    built = json.loads(build_path.read_text()) if build_path.exists() else {}
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((folder / EVAL_DIR).glob("*.json"))}

    from cvlm.modeling import CONNECTORS, ConnectorVLMConfig

    cvlm_config = ConnectorVLMConfig.from_dict(config)
    connector_cls = CONNECTORS[cvlm_config.connector_type]
    vision = _backbone_name(built.get("vision"), config["vision_config"])
    llm = _backbone_name(built.get("llm"), config["text_config"])
    base_models = [n for n in (vision, llm) if "(" not in n]
    citations = [connector_cls.source, PAPERS["connectors"]]  # the connector class names its own paper
    title = repo_id or title or folder.name
    train_data = [s.get("data") for s in ([*facts.get("previous_stages", []), facts] if facts else [])]
    hub_datasets = sorted({d for d in train_data if d and "/" in d and not os.path.exists(d)})
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license="apache-2.0",
        tags=["connector-vlm", f"connector-{cvlm_config.connector_type}", connector_cls.family, "custom_code"],
        base_model=base_models or None, datasets=hub_datasets or None, model_name=title,
        eval_results=_eval_results(evals) or None,
    )
    connector_params = connector_cls.count_parameters(cvlm_config)
    grid = cvlm_config.vision_grid
    card = ModelCard.from_template(
        data, template_str=TEMPLATE,
        title=title, connector_params=f"{connector_params:,}", evaluation=_evaluation_section(evals),
        vision=vision, llm=llm, connector=cvlm_config.connector_type, family=connector_cls.family,
        num_tokens=cvlm_config.num_image_tokens, hyper=", ".join(f"`{k}={json.dumps(v)}`" for k, v in
                                                                 cvlm_config.connector_config.items()) or "none",
        image_size="x".join(map(str, cvlm_config.vision_image_size)), grid=f"{grid[0]}x{grid[1]}",
        layers=cvlm_config.connector_vision_layers, strategy=cvlm_config.vision_feature_select_strategy,
        source=connector_cls.source, training=_training_section(facts), repo=repo_id or "path/to/this/folder",
        limitations=("Trained only on the data listed above, and evaluated only as listed; numbers from tiny "
                     "presets or synthetic data say nothing about real images. Loading runs this repository's Python "
                     "code (trust_remote_code=True): pin a revision."),
        citations="\n".join(f"- {c}" for c in citations),
    )
    path = folder / "README.md"
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path
