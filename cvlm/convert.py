"""LLaVA checkpoints in and out of the family: weights renamed, never re-initialised.

- `from_llava(SRC, OUT)`: a transformers `LlavaForConditionalGeneration` checkpoint (Hub id or
  folder), or a LLaVA-repo checkpoint (a LM folder whose config has `mm_projector_type`, with the
  projector in its shards or in `mm_projector.bin/.safetensors`), becomes a family checkpoint with
  the `mlp` (or `linear`) connector, the same feature layer(s), select strategy, tokenizer, chat
  template and image processor.
- `to_llava(DIR, OUT)`: back to `LlavaForConditionalGeneration`, for the connectors LLaVA can
  express: `mlp` with 2 layers, `linear` (as Linear, identity activation, identity Linear), and
  multi-layer channel concatenation. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from cvlm.build import save_checkpoint
from cvlm.files import MODEL_TYPE, atomic_folder, check_output
from cvlm.loading import check_weights, load_processor, read_config
from cvlm.modeling import ConnectorVLMConfig, ConnectorVLMForConditionalGeneration, ConnectorVLMProcessor

# a LlavaForConditionalGeneration checkpoint's weight names -> the family's, for from_pretrained(key_mapping=...):
# the layout transformers writes now (only the projector differs) and the one it wrote before 4.52
LLAVA_KEY_MAPPING = {
    r"^(?:model\.)?multi_modal_projector\.linear_1\.": "model.connector.layers.0.",
    r"^(?:model\.)?multi_modal_projector\.linear_2\.": "model.connector.layers.2.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


CONVERT_FACTS = "cvlm_convert.json"  # marks a to-llava output as written by this project


class ConversionError(ValueError):
    """What cannot be converted, and why."""


def _num_prefix(config: ConnectorVLMConfig) -> int:
    return config.num_vision_prefix_tokens


# ---- from LLaVA ---------------------------------------------------------------------------------
def from_llava(source: str, output: str | os.PathLike, projector: str | None = None, vision: str | None = None,
               overwrite: bool = False) -> Path:
    """Converts a transformers LLaVA checkpoint or a LLaVA-repo checkpoint; returns the output folder.
    Both are recognised from their config before any weight is read (a folder of another kind would
    otherwise become a default-sized LLaVA)."""
    check_output(output, overwrite)
    raw = read_config(str(source))
    if "mm_projector_type" in raw:
        return _from_llava_repo(source, raw, output, projector, vision, overwrite)
    if raw.get("model_type") != "llava":
        raise ConversionError(
            f"{source} is a {raw.get('model_type')!r} checkpoint. from-llava takes a LlavaForConditionalGeneration "
            "checkpoint (model_type 'llava') or a LLaVA-repo LM folder (its config has mm_projector_type).")
    if projector or vision:
        raise ConversionError("--projector and --vision belong to LLaVA-repo checkpoints; a transformers LLaVA "
                              "checkpoint carries both already: drop them.")
    from transformers import AutoProcessor, GenerationConfig

    llava_processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    lc = LlavaConfig.from_pretrained(source)
    strategy = lc.vision_feature_select_strategy
    config = ConnectorVLMConfig(
        vision_config=lc.vision_config.to_dict(), text_config=lc.text_config.to_dict(), connector_type="mlp",
        connector_config={"depth": 2, "act": lc.projector_hidden_act, "bias": lc.multimodal_projector_bias},
        vision_feature_layer=lc.vision_feature_layer, vision_feature_select_strategy=strategy,
        image_token_id=lc.image_token_id, tie_word_embeddings=getattr(lc, "tie_word_embeddings", False),
    )
    if strategy == "default" and _num_prefix(config) != 1:
        raise ConversionError(
            f"{source}: LLaVA's 'default' strategy drops the first token, but this encoder "
            f"({config.vision_config.model_type}) has {_num_prefix(config)} prefix tokens, so LLaVA drops a real "
            "patch; connector-vlm keeps every patch and cannot express that. Use the 'full' strategy in LLaVA."
        )
    # transformers reads the weights into the family's names; every weight must land, none may be left over
    model, loading = ConnectorVLMForConditionalGeneration.from_pretrained(
        source, config=config, key_mapping=LLAVA_KEY_MAPPING, dtype=lc.text_config.dtype or "auto",
        output_loading_info=True)
    lost = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if lost:
        raise ConversionError(f"{source}: the weights do not map one to one onto the family's: {lost}.")
    # transformers saves a model in the names it was read from (it reverts the key mapping on save): the
    # converted model is the family's, so it forgets them and saves in its own
    del model._weight_conversions
    model.eval()
    model.generation_config = GenerationConfig.from_model_config(lc) if not (Path(str(source)) / "generation_config.json").exists() \
        else GenerationConfig.from_pretrained(source)
    processor = ConnectorVLMProcessor(image_processor=llava_processor.image_processor, tokenizer=llava_processor.tokenizer,
                                      num_image_tokens=config.num_image_tokens, chat_template=llava_processor.chat_template,
                                      image_token=llava_processor.image_token)
    model.build_facts = {"converted_from": str(source), "format": "transformers LlavaForConditionalGeneration"}
    return save_checkpoint(model, processor, output, overwrite=overwrite)


def _assemble(config: ConnectorVLMConfig, state: dict, dtype) -> ConnectorVLMForConditionalGeneration:
    with torch.device("meta"):
        model = ConnectorVLMForConditionalGeneration(config)
    mine = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        mine.discard("lm_head.weight")
    missing, unexpected = sorted(mine - set(state)), sorted(set(state) - mine)
    if missing or unexpected:
        raise ConversionError(f"Weights do not map one to one: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config.dtype = dtype
    return model.eval()


def _from_llava_repo(source: str, raw: dict, output, projector: str | None, vision: str | None, overwrite: bool) -> Path:
    """The LLaVA repo's format: an LM folder (model_type llava_llama / llava_mistral ...) with
    mm_projector_type, mm_vision_select_layer, mm_vision_select_feature and mm_vision_tower."""
    kind = raw["mm_projector_type"]
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if kind != "linear" and not match:
        raise ConversionError(f"{source}: mm_projector_type {kind!r} is not supported. Allowed: linear, mlpNx_gelu.")
    base_type = raw["model_type"].replace("llava_", "") if raw["model_type"].startswith("llava_") else raw["model_type"]
    text_config = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("auto_map", "architectures")}
    text_config["model_type"] = {"llava": "llama", "llava_llama": "llama"}.get(raw["model_type"], base_type)
    lm_state = _read_shards(Path(source))
    proj_state = {k.split("mm_projector.", 1)[1]: v for k, v in lm_state.items() if "mm_projector." in k}
    if projector:
        proj_state = _read_weights(Path(projector))
        proj_state = {k.split("mm_projector.", 1)[1] if "mm_projector." in k else k: v for k, v in proj_state.items()}
    if not proj_state:
        raise ConversionError(f"{source} holds no mm_projector weights: pass --projector mm_projector.bin.")
    vision_id = vision or raw.get("mm_vision_tower")
    if not vision_id:
        raise ConversionError(f"{source} names no mm_vision_tower: pass --vision.")
    vision_config = AutoConfig.from_pretrained(vision_id)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    select = raw.get("mm_vision_select_feature", "patch")
    if kind == "linear":
        connector, hyper = "linear", {"bias": True}
        renames = {"": "model.connector.proj."}
    else:
        connector, hyper = "mlp", {"depth": int(match.group(1)), "act": "gelu", "bias": True}
        renames = {f"{2 * i}.": f"model.connector.layers.{2 * i}." for i in range(hyper["depth"])}
    config = ConnectorVLMConfig(
        vision_config=vision_config.to_dict(), text_config=text_config, connector_type=connector, connector_config=hyper,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    vocab = max(len(tokenizer), config.text_config.vocab_size)
    config.text_config.vocab_size = vocab
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision_model = AutoModel.from_pretrained(vision_id, dtype="auto")
    state = _llava_repo_state(getattr(vision_model, "vision_model", vision_model), lm_state, proj_state, renames, vocab)
    model = _assemble(config, state, next(iter(lm_state.values())).dtype)
    image_processor = AutoImageProcessor.from_pretrained(vision_id)
    processor = ConnectorVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      num_image_tokens=config.num_image_tokens, chat_template=_template(tokenizer))
    model.build_facts = {"converted_from": str(source), "format": "LLaVA repository", "vision": vision_id}
    return save_checkpoint(model, processor, output, overwrite=overwrite)


def _llava_repo_state(vision_model, lm_state: dict, proj_state: dict, renames: dict, vocab: int) -> dict:
    """The family's state dict from a LLaVA-repo checkpoint: the vision tower's, the LM's (its mm_ weights
    left out) and the projector's, renamed; embeddings grown to `vocab` rows (an added <image>) with the mean
    row, deterministically (resize_token_embeddings(mean_resizing=True) samples, so a conversion would not repeat)."""
    state = {f"model.vision_tower.{k}": v for k, v in vision_model.state_dict().items()}
    for key, value in lm_state.items():
        if "mm_projector." in key or "vision_tower" in key:
            continue
        if key == "lm_head.weight":
            state[key] = value
        elif key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
    for key, value in proj_state.items():
        prefix = next(p for p in sorted(renames, key=len, reverse=True) if key.startswith(p))
        state[renames[prefix] + key[len(prefix):]] = value
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] < vocab:
            grown = state[key].new_zeros(vocab, state[key].shape[1])
            grown[: state[key].shape[0]] = state[key]
            grown[state[key].shape[0]:] = state[key].mean(0)
            state[key] = grown
    return state


def _template(tokenizer) -> str:
    from cvlm.build import FLATTEN_CONTENT_PRELUDE
    from cvlm.presets import CHATML_TEMPLATE

    return FLATTEN_CONTENT_PRELUDE + (tokenizer.chat_template or CHATML_TEMPLATE)


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing is unpickled


def _read_shards(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    files = [f for f in files if not f.name.startswith("mm_projector")]
    if not files:
        raise ConversionError(f"{folder} has no model weights (*.safetensors or pytorch_model*.bin).")
    state = {}
    for f in files:
        state.update(_read_weights(f))
    return state


# ---- to LLaVA -----------------------------------------------------------------------------------
def _llava_weights(model) -> tuple[dict, str, bool]:
    """(LLaVA's state dict, its projector activation, whether the projector has biases) of a family model
    whose connector LLaVA can express: a 2-layer mlp as it is; linear as Linear -> identity -> identity Linear."""
    config = model.config
    kind, hyper, width = config.connector_type, config.connector_config, config.text_config.hidden_size
    weights = model.state_dict()
    state = {k: v for k, v in weights.items() if not k.startswith("model.connector.")}
    projector = "model.multi_modal_projector."
    if kind == "mlp":
        for i, name in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                if f"model.connector.layers.{i}.{p}" in weights:
                    state[f"{projector}{name}.{p}"] = weights[f"model.connector.layers.{i}.{p}"]
        return state, hyper["act"], hyper["bias"]
    state[f"{projector}linear_1.weight"] = model.model.connector.proj.weight.detach()
    if hyper["bias"]:
        state[f"{projector}linear_1.bias"] = model.model.connector.proj.bias.detach()
        state[f"{projector}linear_2.bias"] = torch.zeros(width, dtype=model.dtype)
    state[f"{projector}linear_2.weight"] = torch.eye(width, dtype=model.dtype)
    return state, "linear", hyper["bias"]  # "linear": the identity activation


def to_llava(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """A family checkpoint with a connector LLaVA can express, as LlavaForConditionalGeneration."""
    from transformers import LlavaProcessor

    output = check_output(output, overwrite)
    if read_config(str(source)).get("model_type") != MODEL_TYPE:
        raise ConversionError(f"{source} is not a connector-vlm checkpoint: to-llava converts this family's checkpoints.")
    if Path(source).is_dir():
        check_weights(source)
    model = ConnectorVLMForConditionalGeneration.from_pretrained(source, dtype="auto")
    processor = load_processor(source)
    config = model.config
    kind, hyper = config.connector_type, config.connector_config
    if not (kind == "linear" or (kind == "mlp" and hyper["depth"] == 2)):
        raise ConversionError(
            f"The {kind!r} connector{' with depth ' + str(hyper.get('depth')) if kind == 'mlp' else ''} cannot be "
            "expressed by LlavaForConditionalGeneration, whose projector is Linear -> activation -> Linear on "
            "per-patch features. Convertible: linear, mlp with depth 2 (any feature layers)."
        )
    prefix = config.num_vision_prefix_tokens
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and prefix not in (0, 1):
        raise ConversionError(f"LLaVA's 'default' strategy drops exactly one token; this encoder has {prefix}.")
    llava_strategy = "full" if prefix == 0 else strategy  # no CLS: keep every patch, as 'default' does here
    state, act, bias = _llava_weights(model)
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id, image_seq_length=config.num_image_tokens, projector_hidden_act=act,
        vision_feature_select_strategy=llava_strategy, vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=bias, tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava_config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    llava.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    llava.tie_weights()
    llava.generation_config = model.generation_config
    patch = config.vision_config.patch_size
    with atomic_folder(output) as staging:
        llava.save_pretrained(staging)
        LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=patch,
                       vision_feature_select_strategy=llava_strategy, chat_template=processor.chat_template,
                       num_additional_image_tokens=prefix).save_pretrained(staging)
        (staging / CONVERT_FACTS).write_text(json.dumps({"converted_from": str(source), "format": "to-llava"}) + "\n")
    return output
