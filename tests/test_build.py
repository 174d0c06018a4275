"""Building from pretrained folders (the Hub-id code path), the saved folder, and the CLI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from cvlm.build import build_model, save_checkpoint
from cvlm.presets import tiny_lm, tiny_tokenizer, tiny_vision
from helpers import model_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Local folders in the Hub layout, standing in for Hub ids (same from_pretrained path)."""
    root = tmp_path_factory.mktemp("pretrained")
    vision, image_processor = tiny_vision("tiny-clip", seed=7)
    vision.save_pretrained(root / "vision")
    image_processor.save_pretrained(root / "vision")
    tokenizer = tiny_tokenizer()
    lm = tiny_lm("tiny-llama", tokenizer, seed=7)
    lm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


def test_pretrained_backbone_weights_are_loaded_not_reinitialised(pretrained):
    model, _ = build_model(vision=str(pretrained / "vision"), llm=str(pretrained / "llm"), connector="mlp")
    vision = load_file(pretrained / "vision" / "model.safetensors")
    llm = load_file(pretrained / "llm" / "model.safetensors")
    mine = model.state_dict()
    for key, value in vision.items():
        assert torch.equal(mine["model.vision_tower." + key], value), key
    for key, value in llm.items():
        target = "lm_head.weight" if key == "lm_head.weight" else "model.language_model." + key[len("model."):]
        assert torch.equal(mine[target], value), key


def test_connector_init_is_seeded(pretrained):
    def connector_state(seed):
        model, _ = build_model(vision="tiny-clip", llm="tiny-llama", connector="mlp", seed=seed)
        return model.model.connector.state_dict()

    a, b, c = connector_state(1), connector_state(1), connector_state(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.weight"], c["layers.0.weight"])


def test_full_clip_checkpoint_gives_its_vision_tower(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision))
    clip.save_pretrained(tmp_path / "clip")
    _, image_processor = tiny_vision("tiny-clip")
    image_processor.save_pretrained(tmp_path / "clip")
    model, _ = build_model(vision=str(tmp_path / "clip"), llm="tiny-llama", connector="linear", feature_layer=-1)
    assert model.config.vision_config.model_type == "clip_vision_model"
    src = clip.vision_model.state_dict()
    mine = model.model.vision_tower.state_dict()
    assert all(torch.equal(mine[k], src[k]) for k in src)


def test_image_size_interpolates_pretrained_position_embeddings(pretrained):
    model, processor = build_model(vision=str(pretrained / "vision"), llm="tiny-llama", image_size=48)
    assert model.config.vision_grid == (6, 6) and model.config.num_image_tokens == 36
    assert processor.num_image_tokens == 36
    source = load_file(pretrained / "vision" / "model.safetensors")["embeddings.position_embedding.weight"]
    resized = model.model.vision_tower.embeddings.position_embedding.weight
    assert tuple(resized.shape) == (1 + 36, 32)
    assert torch.equal(resized[0], source[0])  # the CLS position is kept as is
    inputs = model_inputs(processor)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (48, 48)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_lm_tokenizer_without_image_token_gets_one(tmp_path):
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["a plain text corpus"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer))
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    model, processor = build_model(vision="tiny-siglip", llm=str(tmp_path / "llm"), connector="mlp")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(tokenizer) == model.config.image_token_id
    assert model.config.text_config.vocab_size == len(tokenizer) + 1
    assert processor.tokenizer.pad_token == "</s>"
    inputs = model_inputs(processor)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_saved_folder_is_complete_and_overwritten_atomically(built, tmp_path):
    model, processor = built()
    target = tmp_path / "ckpt"
    save_checkpoint(model, processor, target)
    (target / "stale.txt").write_text("from an older build")  # a folder this project wrote is replaced whole
    save_checkpoint(model, processor, target)
    files = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "configuration_connector_vlm.py",
            "modeling_connector_vlm.py", "processing_connector_vlm.py", "connectors.py", "connector_base.py"} <= files
    assert "stale.txt" not in files
    assert not any(p.name.startswith(".ckpt.") for p in tmp_path.iterdir())
    assert not list(target.glob("*.bin"))
    modeling_files = {p.name for p in (ROOT / "modeling").glob("*.py")} - {"__init__.py"}
    assert modeling_files <= files, "every modeling/ file must travel in the checkpoint"
    config = json.loads((target / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    assert json.loads((target / "processor_config.json").read_text())["num_image_tokens"] == 16
    assert json.loads((target / "generation_config.json").read_text())["suppress_tokens"] == [config["image_token_id"]]
    assert json.loads((target / "tokenizer_config.json").read_text())["padding_side"] == "left"
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(target, trust_remote_code=True).tokenizer.padding_side == "left"


def test_modeling_imports_only_torch_transformers_and_stdlib():
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "modeling").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module and "." not in node.module, f"{path.name}: use `from .x import`"
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


# ---- the CLI -----------------------------------------------------------------------------------------
def cvlm(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cvlm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_build_then_generate(tmp_path):
    result = cvlm("build", "--vision", "tiny-clip", "--llm", "tiny-llama", "--connector", "mlp",
                  "--connector-arg", "depth=3", "--feature-layer", "-2", "-1", "--output", str(tmp_path / "tiny-mlp"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("connector=mlp, image tokens Q=16")
    config = AutoConfig.from_pretrained(tmp_path / "tiny-mlp", trust_remote_code=True)
    assert config.connector_config["depth"] == 3 and config.vision_feature_layer == [-2, -1]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny-mlp", trust_remote_code=True)
    assert len(model.model.connector.layers) == 5  # Linear, act, Linear, act, Linear

    result = cvlm("generate", str(tmp_path / "tiny-mlp"), "--prompt", "What colour is it?", "--demo-image",
                  "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("'")


def test_cli_connectors_json_lists_the_registry():
    from cvlm.modeling import CONNECTORS

    result = cvlm("connectors", "--json", "--grid", "24", "24")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(CONNECTORS)
    assert rows["mlp"]["num_tokens"] == 576 and rows["mlp"]["family"] == "preserving"
    assert rows["mlp"]["params"] == (1024 * 4096 + 4096) + (4096 * 4096 + 4096)  # LLaVA-1.5 mlp2x_gelu
    assert rows["linear"]["params"] == 1024 * 4096 + 4096


def test_cli_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    from cvlm.modeling import CONNECTORS

    result = cvlm("build", "--connector", "nope", "--output", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cvlm build: error: connector_type='nope' is not a registered connector. "
        f"Allowed values: {', '.join(sorted(CONNECTORS))}."
    )
    assert not (tmp_path / "x").exists()
    result = cvlm("build", "--connector-arg", "depth", "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "is not key=value" in result.stderr


def test_readme_connector_table_is_the_registry():
    from cvlm.connector_table import connector_markdown

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- connectors-table -->\n", 1)[1].split("\n<!-- /connectors-table -->", 1)[0]
    assert table == connector_markdown(), "README table is stale: paste the output of `cvlm connectors --markdown`"
