"""Building a connector-VLM from any vision encoder + causal LM (Hub id, local folder or tiny preset).

`build_model` returns an in-memory model and processor; `save_checkpoint` writes the Hub-ready
folder (config, safetensors, processor + tokenizer files, the `modeling/` code with `auto_map`,
generation config) that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads with
nothing of this project installed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from cvlm.modeling import (
    ConnectorVLMConfig,
    ConnectorVLMForConditionalGeneration,
    ConnectorVLMProcessor,
)
from cvlm.model_cards.card import BUILD_FACTS, write_card
from cvlm import gguf
from cvlm.files import atomic_folder, check_output
from cvlm.modeling.configuration_connector_vlm import _pair
from cvlm.presets import CHATML_TEMPLATE, IMAGE_TOKEN, LM_PRESETS, VISION_PRESETS, tiny_lm, tiny_tokenizer, tiny_vision

AUTO_MAP = {
    "AutoConfig": "configuration_connector_vlm.ConnectorVLMConfig",
    "AutoModel": "modeling_connector_vlm.ConnectorVLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_connector_vlm.ConnectorVLMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_connector_vlm.ConnectorVLMForConditionalGeneration",
}

# Lets a processor take list-of-parts contents ({"type": "image"} / {"type": "text"}) on top of any
# LM's own string-content chat template: parts are flattened to "<image>\n" + text first.
FLATTEN_CONTENT_PRELUDE = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set flat.messages = flat.messages + [m] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set parts.text = parts.text + '" + IMAGE_TOKEN + "\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set parts.text = parts.text + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': parts.text}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid. Allowed values: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# ---- where a backbone comes from -----------------------------------------------------------------
def check_source(spec: str, flag: str, presets) -> None:
    """A preset, an existing folder with a config.json, or something shaped like a Hub id (org/name):
    anything else is named before transformers answers with a message about repo ids."""
    if spec in presets:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {spec}: the folder has no config.json, so it is not a saved model. "
                                    f"Point at the folder that save_pretrained wrote.")
        return
    if path.exists():
        raise ValueError(f"{flag} {spec} is a file; give a model folder, a Hub id or a preset ({', '.join(presets)}).")
    hub_id = spec.count("/") <= 1 and not spec.startswith((".", "/", "~")) and " " not in spec and spec.strip()
    if not hub_id:
        raise FileNotFoundError(f"{flag} {spec}: no such folder. Give a model folder, a Hub id (org/name) or a "
                                f"preset: {', '.join(presets)}.")


# ---- vision encoder ------------------------------------------------------------------------------
def _preset_size(spec: str, presets, **size) -> dict:
    """Width/depth overrides apply to the tiny presets only."""
    size = {k: v for k, v in size.items() if v is not None}
    if size and spec not in presets:
        raise ValueError(f"{', '.join(size)} resize the tiny presets only; {spec!r} has its own architecture.")
    return size


def load_vision(spec: str, image_size: int | None = None, dtype="auto", seed: int = 0, width=None, layers=None):
    """(vision model, image processor) from a preset name, a Hub id or a local folder."""
    size = _preset_size(spec, VISION_PRESETS, width=width, layers=layers)
    if spec in VISION_PRESETS:
        return tiny_vision(spec, image_size=image_size, seed=seed, **size)
    check_source(spec, "--vision", VISION_PRESETS)
    config = AutoConfig.from_pretrained(spec)
    vision_config = getattr(config, "vision_config", None) or config  # a full CLIP/SigLIP -> its vision tower
    try:
        model_cls = MODEL_MAPPING[type(vision_config)]
    except KeyError:
        raise ValueError(
            f"{spec!r} has a {vision_config.model_type!r} config, which has no transformers vision model. "
            f"Use a vision encoder (CLIP, SigLIP, DINOv2, ViT, ...) or a preset: {', '.join(VISION_PRESETS)}."
        ) from None
    model = model_cls.from_pretrained(spec, config=vision_config, dtype=_dtype(dtype))
    processor = AutoImageProcessor.from_pretrained(spec)
    if image_size is not None and image_size != _pair(vision_config.image_size)[0]:
        model, processor = resize_vision(model, processor, image_size)
    return model, processor


def resize_vision(model, processor, image_size: int):
    """A copy of a pretrained ViT for square `image_size` inputs: the patch grid of its position
    embeddings is bicubically interpolated (prefix positions kept), every other weight copied."""
    old_grid = _pair(model.config.image_size)[0] // _pair(model.config.patch_size)[0]
    config = copy.deepcopy(model.config)
    config.image_size = image_size
    new_grid = image_size // _pair(config.patch_size)[0]
    resized = AutoModel.from_config(config, dtype=model.dtype)
    target = resized.state_dict()
    state = {}
    for key, value in model.state_dict().items():
        if key in target and target[key].shape != value.shape:
            if value.ndim != 2 or value.shape[0] - old_grid**2 < 0:
                raise ValueError(f"Cannot resize {key} {tuple(value.shape)} -> {tuple(target[key].shape)}.")
            prefix = value.shape[0] - old_grid**2
            grid = value[prefix:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
            grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
            value = torch.cat([value[:prefix].float(), grid.permute(0, 2, 3, 1).reshape(new_grid**2, -1)]).to(value.dtype)
        state[key] = value
    resized.load_state_dict(state, strict=False)
    processor = copy.deepcopy(processor)
    if "shortest_edge" in dict(processor.size):
        processor.size = {"shortest_edge": image_size}
    else:
        processor.size = {"height": image_size, "width": image_size}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {"height": image_size, "width": image_size}
    return resized, processor


# ---- language model ------------------------------------------------------------------------------
def load_lm(spec: str, dtype="auto", seed: int = 0, width=None, layers=None):
    """(causal LM, tokenizer with <image>, generation config) from a preset, a Hub id or a folder."""
    size = _preset_size(spec, LM_PRESETS, width=width, layers=layers)
    source = spec
    if gguf.is_gguf_source(spec):  # converted once into a cached safetensors folder
        spec = gguf.resolve(spec)
    if spec in LM_PRESETS:
        tokenizer = tiny_tokenizer()
        lm = tiny_lm(spec, tokenizer, seed=seed, **size)
        generation_config = GenerationConfig.from_model_config(lm.config)
    else:
        check_source(spec, "--llm", LM_PRESETS)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        lm = AutoModelForCausalLM.from_pretrained(spec, dtype=_dtype(dtype))
        if spec != source:  # the checkpoint names the GGUF source, not this machine's cache folder
            lm.config._name_or_path = Path(source).name
        generation_config = copy.deepcopy(lm.generation_config)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    # batched generation pads on the left (training collators pad their own way); init_kwargs makes
    # save_pretrained record it, so the checkpoint reloads with it
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer, generation_config


# ---- the composite -------------------------------------------------------------------------------
def _check_patch_multiple(image_size: int | None, patch: int) -> None:
    if image_size is not None and image_size % patch:
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        raise ValueError(f"--image-size {image_size} is not a multiple of the encoder's patch size {patch}: the "
                         f"encoder would drop the last {image_size % patch} pixel rows. Use "
                         + (f"{below} or {above}." if below else f"{above}."))


def build_model(
    vision: str = "tiny-clip",
    llm: str = "tiny-llama",
    connector: str = "mlp",
    connector_args: dict | None = None,
    image_size: int | None = None,
    feature_layer: int | list[int] = -2,
    select_strategy: str = "default",
    seed: int = 0,
    dtype="auto",
    vision_width: int | None = None,
    vision_layers: int | None = None,
    llm_width: int | None = None,
    llm_layers: int | None = None,
):
    """A ConnectorVLMForConditionalGeneration with the backbones' weights and a seeded, freshly
    initialised connector, and its ConnectorVLMProcessor. `vision_width`, `vision_layers`,
    `llm_width`, `llm_layers` resize the tiny presets (e.g. for benchmarks)."""
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"--image-size {image_size!r} is invalid: use a positive number of pixels, e.g. 224.")
    vision_model, image_processor = load_vision(vision, image_size, dtype, seed, vision_width, vision_layers)
    _check_patch_multiple(image_size, _pair(vision_model.config.patch_size)[0])
    lm, tokenizer, generation_config = load_lm(llm, dtype, seed, llm_width, llm_layers)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = ConnectorVLMConfig(
        vision_config=vision_model.config.to_dict(),
        text_config=lm.config.to_dict(),
        connector_type=connector,
        connector_config=connector_args,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_token_id=image_token_id,
    )
    model = _assemble_model(config, vision_model, lm, llm, seed)
    generation_config.suppress_tokens = [image_token_id]  # the model must never write an <image> itself
    model.generation_config = generation_config
    model.eval()
    model.build_facts = {"vision": vision, "llm": llm, "connector": connector, "connector_args": connector_args or {},
                         "image_size": image_size, "feature_layer": feature_layer, "select_strategy": select_strategy,
                         "seed": seed}

    processor = ConnectorVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        chat_template=FLATTEN_CONTENT_PRELUDE + tokenizer.chat_template,
    )
    return model, processor


def _assemble_model(config: ConnectorVLMConfig, vision_model, lm, llm: str, seed: int):
    """The model around the loaded backbones (moved in, never re-initialised) and a connector seeded with `seed`."""
    with torch.device("meta"):  # skeleton only
        model = ConnectorVLMForConditionalGeneration(config)
    body = lm.base_model
    if type(body) is not type(model.model.language_model):
        raise ValueError(f"{llm!r}: its body is {type(body).__name__}, AutoModel builds {type(model.model.language_model).__name__}.")
    model.model.vision_tower = vision_model
    model.model.language_model = body
    model.lm_head = lm.get_output_embeddings()
    torch.manual_seed(seed)
    model.model.connector = config.connector_class(config)
    model.model.connector.apply(model._init_weights)
    model.to(lm.dtype)
    model.tie_weights()
    model.config.dtype = lm.dtype
    return model


def save_checkpoint(model, processor, output_dir: str | os.PathLike, keep_existing: bool = False,
                    overwrite: bool = False) -> Path:
    """Writes the complete Hub-ready folder atomically: into a hidden sibling, then renamed. An existing
    folder is replaced only when this project wrote it (or `overwrite`). With `keep_existing` (a
    training run's folder, holding its checkpoints), the files are written into a temporary subfolder
    and each moved into place with an atomic rename; other files stay."""
    output_dir = Path(output_dir)
    if keep_existing and output_dir.exists():
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
        try:
            save_checkpoint(model, processor, staging / "checkpoint")
            for path in sorted((staging / "checkpoint").iterdir()):
                os.replace(path, output_dir / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return output_dir
    output_dir = check_output(output_dir, overwrite)
    model.config.auto_map = dict(AUTO_MAP)  # all four Auto classes; registration alone writes one
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForImageTextToText")
    type(processor).register_for_auto_class("AutoProcessor")
    with atomic_folder(output_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if getattr(model, "build_facts", None):
            (staging / BUILD_FACTS).write_text(json.dumps(model.build_facts, indent=2) + "\n")
        write_card(staging, title=output_dir.name)
    return output_dir


def build(output: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
    """`cvlm build`: build_model(**kwargs) saved to `output` (checked before anything is built)."""
    check_output(output, overwrite)
    model, processor = build_model(**kwargs)
    return save_checkpoint(model, processor, output, overwrite=overwrite)
