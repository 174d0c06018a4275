"""LLaVA interoperability: conversion both ways with logit parity and bit-equal round trips."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from cvlm.build import build
from cvlm.convert import ConversionError, from_llava, to_llava
from cvlm.modeling import ConnectorVLMForConditionalGeneration, ConnectorVLMProcessor
from cvlm.presets import tiny_lm, tiny_tokenizer, tiny_vision

LLAVA_TEMPLATE = ("{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
                  "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}ASSISTANT:")
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def make_llava(folder, vision="tiny-clip", strategy="default", layer=-2, seed=0):
    tokenizer = tiny_tokenizer()
    vision_model, image_processor = tiny_vision(vision)
    config = LlavaConfig(vision_config=vision_model.config.to_dict(), text_config={**LLAMA, "vocab_size": len(tokenizer)},
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    prefix = 1 if vision == "tiny-clip" else 0
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=strategy, chat_template=LLAVA_TEMPLATE,
                               num_additional_image_tokens=prefix)
    processor.save_pretrained(folder)
    return model, processor


def inputs_for(processor):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What colour is it?"}]}], add_generation_prompt=True)
    return processor(images=[Image.new("RGB", (40, 40), (200, 30, 30))], text=[text], return_tensors="pt")


CASES = [("tiny-clip", "default", -2), ("tiny-siglip", "full", [-2, -1])]


@pytest.mark.parametrize("vision, strategy, layer", CASES, ids=["clip-default", "siglip-full-multilayer"])
def test_from_llava_matches_logits_and_generations_and_goes_back_bit_equal(tmp_path, vision, strategy, layer):
    llava, llava_processor = make_llava(tmp_path / "llava", vision, strategy, layer)
    out = from_llava(str(tmp_path / "llava"), tmp_path / "ours")
    ours = ConnectorVLMForConditionalGeneration.from_pretrained(out).eval()
    assert ours.config.connector_type == "mlp" and ours.config.vision_feature_layer == layer
    inputs = inputs_for(llava_processor)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, llava(**inputs).logits, atol=1e-5, rtol=0)
        mine = ours.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        theirs = llava.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(mine, theirs)
    # the processors expand <image> to the same number of tokens
    processor = ConnectorVLMProcessor.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(inputs_for(processor)["input_ids"], inputs["input_ids"])
    back = to_llava(out, tmp_path / "back")
    original, returned = load_file(tmp_path / "llava" / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_a_linear_connector_goes_to_llava_with_identity_second_layer(tmp_path):
    folder = build(tmp_path / "ours", vision="tiny-clip", llm="tiny-llama", connector="linear")
    ours = ConnectorVLMForConditionalGeneration.from_pretrained(folder).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(to_llava(folder, tmp_path / "llava")).eval()
    assert llava.config.projector_hidden_act == "linear"
    inputs = inputs_for(ConnectorVLMProcessor.from_pretrained(folder, trust_remote_code=True))
    with torch.no_grad():
        torch.testing.assert_close(llava(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("connector, args, message", [
    ("qformer", {}, "The 'qformer' connector cannot be expressed by LlavaForConditionalGeneration"),
    ("mlp", {"depth": 3}, "The 'mlp' connector with depth 3 cannot be expressed by LlavaForConditionalGeneration"),
])
def test_to_llava_refuses_what_llava_cannot_express(tmp_path, connector, args, message):
    folder = build(tmp_path / "ours", vision="tiny-clip", llm="tiny-llama", connector=connector, connector_args=args)
    with pytest.raises(ConversionError) as info:
        to_llava(folder, tmp_path / "llava")
    assert str(info.value).startswith(message)
    assert "Convertible: linear, mlp with depth 2 (any feature layers)." in str(info.value)


def test_from_llava_refuses_default_strategy_on_an_encoder_without_cls(tmp_path):
    make_llava(tmp_path / "llava", "tiny-siglip", "default", -2)
    with pytest.raises(ConversionError, match="LLaVA's 'default' strategy drops the first token, but this encoder"):
        from_llava(str(tmp_path / "llava"), tmp_path / "ours")


def test_llava_repo_format_with_a_separate_projector(tmp_path):
    """A LLaVA-repo checkpoint: an LM folder (model_type llava_llama, mm_* fields) + mm_projector.bin."""
    vision, image_processor = tiny_vision("tiny-clip", seed=3)
    vision.save_pretrained(tmp_path / "vision")
    image_processor.save_pretrained(tmp_path / "vision")
    tokenizer = tiny_tokenizer()
    lm = tiny_lm("tiny-llama", tokenizer, seed=3)
    lm.save_pretrained(tmp_path / "repo")
    tokenizer.save_pretrained(tmp_path / "repo")
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_projector_type="mlp2x_gelu",
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_vision_tower=str(tmp_path / "vision"),
                  mm_hidden_size=32)
    (tmp_path / "repo" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(5)
    projector = {"model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
                 "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    torch.save(projector, tmp_path / "mm_projector.bin")
    out = from_llava(str(tmp_path / "repo"), tmp_path / "ours", projector=str(tmp_path / "mm_projector.bin"))
    ours = ConnectorVLMForConditionalGeneration.from_pretrained(out)
    state = ours.state_dict()
    assert torch.equal(state["model.connector.layers.0.weight"], projector["model.mm_projector.0.weight"])
    assert torch.equal(state["model.connector.layers.2.bias"], projector["model.mm_projector.2.bias"])
    lm_state = load_file(tmp_path / "repo" / "model.safetensors")
    assert torch.equal(state["model.language_model.layers.1.mlp.up_proj.weight"], lm_state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       vision.state_dict()["encoder.layers.0.mlp.fc1.weight"])
    processor = ConnectorVLMProcessor.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.isfinite(ours(**inputs_for(processor)).logits).all()
    with pytest.raises(ConversionError, match="mm_projector_type 'resampler' is not supported"):
        config["mm_projector_type"] = "resampler"
        (tmp_path / "repo" / "config.json").write_text(json.dumps(config))
        from_llava(str(tmp_path / "repo"), tmp_path / "again")


def test_from_llava_reads_both_llava_weight_layouts_and_refuses_a_weight_it_cannot_place(tmp_path):
    """transformers writes LLaVA in its pre-4.52 names (language_model.model.*, vision_tower.*); checkpoints
    saved by 4.52-4.x use the runtime names (model.language_model.*, ...): both convert to the same weights."""
    import shutil

    from safetensors.torch import save_file

    llava, _ = make_llava(tmp_path / "llava")
    legacy = load_file(from_llava(str(tmp_path / "llava"), tmp_path / "ours") / "model.safetensors")
    shutil.copytree(tmp_path / "llava", tmp_path / "current")
    save_file({k: v.contiguous() for k, v in llava.state_dict().items()}, tmp_path / "current" / "model.safetensors",
              metadata={"format": "pt"})
    assert "model.multi_modal_projector.linear_1.weight" in load_file(tmp_path / "current" / "model.safetensors")
    current = load_file(from_llava(str(tmp_path / "current"), tmp_path / "ours-current") / "model.safetensors")
    assert sorted(current) == sorted(legacy) and all(torch.equal(current[k], legacy[k]) for k in legacy)
    assert "model.connector.layers.0.weight" in legacy  # saved in the family's names, not the source's

    weights = load_file(tmp_path / "current" / "model.safetensors")
    weights["model.multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "current" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"the weights do not map one to one onto the family's: "
                                              r"\{'unexpected_keys': \{'model.multi_modal_projector.linear_3.weight'\}\}"):
        from_llava(str(tmp_path / "current"), tmp_path / "ours-extra")
