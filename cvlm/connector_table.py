"""The connector registry as a table: name, family, Q for a grid, parameters (`cvlm connectors`)."""

from __future__ import annotations

import json

from cvlm.modeling import CONNECTORS, ConnectorVLMConfig


def connector_table(grid=(24, 24), vision_hidden: int = 1024, text_hidden: int = 4096, patch_size: int = 14,
                    num_encoder_layers: int = 24) -> list[dict]:
    """One row per registered connector with its default hyper-parameters, for a ViT of width
    `vision_hidden` and `num_encoder_layers` layers on a `grid` of patches, and an LM of width
    `text_hidden` (defaults: CLIP-L/14 at 336 px into a 7B LM, the connector paper's setting)."""
    grid_h, grid_w = grid
    vision = {
        "model_type": "clip_vision_model", "hidden_size": vision_hidden, "num_attention_heads": 1,
        "num_hidden_layers": num_encoder_layers, "patch_size": patch_size,
        "image_size": grid_h * patch_size if grid_h == grid_w else [grid_h * patch_size, grid_w * patch_size],
    }
    text = {"model_type": "llama", "hidden_size": text_hidden, "num_attention_heads": 1, "vocab_size": 32}
    rows = []
    for name, cls in CONNECTORS.items():
        config = ConnectorVLMConfig(vision_config=vision, text_config=text, connector_type=name)
        params = cls.count_parameters(config)
        rows.append({
            "name": name,
            "family": cls.family,
            "num_tokens": config.num_image_tokens,
            "params": params,
            "hyper_parameters": config.connector_config,
        })
    return rows


def connector_markdown(image_sizes=(224, 336, 448), patch_size: int = 14, vision_hidden: int = 1024,
                       text_hidden: int = 4096) -> str:
    """The registry as the README's Markdown table (`cvlm connectors --markdown`): Q for a
    CLIP-ViT-L/14 encoder at several input sizes, parameters for CLIP-L into a 4096-wide LM."""
    by_size = [connector_table(grid=(size // patch_size,) * 2, vision_hidden=vision_hidden, text_hidden=text_hidden,
                               patch_size=patch_size) for size in image_sizes]
    q_heads = " | ".join(f"Q @{size}px" for size in image_sizes)
    lines = [f"| connector | family | Q | {q_heads} | parameters | defaults | from |",
             "|---|---|---|" + "---|" * len(image_sizes) + "---|---|---|"]
    for i, name in enumerate(CONNECTORS):
        row = by_size[1][i] if len(by_size) > 1 else by_size[0][i]
        cls = CONNECTORS[name]
        qs = " | ".join(str(table[i]["num_tokens"]) for table in by_size)
        hyper = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in row["hyper_parameters"].items()) or "none"
        lines.append(f"| `{name}` | {cls.family} | {cls.formula} | {qs} | {row['params']:,} | {hyper} | {cls.source} |")
    return "\n".join(lines)
