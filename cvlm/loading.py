"""Loading checkpoints in the project's own commands, without running code nobody agreed to run.

A checkpoint of this family is loaded with the installed classes (`cvlm.modeling`), so none of the
Python files it carries runs; the tokenizer and image processor are loaded with
`trust_remote_code=False`. Any other checkpoint that names custom code in an `auto_map` needs an
explicit `--trust-remote-code`, as transformers' own tools do. `auto_map` entries that point outside
the checkpoint (`other/repo--module.Class`, or a module file it does not hold) are warned about here
and refused by `cvlm push` and `cvlm card`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cvlm.files import MODEL_TYPE, read_json

logger = logging.getLogger(__name__)
CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the fix."""


def auto_map_entries(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(file, reference) for every class the folder's configs ask transformers to import from code."""
    entries = []
    for name in CODE_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
        except (ValueError, AttributeError, OSError):
            continue
        if isinstance(auto_map, dict):
            values = auto_map.values()
        else:
            values = [auto_map]
        for value in values:
            for reference in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(reference, str):
                    entries.append((name, reference))
    return entries


def outside_references(folder: str | os.PathLike) -> list[str]:
    """`auto_map` entries whose code is not in the folder itself: another repo (`repo--module.Class`) or
    a module file the folder does not hold."""
    bad = []
    for name, reference in auto_map_entries(folder):
        module = reference.rsplit(".", 1)[0]
        if "--" in reference or "/" in module or not (Path(folder) / f"{module}.py").is_file():
            bad.append(f"{name}: {reference}")
    return bad


def check_weights(folder: str | os.PathLike) -> None:
    """Every safetensors file of a local checkpoint opens and holds all the bytes its header promises."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files and not any(Path(folder).glob("*.safetensors.index.json")):
        raise CheckpointError(f"{folder} holds no *.safetensors weights: it is not a complete checkpoint (weights are "
                              "read from safetensors only).")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(f"{file} cannot be read ({error}): the file is incomplete or damaged. Copy or "
                                  "download it again, or rebuild the checkpoint.") from None


def read_config(model_id: str) -> dict:
    """The checkpoint's config.json as a dict, read without importing anything it names."""
    path = Path(model_id)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{model_id} has no config.json: it is not a saved model folder.")
        return read_json(path / "config.json", "checkpoint config")
    if path.exists():
        raise CheckpointError(f"{model_id} is a file; give the checkpoint's folder or a Hub repo id.")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise FileNotFoundError(f"{model_id}: no such checkpoint folder.")
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(model_id)[0]


def load_processor(model_id: str):
    """The family's processor, with the installed class and no tokenizer code from the folder; an
    `auto_map` its tokenizer named is dropped, so a checkpoint saved from it names no code it lacks."""
    from cvlm.modeling import ConnectorVLMProcessor

    processor = ConnectorVLMProcessor.from_pretrained(model_id, trust_remote_code=False)
    for part in (processor.tokenizer, processor.image_processor):
        if isinstance(getattr(part, "init_kwargs", None), dict):
            part.init_kwargs.pop("auto_map", None)
    return processor


def load_checkpoint(model_id: str, trust_remote_code: bool = False, dtype=None):
    """(model, processor) for inference: this family through the installed classes; anything else
    through the Auto classes, running its own code only with `trust_remote_code`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cvlm.modeling import ConnectorVLMForConditionalGeneration

    dtype = dtype or torch.float32
    config = read_config(str(model_id))
    local = Path(model_id).is_dir()
    family = config.get("model_type") == MODEL_TYPE
    if not family and (config.get("auto_map") or (local and auto_map_entries(model_id))) and not trust_remote_code:
        raise CheckpointError(f"{model_id} is not a connector-vlm checkpoint and names its own code (auto_map). "
                              "Read that code, then pass --trust-remote-code to run it.")
    if local:
        check_weights(model_id)
        for entry in outside_references(model_id):
            logger.warning("%s: auto_map entry %s points outside the checkpoint; the project's commands never run "
                           "it, and `cvlm push` refuses it.", model_id, entry)
    if family:
        model = ConnectorVLMForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        return model.eval(), load_processor(model_id)
    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=trust_remote_code, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model.eval(), processor
