"""Behaviour of the composite model: batching, KV cache, dtypes, attention backends, merging."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from cvlm.build import save_checkpoint
from cvlm.modeling.connectors import CONNECTORS
from helpers import COMBO_IDS, COMBOS, chat_prompt, greedy_no_cache, model_inputs, picture

QUESTIONS = ("What colour is the square?", "Is there a small red circle at the top left corner of the image?")
COLOURS = ((200, 30, 30), (30, 200, 90))


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    model, processor = built("tiny-clip", "tiny-llama", "mlp")
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("ckpt") / "tiny-mlp")


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_left_padded_batch_equals_each_prompt_alone(built, combo):
    model, processor = built(*combo)
    assert processor.tokenizer.padding_side == "left"
    batch = model_inputs(processor, QUESTIONS, COLOURS)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    with torch.no_grad():
        batch_logits = model(**batch).logits
        batch_out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i, (question, colour) in enumerate(zip(QUESTIONS, COLOURS)):
        alone = model_inputs(processor, (question,), (colour,))
        n = alone["input_ids"].shape[1]
        assert n == lengths[i]
        with torch.no_grad():
            alone_logits = model(**alone).logits
            alone_out = model.generate(**alone, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        torch.testing.assert_close(batch_logits[i, width - n:], alone_logits[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(batch_out[i, width:], alone_out[0, n:])


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_kv_cache_generate_equals_no_cache_greedy_loop(built, combo):
    model, processor = built(*combo)
    inputs = model_inputs(processor, QUESTIONS, COLOURS)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(cached, greedy_no_cache(model, inputs, 6))


def test_generate_encodes_the_image_once(built):
    model, processor = built()
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(**model_inputs(processor), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_and_bf16_both_run(saved, dtype, built):
    _, processor = built()
    model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = model_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_bf16_logits_close_to_fp32(saved, built):
    _, processor = built()
    inputs = model_inputs(processor)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True, dtype=dtype).eval()
        with torch.no_grad():
            logits[dtype] = model(**inputs).logits.float()
    # logits of a few units (the tiny LM starts at std 1/sqrt(width)): bf16's 8-bit mantissa leaves ~0.1
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], atol=0.1, rtol=0.05)


def test_sdpa_and_eager_agree(saved, built):
    _, processor = built()
    inputs = model_inputs(processor, QUESTIONS, COLOURS)
    logits = {}
    for impl in ("sdpa", "eager"):
        model = AutoModelForImageTextToText.from_pretrained(
            saved, trust_remote_code=True, dtype=torch.float32, attn_implementation=impl
        ).eval()
        assert model.config.text_config._attn_implementation == impl
        assert model.config.vision_config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits["sdpa"][mask], logits["eager"][mask], atol=1e-5, rtol=1e-4)


def test_text_only_prompt_runs_without_images(built):
    model, processor = built()
    text = processor.apply_chat_template([{"role": "user", "content": "Say a colour."}], add_generation_prompt=True)
    inputs = processor(text=[text], return_tensors="pt")
    assert "pixel_values" not in inputs
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_precomputed_image_features_give_the_same_logits(built):
    model, processor = built()
    inputs = model_inputs(processor)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
        direct = model(**inputs).logits
        reused = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       mm_encoder_outputs={"image": features}).logits
    assert torch.equal(direct, reused)
    assert len(features.pooler_output) == 1
    assert tuple(features.pooler_output[0].shape) == (model.config.num_image_tokens, model.config.text_config.hidden_size)


def test_inputs_embeds_path_equals_input_ids_path(built):
    model, processor = built()
    inputs = model_inputs(processor)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_ids = model(**inputs).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                          pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-6, rtol=1e-6)


def test_labels_give_the_shifted_causal_lm_loss(built):
    model, processor = built()
    inputs = model_inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[0, :-1], labels[0, 1:], ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


# ---- bad input: clear messages --------------------------------------------------------------------
def test_truncated_image_tokens_name_both_counts(built):
    model, processor = built()
    inputs = model_inputs(processor)
    q = model.config.num_image_tokens
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    cut = {k: v[:, : first + 5] if k != "pixel_values" else v for k, v in inputs.items()}
    with pytest.raises(ValueError) as info:
        model(**cut)
    assert str(info.value).startswith(f"The prompt has 5 <image> tokens but the images give {q} features (1 image(s) x {q} tokens).")
    assert "truncated" in str(info.value)


def test_image_tokens_without_pixel_values_are_embedded_as_text_as_llava_does(built):
    """LLaVA's choice (and what transformers' common tests with random ids expect): with no pictures,
    an <image> id is an ordinary token, looked up in the embedding table."""
    model, processor = built()
    inputs = model_inputs(processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert bool((ids == model.config.image_token_id).any())
    with torch.no_grad():
        by_ids = model(input_ids=ids, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    torch.testing.assert_close(by_ids, by_embeds, atol=0, rtol=0)


@pytest.mark.parametrize("connector", [pytest.param(name, marks=[] if name in ("mlp", "moe") else [pytest.mark.slow])
                                       for name in CONNECTORS])
def test_a_fullgraph_compiled_forward_equals_eager(built, connector):
    """`_can_compile_fullgraph`: no host sync on the forward path, so torch.compile(fullgraph=True) traces
    the whole model, pictures included, and gives eager's logits."""
    model, processor = built("tiny-clip", "tiny-llama", connector)
    assert type(model)._can_compile_fullgraph
    inputs = model_inputs(processor, QUESTIONS, COLOURS)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True)(**inputs).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_pixel_values_of_the_wrong_size_are_refused(built):
    model, processor = built()
    inputs = model_inputs(processor)
    with pytest.raises(ValueError) as info:
        model(**{**inputs, "pixel_values": torch.zeros(1, 3, 48, 48)})
    assert str(info.value) == (
        "pixel_values are (48, 48) (HxW) but the vision encoder is configured for (32, 32). "
        "Prepare images with this checkpoint's processor (AutoProcessor)."
    )


def test_processor_expands_each_image_to_q_tokens(built):
    model, processor = built()
    q = model.config.num_image_tokens
    assert processor.num_image_tokens == q
    two = processor(images=[picture((1, 2, 3)), picture((4, 5, 6))],
                    text=[chat_prompt(processor, "Same colour?", n_images=2)], return_tensors="pt")
    assert int((two["input_ids"] == model.config.image_token_id).sum()) == 2 * q
    assert tuple(two["pixel_values"].shape) == (2, 3, 32, 32)


def test_processor_names_the_sample_that_differs(built):
    _, processor = built()
    texts = [chat_prompt(processor, "first"), chat_prompt(processor, "second", n_images=0)]
    with pytest.raises(ValueError) as info:
        processor(images=[picture((1, 1, 1)), picture((2, 2, 2))], text=texts, padding=True)
    assert str(info.value) == (
        "2 images for 2 samples, one each, but sample 1 has 0 <image> token(s). "
        "Put exactly one <image> in each sample's text."
    )
    with pytest.raises(ValueError) as info:
        processor(images=[[picture((1, 1, 1))], [picture((2, 2, 2))]], text=texts, padding=True)
    assert str(info.value) == (
        "Sample 1 has 0 <image> token(s) but 1 image(s). Put one <image> in the text for each image of that sample."
    )
    with pytest.raises(ValueError) as info:
        processor(images=[picture((1, 1, 1))] * 3, text=texts, padding=True)
    assert str(info.value).startswith("The text has 1 <image> token(s) in all (per sample: [1, 0]) but 3 image(s)")


def test_processor_refuses_a_missing_token_count(built):
    from cvlm.modeling import ConnectorVLMProcessor

    _, processor = built()
    with pytest.raises(ValueError, match=r"num_image_tokens=None is invalid: pass the model config's num_image_tokens"):
        ConnectorVLMProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)


def test_every_auto_class_in_auto_map_loads_the_generation_class(saved, built):
    from transformers import AutoModel, AutoModelForCausalLM

    model, processor = built()
    inputs = model_inputs(processor)
    with torch.no_grad():
        expected = model(**inputs).logits
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(saved, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(loaded).__name__ == "ConnectorVLMForConditionalGeneration", auto.__name__
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected), auto.__name__


def test_return_dict_false_gives_the_same_outputs_as_a_tuple(built):
    model, processor = built()
    inputs = model_inputs(processor)
    with torch.no_grad():
        full = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base, base_tuple = model.model(**inputs), model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    assert torch.equal(as_tuple[0], full.logits)  # no labels: the logits come first, as in transformers' models
    assert torch.equal(base_tuple[0], base.last_hidden_state)


def test_a_config_without_image_token_id_runs_text_and_refuses_images(built):
    import copy

    model, processor = built()
    model = copy.deepcopy(model)
    ids = processor.tokenizer("What colour is the square?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.config.image_token_id = None
        assert torch.equal(model(input_ids=ids).logits, expected)  # text needs no image token
        inputs = model_inputs(processor)
        with pytest.raises(ValueError, match=r"^The config has no image_token_id, so no prompt position can take image "
                                             r"features: set config.image_token_id to the tokenizer's <image> id"):
            model(**inputs)


def test_tensor_parallel_plan_of_the_head_is_llavas():
    from transformers import LlavaForConditionalGeneration

    from cvlm.modeling import ConnectorVLMForConditionalGeneration

    assert ConnectorVLMForConditionalGeneration._tp_plan == LlavaForConditionalGeneration._tp_plan == {
        "lm_head": "colwise_gather_output"}


def test_image_features_follow_llava_the_tower_output_with_the_projection_in_pooler_output(built):
    model, processor = built()
    pixel_values = model_inputs(processor)["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values)
        tower = model.model.vision_tower(pixel_values, return_dict=True)
        asked = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    assert torch.equal(out.last_hidden_state, tower.last_hidden_state)  # the vision tower's, as LLaVA's
    assert out.hidden_states is None and out.attentions is None  # only when asked for
    layers = model.config.vision_config.num_hidden_layers
    assert len(asked.hidden_states) == layers + 1 and asked.attentions is not None
    assert all(torch.equal(a, b) for a, b in zip(asked.hidden_states, model.model.vision_tower(
        pixel_values, output_hidden_states=True, return_dict=True).hidden_states))
    assert tuple(out.pooler_output[0].shape) == (model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert torch.equal(asked.pooler_output[0], out.pooler_output[0])
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    # an unset flag follows the config, as in transformers' models (its common tests set it there)
    for config in (model.config, model.model.vision_tower.config):
        config.output_hidden_states = True
        with torch.no_grad():
            assert len(model.get_image_features(pixel_values).hidden_states) == layers + 1
        config.output_hidden_states = False


def test_the_cache_is_also_taken_under_its_old_name_with_a_deprecation_warning(built):
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; its models take the old name with a
    FutureWarning, as this one does (transformers' common test_bc_cache_name_forward)."""
    import warnings

    from transformers.cache_utils import DynamicCache

    model, processor = built()
    inputs = model_inputs(processor)
    with torch.no_grad():
        new = model(**inputs, cache=DynamicCache(config=model.config.text_config), use_cache=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(**inputs, past_key_values=DynamicCache(config=model.config.text_config), use_cache=True)
    assert any("`past_key_values` is deprecated" in str(w.message) for w in caught)
    assert torch.equal(old.logits, new.logits) and old.cache.get_seq_length() == new.cache.get_seq_length() > 0
