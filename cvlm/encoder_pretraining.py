"""A short, cached pre-training of the tiny vision encoder on synthetic pictures, so that the offline
study starts, like the paper, from an encoder whose patch features already say what is where.

A frozen *random* ViT mixes a small object's pixels into its patch feature with everything else
in the patch; a from-scratch tiny LM then needs thousands of steps to find it (measured in the
README's study section). Here the encoder learns, on pictures drawn by the synthetic benchmark's
own generator (a random stream of its own, never the train or test pictures), to name for each
patch the kind, colour and digit of the objects centred in it, and from the mean of its patch
features the picture's background, shading and brightness. The heads read the layer the
connectors read (`feature_layer`, -2 by default); they are thrown away and the encoder is saved
as a plain vision-model folder that `cvlm build --vision FOLDER` takes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cvlm.files import atomic_folder, check_output, read_json
from cvlm.eval.synthetic import BACKGROUNDS, BRIGHTNESS, COLOURS, DIGITS, KINDS, SHADINGS, SUBTASKS, Difficulty, make_item

# multi-hot per patch, for the objects centred in it: kind, colour, both together, digit
PATCH_LABELS = [*KINDS, *COLOURS, *(f"{c} {k}" for k in KINDS for c in COLOURS), *DIGITS]
SCENE_LABELS = {"background": list(BACKGROUNDS), "shading": list(SHADINGS), "brightness": list(BRIGHTNESS)}
FACTS = "cvlm_encoder_pretraining.json"


def patch_targets(scene: dict, image_size: int, patch_size: int) -> torch.Tensor:
    """(grid, grid, len(PATCH_LABELS)) multi-hot: what is centred in each patch."""
    grid = image_size // patch_size
    target = torch.zeros(grid, grid, len(PATCH_LABELS))
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        r, c = min(grid - 1, (y0 + y1) // 2 // patch_size), min(grid - 1, (x0 + x1) // 2 // patch_size)
        names = [obj["kind"], obj["colour"], f"{obj['colour']} {obj['kind']}"] + ([obj["value"]] if "value" in obj else [])
        for name in names:
            target[r, c, PATCH_LABELS.index(name)] = 1
    return target


class _Heads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.Linear(width, len(PATCH_LABELS))
        self.scene = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in SCENE_LABELS.items()})


def _features(vision, pixel_values, feature_layer: int, grid_tokens: int) -> torch.Tensor:
    """The patch tokens of `feature_layer` (a CLS or other prefix token dropped)."""
    out = vision(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[feature_layer][:, -grid_tokens:]


def _pictures(processor, image_size: int, patch_size: int, pictures: int, seed: int):
    """The synthetic pictures (every subtask in turn) as pixels, with their per-patch and scene labels."""
    difficulty = Difficulty(image_size=image_size, object_size=max(2, round(6 * image_size / 64)))
    rng = random.Random(f"{seed}-encoder")
    subtasks = list(SUBTASKS)
    items = [make_item(subtasks[i % len(subtasks)], rng, difficulty) for i in range(pictures)]
    pixels = processor([item.image for item in items], return_tensors="pt")["pixel_values"]
    patch_y = torch.stack([patch_targets(item.scene, image_size, patch_size) for item in items]).flatten(1, 2)
    scene_y = {k: torch.tensor([v.index(item.scene[k]) for item in items]) for k, v in SCENE_LABELS.items()}
    return pixels, patch_y, scene_y


def _fit(vision_model, heads, data, train_count: int, steps: int, batch_size: int, lr: float, seed: int,
         feature_layer: int, grid_tokens: int, image_size: int) -> list[list]:
    """Trains the encoder and the heads on the first `train_count` pictures; [step, loss] per step. The
    models come back on the CPU in eval mode."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vision_model.to(device)
    heads.to(device)
    pixels, patch_y, scene_y = data[0].to(device), data[1].to(device), {k: v.to(device) for k, v in data[2].items()}
    vision_model.train()
    params = [*vision_model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    pos_weight = ((1 - patch_y.mean((0, 1))) / patch_y.mean((0, 1)).clamp_min(1e-4)).clamp(1, 100)
    bar = tqdm(range(steps), desc=f"pre-training the encoder ({image_size} px)", unit="step")
    losses = []
    for step in bar:
        index = torch.randint(train_count, (batch_size,), generator=generator).to(device)
        feats = _features(vision_model, pixels[index], feature_layer, grid_tokens)
        # few patches hold an object: positives weigh as much as all the empty patches together
        loss = nn.functional.binary_cross_entropy_with_logits(heads.patch(feats), patch_y[index], pos_weight=pos_weight)
        pooled = feats.mean(1)
        for key, head in heads.scene.items():
            loss = loss + nn.functional.cross_entropy(head(pooled), scene_y[key][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append([step + 1, round(loss.item(), 5)])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    vision_model.eval().to("cpu")
    heads.to("cpu")
    return losses


def pretrain_encoder(output: str | os.PathLike, image_size: int, steps: int = 300, batch_size: int = 32,
                     pictures: int = 2000, seed: int = 0, vision: str = "tiny-clip", width: int | None = None,
                     layers: int | None = None, feature_layer: int = -2, lr: float = 3e-3) -> Path:
    """Pre-trains (or, when `output` already holds this exact run, reuses) a tiny vision encoder;
    returns the folder. Written atomically: an interrupted run leaves nothing behind."""
    from cvlm.build import load_vision

    output = check_output(output)
    facts = {"vision": vision, "image_size": image_size, "steps": steps, "batch_size": batch_size,
             "pictures": pictures, "seed": seed, "width": width, "layers": layers, "feature_layer": feature_layer,
             "lr": lr, "patch_labels": PATCH_LABELS, "scene_labels": SCENE_LABELS}
    if (output / FACTS).exists():
        saved = read_json(output / FACTS, "encoder facts")
        if {k: saved.get(k) for k in facts} == facts and (output / "model.safetensors").is_file():
            return output
    vision_model, processor = load_vision(vision, image_size, "float32", seed, width, layers)
    patch_size = vision_model.config.patch_size
    grid_tokens = (image_size // patch_size) ** 2
    pixels, patch_y, scene_y = _pictures(processor, image_size, patch_size, pictures, seed)
    torch.manual_seed(seed)
    heads = _Heads(vision_model.config.hidden_size)
    held_out = min(256, pictures // 4)  # the last pictures: never trained on, they measure the heads
    train_count = pictures - held_out
    losses = _fit(vision_model, heads, (pixels, patch_y, scene_y), train_count, steps=steps, batch_size=batch_size,
                  lr=lr, seed=seed, feature_layer=feature_layer, grid_tokens=grid_tokens, image_size=image_size)
    with torch.no_grad():  # how well the heads read the held-out end of the pictures
        held = slice(train_count, None)
        feats = _features(vision_model, pixels[held], feature_layer, grid_tokens)
        predicted, truth = heads.patch(feats) > 0, patch_y[held].bool()
        hits = (predicted & truth).sum().item()  # F1 over the (rare) positive labels: what is where
        facts["patch_label_f1"] = round(2 * hits / max(1, predicted.sum().item() + truth.sum().item()), 4)
        facts["scene_accuracy"] = {k: round((head(feats.mean(1)).argmax(-1) == scene_y[k][held]).float().mean().item(), 4)
                                   for k, head in heads.scene.items()}
    facts["final_loss"] = losses[-1][1]
    facts["losses"] = losses[:: max(1, steps // 50)]

    with atomic_folder(output) as staging:
        vision_model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / FACTS).write_text(json.dumps(facts, indent=2))
    return output
