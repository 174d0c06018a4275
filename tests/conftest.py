"""Shared fixtures: tiny models built once per session, offline."""

from __future__ import annotations

import os
import tempfile

# Before transformers is imported: no network, and remote code copied on load goes to a private
# cache, never the user's.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="cvlm-test-modules-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from cvlm.build import build_model


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """GGUF language models are converted once per test session, under pytest's own temporary folders
    (it keeps the last few sessions' and removes older ones), never into the user's cache."""
    if "CVLM_CACHE" not in os.environ:
        os.environ["CVLM_CACHE"] = str(tmp_path_factory.mktemp("gguf-cache"))


@pytest.fixture(scope="session")
def built():
    """(vision, llm, connector) -> (model, processor), for every registered connector x preset pair."""
    cache = {}

    def get(vision="tiny-clip", llm="tiny-llama", connector="mlp", **kwargs):
        key = (vision, llm, connector, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_model(vision=vision, llm=llm, connector=connector, **{"seed": 0, **kwargs})
        return cache[key]

    return get
