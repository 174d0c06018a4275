"""The tiny encoder's pre-training on synthetic pictures: its targets, its cache, its output folder."""

from __future__ import annotations

import json

import torch

from cvlm.build import build_model
from cvlm.encoder_pretraining import FACTS, PATCH_LABELS, patch_targets, pretrain_encoder


def test_patch_targets_name_what_is_centred_in_each_patch():
    scene = {"objects": [{"kind": "square", "colour": "red", "box": [9, 1, 14, 6]},  # centre (11, 3): row 0, col 1
                         {"kind": "digit", "colour": "black", "value": "7", "box": [26, 17, 28, 21]}]}  # row 2, col 3
    target = patch_targets(scene, image_size=32, patch_size=8)
    assert target.shape == (4, 4, len(PATCH_LABELS))
    on = {(r, c, PATCH_LABELS[k]) for r, c, k in target.nonzero().tolist()}
    assert on == {(0, 1, "square"), (0, 1, "red"), (0, 1, "red square"),
                  (2, 3, "digit"), (2, 3, "black"), (2, 3, "black digit"), (2, 3, "7")}


def test_pretraining_learns_is_cached_and_gives_a_folder_build_takes(tmp_path):
    folder = pretrain_encoder(tmp_path / "enc", image_size=32, steps=40, pictures=200, width=32, layers=2)
    facts = json.loads((folder / FACTS).read_text())
    assert facts["losses"][0][1] > facts["final_loss"]  # it learns
    assert set(facts["scene_accuracy"]) == {"background", "shading", "brightness"}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain_encoder(tmp_path / "enc", image_size=32, steps=40, pictures=200, width=32, layers=2) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the same run again: reused, not redone
    pretrain_encoder(tmp_path / "enc", image_size=32, steps=41, pictures=200, width=32, layers=2)
    assert json.loads((folder / FACTS).read_text())["steps"] == 41  # another run: redone
    assert not (tmp_path / "enc.tmp").exists()
    model, _ = build_model(vision=str(folder), image_size=32)
    from transformers import CLIPVisionModel

    saved = CLIPVisionModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in saved.items())
