"""The connector contract, parametrized over the registry, plus each connector's own behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from PIL import Image
from transformers import CLIPVisionConfig

from cvlm.modeling import CONNECTORS, FAMILIES, ConnectorVLMConfig
from helpers import chat_prompt, model_inputs

TEXT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
GRIDS = [(4, 4), (6, 6), (4, 6), (6, 4), (5, 3), (8, 8)]


def config_for(name, grid=(4, 4), strategy="default", **hyper) -> ConnectorVLMConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=32, patch_size=8)
    vision.image_size = [grid[0] * 8, grid[1] * 8]  # non-square grids: the connector sees an h x w grid
    return ConnectorVLMConfig(vision_config=vision, text_config=TEXT, connector_type=name, connector_config=hyper,
                              vision_feature_select_strategy=strategy)


def run_connector(config, batch=2, seed=0):
    torch.manual_seed(seed)
    connector = config.connector_class(config).eval()
    grid_h, grid_w = config.vision_grid
    tokens = grid_h * grid_w + config.num_kept_prefix_tokens
    hidden = [torch.randn(batch, tokens, 32) for _ in config.connector_vision_layers]
    with torch.no_grad():
        return connector, hidden, connector(hidden)


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_family_is_declared(name):
    assert CONNECTORS[name].family in FAMILIES
    assert CONNECTORS[name].source


@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
@pytest.mark.parametrize("name", list(CONNECTORS))
def test_num_tokens_equals_the_forward_output_length(name, grid):
    try:
        config = config_for(name, grid)
    except ValueError as error:  # a grid the connector cannot handle fails at config time, saying so
        assert name in str(error) and f"{grid[0]}x{grid[1]}" in str(error)
        return
    _, _, out = run_connector(config)
    assert tuple(out.shape) == (2, config.num_image_tokens, 64)
    if CONNECTORS[name].family == "compressing" and name != "qformer":
        assert config.num_image_tokens < grid[0] * grid[1]
    elif CONNECTORS[name].family == "preserving":
        assert config.num_image_tokens >= grid[0] * grid[1]


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_full_strategy_keeps_the_cls_token_or_is_refused(name):
    try:
        config = config_for(name, (4, 4), strategy="full")
    except ValueError as error:
        assert CONNECTORS[name].needs_grid
        assert str(error) == (
            f"The {name!r} connector works on the patch grid and cannot take the encoder's 1 prefix token(s): "
            "use vision_feature_select_strategy='default'."
        )
        return
    assert not CONNECTORS[name].needs_grid
    _, _, out = run_connector(config)
    assert out.shape[1] == config.num_image_tokens


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_batch_equals_each_image_alone(name):
    connector, hidden, out = run_connector(config_for(name, (4, 4)), batch=3)
    with torch.no_grad():
        for i in range(3):
            alone = connector([h[i : i + 1] for h in hidden])
            torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_gradient_reaches_every_connector_parameter(built, name):
    model, processor = built("tiny-clip", "tiny-llama", name)
    model.train()
    generator = torch.Generator().manual_seed(0)
    noise = [Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy())
             for _ in range(4)]  # varied patches, so that the MoE router uses every expert
    texts = [chat_prompt(processor, q) for q in ("What colour?", "Which shape?", "How many?", "Where is it?")]
    inputs = processor(images=noise, text=texts, padding=True, return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    model.zero_grad()
    try:
        model(**inputs, labels=labels).loss.backward()
    finally:
        model.eval()
    no_grad = [n for n, p in model.model.connector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    model.zero_grad()


# ---- each connector's own behaviour -----------------------------------------------------------------
def test_avgpool_is_2d_average_pooling_then_the_mlp():
    connector, hidden, out = run_connector(config_for("avgpool", (4, 6)))
    grid = hidden[0].transpose(1, 2).reshape(2, 32, 4, 6)
    expected = connector.layers(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, expected)
    assert config_for("avgpool", (8, 8), output_grid=3).num_image_tokens == 9
    assert config_for("avgpool", (8, 8), stride=4).num_image_tokens == 4


def test_pixel_shuffle_channel_order_is_row_col_channel_within_each_block():
    connector, hidden, _ = run_connector(config_for("pixel_shuffle", (4, 6), depth=1))
    seen = []
    connector.layers.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        connector(hidden)
    shuffled = seen[0]  # [B, 2*3, 4*32]
    grid = hidden[0].reshape(2, 4, 6, 32)  # [B, h, w, C]
    # output token (i, j) = patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), channels concatenated
    i, j = 1, 2
    expected = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                          grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    assert torch.equal(shuffled[:, i * 3 + j], expected)


def test_dense_sti_appends_pooled_shallow_tokens():
    config = config_for("dense_sti", (4, 4), stride=4)
    assert config.connector_vision_layers == [-2, 1, 3]  # final, then 1/3 and 2/3 of 4 layers
    assert config.num_image_tokens == 16 + 2 * (16 // 4)
    connector, hidden, out = run_connector(config)
    pooled = [h.reshape(2, 4, 4, 32).mean(2) for h in hidden[1:]]  # runs of 4 row-major tokens
    torch.testing.assert_close(out, connector.layers(torch.cat([hidden[0], *pooled], dim=1)))


def test_dense_layers_follow_the_paper_rule_for_a_24_layer_vit():
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 24,
              "num_attention_heads": 2, "image_size": 336, "patch_size": 14}
    sti = ConnectorVLMConfig(vision_config=vision, text_config=TEXT, connector_type="dense_sti")
    assert sti.connector_vision_layers == [-2, 8, 16] and sti.num_image_tokens == 720
    dci = ConnectorVLMConfig(vision_config=vision, text_config=TEXT, connector_type="dense_dci")
    assert dci.connector_vision_layers == [-2] + list(range(1, 25))
    custom = ConnectorVLMConfig(vision_config=vision, text_config=TEXT, connector_type="dense_sci",
                                connector_config={"layers": [4, 12, 20]})
    assert custom.connector_vision_layers == [-2, 4, 12, 20]


def test_dense_dci_averages_contiguous_groups():
    connector, hidden, out = run_connector(config_for("dense_dci", (4, 4)))
    final, layers = hidden[0], hidden[1:]  # layers 1..4 -> groups {1, 2}, {3, 4}
    fused = torch.cat([final, (layers[0] + layers[1]) / 2, (layers[2] + layers[3]) / 2], dim=-1)
    torch.testing.assert_close(out, connector.layers(fused))


def test_moe_routes_top_k_with_renormalised_weights_and_returns_its_loss():
    connector, hidden, out = run_connector(config_for("moe", (4, 4)))
    tokens = hidden[0].reshape(-1, 32)
    probs = connector.router(tokens).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.stack([
        sum(w * connector.experts[e](t) for w, e in zip(weights[i], chosen[i].tolist()))
        for i, t in enumerate(tokens)
    ])
    torch.testing.assert_close(out.reshape(-1, 64), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        again, aux = connector(hidden, return_aux_loss=True)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    # Switch/CuMo balance loss (coefficient 0.1) + router z-loss (0.01), from the router alone
    logits = connector.router(tokens).float()
    top1 = torch.bincount(chosen[:, 0], minlength=4).float() / len(tokens)
    expected_aux = 0.1 * 4 * (top1 * probs.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(aux, expected_aux.detach())
    assert not any(isinstance(v, torch.Tensor) and v.ndim == 0 for v in vars(connector).values())  # nothing kept
    load = connector.expert_load(hidden)
    assert load.shape == (4,) and float(load.sum()) == pytest.approx(1.0)


def test_moe_aux_loss_is_added_to_the_training_loss(built):
    model, processor = built("tiny-clip", "tiny-llama", "moe")
    inputs = model_inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        lm_loss = model.loss_function(logits=out.logits, labels=labels, vocab_size=model.config.text_config.vocab_size)
    aux = out.image_outputs.aux_loss
    assert float(aux) > 0
    torch.testing.assert_close(out.loss, lm_loss + aux)


def test_moe_upcycled_from_mlp_gives_the_mlp_output():
    mlp, hidden, mlp_out = run_connector(config_for("mlp", (4, 4)))
    moe = config_for("moe", (4, 4)).connector_class(config_for("moe", (4, 4))).eval()
    moe.upcycle(mlp)
    with torch.no_grad():
        torch.testing.assert_close(moe(hidden), mlp_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(hidden, return_aux_loss=True)[0], mlp_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Cannot upcycle"):
        moe.upcycle(config_for("mlp", (4, 4), depth=3).connector_class(config_for("mlp", (4, 4), depth=3)))


def test_cabstractor_depth_zero_is_avgpool_plus_mlp():
    connector, hidden, out = run_connector(config_for("cabstractor", (4, 4), depth=0))
    assert len(connector.before) == len(connector.after) == 0
    pooled = F.avg_pool2d(hidden[0].transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, connector.readout(pooled))


def test_ldp_versions():
    assert config_for("ldp", (5, 3), version=1).num_image_tokens == 3 * 2  # ceil(5/2) * ceil(3/2)
    _, _, out = run_connector(config_for("ldp", (5, 3), version=1))
    assert out.shape[1] == 6
    assert config_for("ldp", (6, 6), output_grid=2).num_image_tokens == 4


def test_qformer_attention_maps_cover_the_image():
    config = config_for("qformer", (4, 4), num_queries=8, num_layers=2)
    connector, hidden, out = run_connector(config)
    with torch.no_grad():
        again, attentions = connector(hidden, return_attentions=True)
    torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)
    assert len(attentions) == 2 and tuple(attentions[0].shape) == (2, 1, 8, 16)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 1, 8))


def test_qformer_queries_survive_save_and_load(built, tmp_path):
    from transformers import AutoModel

    from cvlm.build import save_checkpoint

    model, processor = built("tiny-siglip", "tiny-qwen2", "qformer")
    save_checkpoint(model, processor, tmp_path / "q")
    loaded = AutoModel.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert torch.equal(loaded.model.connector.queries, model.model.connector.queries)


# ---- bad hyper-parameters: messages ----------------------------------------------------------------
BAD = [
    ("pixel_shuffle", (4, 6), {"scale": 3},
     "connector_config scale=3 does not divide the 4x6 patch grid for 'pixel_shuffle'. Allowed scales for this grid: 1, 2."),
    ("avgpool", (4, 4), {"output_grid": 6},
     "connector_config output_grid=6 is larger than the 4x4 patch grid: 'avgpool' compresses, so pick at most 4x4."),
    ("avgpool", (4, 4), {"stride": 3},
     "connector_config stride=3 does not divide the 4x4 patch grid for 'avgpool': use a stride that divides both "
     "sides, or output_grid."),
    ("avgpool", (4, 4), {"stride": 2, "output_grid": 2},
     "connector_config sets both output_grid=2 and stride=2 for 'avgpool': set one."),
    ("moe", (4, 4), {"top_k": 5},
     "connector_config top_k=5 is larger than num_experts=4 for 'moe': pick top_k in 1..4."),
    ("dense_dci", (4, 4), {"groups": 5},
     "connector_config groups=5 is more than the encoder's 4 layers for 'dense_dci': pick groups in 1..4."),
    ("dense_sci", (4, 4), {"layers": [9]},
     "connector_config layers=[9]: layer 9 does not exist in a vision encoder with 4 layers. Allowed values: -5..4 "
     "(indices into hidden_states: 0 is the embeddings, -1 the last layer)."),
    ("ldp", (4, 4), {"version": 3}, "connector_config version=3 is invalid for 'ldp'. Allowed values: 1, 2."),
    ("qformer", (4, 4), {"hidden_size": 30, "num_heads": 4},
     "connector_config hidden_size=30 is not divisible by num_heads=4 for 'qformer'."),
    ("lowrank", (4, 4), {"rank": 0}, "connector_config rank=0 is invalid for 'lowrank': use an integer >= 1."),
]


@pytest.mark.parametrize("name, grid, hyper, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_hyper_parameters_fail_at_config_time(name, grid, hyper, message):
    with pytest.raises(ValueError) as info:
        config_for(name, grid, **hyper)
    assert str(info.value) == message


def test_dense_connectors_take_one_final_layer():
    with pytest.raises(ValueError) as info:
        ConnectorVLMConfig(vision_config=config_for("mlp").vision_config, text_config=TEXT, connector_type="dense_sti",
                           vision_feature_layer=[-2, -1])
    assert str(info.value).startswith("vision_feature_layer=[-2, -1]: the 'dense_sti' connector fuses layers itself")


def test_bench_connectors_measures_against_mlp_and_the_token_bound():
    from cvlm.bench import bench_connectors, format_table

    rows = bench_connectors(connectors=["avgpool", "qformer"], repeats=1, warmup=0)
    assert [r["connector"] for r in rows] == ["mlp", "avgpool", "qformer"]
    mlp, avgpool, qformer = rows
    assert (avgpool["patches_P"], avgpool["tokens_Q"], avgpool["token_bound_P_over_Q"]) == (16, 4, 4.0)
    assert mlp["prefill_speedup_vs_mlp"] == 1.0
    assert avgpool["sequence_length"] == mlp["sequence_length"] - 12
    assert qformer["tokens_Q"] == 64 and qformer["params"] > 0
    assert all(r["prefill_ms"] > 0 and r["connector_ms"] > 0 for r in rows)
    assert len(format_table(rows).splitlines()) == 2 + 3


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_each_connector_says_which_image_cells_its_tokens_cover(name):
    """What the Space draws, asked of the class: one cell per patch for the preserving connectors, the
    pooled cells for the compressing grids, none for learned queries (which attend everywhere)."""
    config = config_for(name, (4, 6))
    connector = config.connector_class(config)
    cells = connector.token_cells()
    if name == "qformer":
        assert cells is None
    elif CONNECTORS[name].family == "preserving":
        assert cells == (4, 6)
    else:
        assert cells == (2, 3) and cells[0] * cells[1] == config.num_image_tokens


def test_connectors_say_what_they_need_at_a_grid_and_the_qformer_compresses_like_the_pools():
    assert {name: cls.hyper_for_grid(8, 8) for name, cls in CONNECTORS.items() if cls.hyper_for_grid(8, 8)} == {
        "qformer": {"num_queries": 16}}
    assert config_for("qformer", (8, 8), **CONNECTORS["qformer"].hyper_for_grid(8, 8)).num_image_tokens == \
        config_for("avgpool", (8, 8)).num_image_tokens == 16
