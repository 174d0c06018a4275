"""Model cards from recorded facts, and `cvlm push` against a fake Hub API (no network here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import httpx2
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results

from cvlm.build import build
from cvlm.eval import formats
from cvlm.eval.runner import evaluate_model
from cvlm.model_cards.card import NOT_RECORDED, write_card
from cvlm.model_cards.push import PushError, push
from cvlm.trainers.train import main as train_main
from helpers import make_llava_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A built, aligned, fine-tuned and evaluated tiny checkpoint."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cards")
    data = make_llava_data(root / "data", n=8)
    build(root / "base", vision="tiny-clip", llm="tiny-qwen2", connector="avgpool")
    common = ["--data", data, "--max_steps", "4", "--per_device_train_batch_size", "4", "--report_to", "none",
              "--disable_tqdm", "true", "--save_steps", "2"]
    assert train_main(["--model", str(root / "base"), "--stage", "align", "--output_dir", str(root / "s1"), *common]) == 0
    assert train_main(["--model", str(root / "s1"), "--stage", "finetune", "--output_dir", str(root / "s2"),
                       "--save_adapter", "true", *common]) == 0
    items = [{"subtask": "color", "name": f"i{i}", "image": Image.new("RGB", (32, 32), (200, 20 * i, 20)),
              "qa": [("Is it red? Please answer yes or no.", "Yes"), ("Is it blue? Please answer yes or no.", "No")]}
             for i in range(3)]
    mme = formats.write_mme_release(root / "mme", items)
    evaluate_model(str(root / "s2"), "mme", str(mme), str(root / "eval"), max_new_tokens=3)
    return root / "s2"


def test_card_round_trips_with_model_index_from_the_recorded_results(trained):
    card = ModelCard.load(trained / "README.md")
    results = json.loads((trained / "eval_results" / "mme.json").read_text())
    name, evals = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "s2"
    by_type = {e.metric_type: e.metric_value for e in evals}
    assert by_type["mme_perception_score"] == round(results["metrics"]["perception_score"], 4)
    assert by_type["fine_macro"] == round(results["granularity"]["fine"]["macro"], 4)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"connector-avgpool", "compressing", "custom_code"} <= set(card.data.tags)
    assert "| align |" in card.text and "| finetune |" in card.text and "| MME |" in card.text
    assert "Speed, measured during the same runs" in card.text


def test_a_card_says_not_recorded_for_missing_facts(tmp_path):
    folder = build(tmp_path / "fresh", vision="tiny-siglip", llm="tiny-llama", connector="qformer")
    text = (folder / "README.md").read_text()
    assert f"Training: {NOT_RECORDED}" in text and f"Evaluation results: {NOT_RECORDED}" in text
    (folder / "README.md").unlink()
    write_card(folder, repo_id="org/tiny-qformer")
    card = ModelCard.load(folder / "README.md")
    assert 'repo = "org/tiny-qformer"' in card.text and card.data.base_model is None


def test_dry_run_lists_a_complete_upload_and_loads_it_cleanly(trained):
    report = push(trained, "org/tiny", dry_run=True)
    names = [name for name, _ in report["files"]]
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", "modeling_connector_vlm.py",
            "eval_results/mme.json"} <= set(names)
    assert not any(n.startswith(("checkpoint-", "adapter/")) for n in names)
    assert report["load_check"].startswith("loads: ConnectorVLMForConditionalGeneration")
    assert report["card_metadata"]["pipeline_tag"] == "image-text-to-text"


def test_an_incomplete_folder_is_refused_naming_what_is_missing(trained, tmp_path):
    copy = shutil.copytree(trained, tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoint-*", "adapter"))
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(PushError) as info:
        push(copy, "org/tiny", dry_run=True)
    assert str(info.value) == (
        f"{copy} is not complete, so it is not pushed. Missing: tokenizer_config.json. Write it with cvlm build / "
        "cvlm train (cvlm card rewrites a missing README.md)."
    )
    shutil.copy2(trained / "tokenizer_config.json", copy)
    (copy / "connector_pooling.py").unlink()  # a file the code imports, not named by auto_map
    with pytest.raises(PushError) as info:
        push(copy, "org/tiny", dry_run=True)
    assert str(info.value).startswith(f"{copy} does not load with trust_remote_code=True in a clean process: ")


def fake_api(existing=None, whoami=None):
    api = mock.MagicMock(spec=HfApi)
    api.whoami.return_value = {"name": "me"} if whoami is None else None
    if whoami is not None:
        api.whoami.side_effect = whoami
    if existing is None:
        api.list_repo_files.side_effect = RepositoryNotFoundError("no repo", response=httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co")))
    else:
        api.list_repo_files.return_value = existing
    api.upload_folder.return_value = "https://huggingface.co/org/tiny/commit/abc"
    return api


def test_push_creates_the_repo_and_uploads_in_one_commit(trained):
    api = fake_api()
    report = push(trained, "org/tiny", private=True, revision="v1", commit_message="first", api=api)
    api.create_repo.assert_called_once_with("org/tiny", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with("org/tiny", branch="v1", exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "org/tiny" and kwargs["revision"] == "v1" and kwargs["commit_message"] == "first"
    assert Path(kwargs["folder_path"]) == trained and "checkpoint-*" in kwargs["ignore_patterns"]
    assert report["commit"].endswith("commit/abc")


def test_push_refuses_to_overwrite_other_content_unless_forced(trained):
    api = fake_api(existing=[".gitattributes", "config.json", "model.safetensors", "notes.txt"])
    with pytest.raises(PushError) as info:
        push(trained, "org/tiny", api=api)
    assert str(info.value) == ("org/tiny already holds other content; this push would overwrite: config.json, "
                               "model.safetensors. Pass --force to go on, or push to another --repo-id / --revision.")
    api.upload_folder.assert_not_called()
    push(trained, "org/tiny", api=api, force=True)
    api.upload_folder.assert_called_once()


@pytest.mark.parametrize("error, message", [
    (LocalTokenNotFoundError("no token"), "No Hugging Face token: run `hf auth login` or set HF_TOKEN."),
    (httpx2.ConnectError("[Errno -2] Name or service not known"),
     "The Hub is unreachable ([Errno -2] Name or service not known); nothing was uploaded."),
])
def test_push_errors_a_user_meets_are_one_clear_sentence(trained, error, message):
    with pytest.raises(PushError) as info:
        push(trained, "org/tiny", api=fake_api(whoami=error))
    assert str(info.value) == message


def test_push_without_write_access(trained):
    api = fake_api()
    api.upload_folder.side_effect = HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co")))
    with pytest.raises(PushError) as info:
        push(trained, "someone-else/tiny", api=api)
    assert str(info.value) == ("The token of me has no write access to someone-else/tiny: use a write token or a "
                               "namespace you own.")


def test_push_the_adapter_alone_with_a_card_naming_its_base(trained):
    with pytest.raises(PushError, match="a local path nobody else has: push the base checkpoint first"):
        push(trained, "org/tiny-lora", adapter=True, dry_run=True)
    api = fake_api()
    report = push(trained, "org/tiny-lora", adapter=True, base_model="org/tiny-aligned", api=api)
    uploaded = Path(api.upload_folder.call_args.kwargs["folder_path"])
    assert json.loads((uploaded / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-aligned"
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-aligned"
    assert {n for n, _ in report["files"]} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
