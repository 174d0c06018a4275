"""Frozen-feature cache: the encoder's hidden states of the layers the connector reads, computed
once per image and reused every epoch, so training with a frozen encoder skips it.

Layout: `DIR/<fingerprint>/manifest.json` + `features-NNNNN.safetensors` shards. The fingerprint
hashes everything the features depend on: the encoder's config and weights, the image
processor's settings, the layers read and the select strategy. A different encoder therefore
never finds another's features; a manifest or shard that does not match what it claims (shape,
missing keys, unreadable file) is rebuilt, never used. Shards and the manifest are written to a
temporary name and renamed, by one writer at a time (a file lock per entry), so runs on several
machines can share one cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from filelock import FileLock
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cvlm.files import atomic_path, write_atomic  # per-process temp names: processes sharing a cache never share one

logger = logging.getLogger(__name__)

SHARD_SIZE = 256


def image_digest(image) -> str:
    """Content hash of an image file's bytes (or of a PIL image's pixels)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    else:
        with open(image, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def encoder_fingerprint(model, processor) -> str:
    config = model.config
    h = hashlib.blake2b(digest_size=16)
    h.update(config.vision_config.to_json_string(use_diff=False).encode())
    h.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps([config.connector_vision_layers, config.vision_feature_select_strategy]).encode())
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """`get(image)` -> [n_layers, N, C] features of that image, from the cache."""

    def __init__(self, root: str | os.PathLike, model, processor, images, batch_size: int = 16):
        self.fingerprint = encoder_fingerprint(model, processor)
        self.dir = Path(root) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        grid_h, grid_w = model.config.vision_grid
        self.shape = [len(model.config.connector_vision_layers), grid_h * grid_w + model.config.num_kept_prefix_tokens,
                      model.config.vision_config.hidden_size]
        self._digests = {}
        # one writer per entry (processes and machines sharing the cache wait their turn); shards are never
        # rewritten once a manifest names them, so readers of an earlier manifest keep reading whole files
        with FileLock(str(self.dir / ".lock")):
            self.index: dict[str, str] = self._load_manifest()
            self.built = self._fill(model, processor, images, batch_size)
        self._handles = {}

    # ---- manifest ----------------------------------------------------------------------------------
    def _load_manifest(self) -> dict:
        path = self.dir / "manifest.json"
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
            assert manifest["fingerprint"] == self.fingerprint and manifest["shape"] == self.shape
            index = manifest["index"]
            for shard in set(index.values()):
                with safe_open(str(self.dir / shard), framework="pt") as handle:
                    keys = set(handle.keys())
                    for digest in (d for d, s in index.items() if s == shard):
                        assert digest in keys and list(handle.get_slice(digest).get_shape()) == self.shape
        except Exception as error:  # noqa: BLE001 - any mismatch means: rebuild
            logger.warning("Feature cache %s does not match what it claims (%s): rebuilding it.", self.dir, error)
            for stale in self.dir.glob("features-*.safetensors"):
                stale.unlink()
            path.unlink(missing_ok=True)
            return {}
        return index

    def _digest(self, image) -> str:
        key = image if isinstance(image, str) else id(image)
        if key not in self._digests:
            self._digests[key] = image_digest(image)
        return self._digests[key]

    # ---- building ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _fill(self, model, processor, images, batch_size) -> int:
        """Computes the features of the images not in the cache yet; returns how many."""
        from .data import load_image

        todo, seen = [], set(self.index)
        for image in images:
            digest = self._digest(image)
            if digest not in seen:
                seen.add(digest)
                todo.append((digest, image))
        # past every shard on disk, named or not: a file is never written twice
        shard_number = 1 + max((int(f.stem.split("-")[1]) for f in self.dir.glob("features-*.safetensors")), default=-1)
        tower, home = model.model.vision_tower, model.device
        device = torch.device("cuda") if torch.cuda.is_available() else home  # the Trainer has not placed it yet
        tower.to(device)
        for start in tqdm(range(0, len(todo), SHARD_SIZE), desc="caching encoder features", disable=not todo):
            chunk, tensors = todo[start : start + SHARD_SIZE], {}
            for b in range(0, len(chunk), batch_size):
                part = chunk[b : b + batch_size]
                pixels = processor(images=[load_image(img) for _, img in part], return_tensors="pt")["pixel_values"]
                selected = model.model.select_vision_features(pixels.to(device))  # n_layers x [B, N, C]
                stacked = torch.stack(selected, dim=1).cpu()  # [B, n_layers, N, C]
                tensors.update({digest: stacked[i].contiguous() for i, (digest, _) in enumerate(part)})
            shard = f"features-{shard_number:05d}.safetensors"
            with atomic_path(self.dir / shard) as tmp:
                save_file(tensors, str(tmp))
            self.index.update({digest: shard for digest in tensors})
            write_atomic(self.dir / "manifest.json", json.dumps(
                {"fingerprint": self.fingerprint, "shape": self.shape, "index": self.index}))
            shard_number += 1
        tower.to(home)
        return len(todo)

    def get(self, image) -> torch.Tensor:
        shard = self.index[self._digest(image)]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        # a copy: safetensors maps the file, and a tensor must not depend on a file that may be rebuilt
        return self._handles[shard].get_tensor(self._digest(image)).clone()

    def __getstate__(self):  # dataloader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
