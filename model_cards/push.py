"""`cvlm push`: publish a checkpoint folder (or a training run's LoRA adapter) to the Hub in one commit.

Before any upload the folder is checked: complete (config, safetensors weights, processor and
tokenizer files, the `modeling/` code that `auto_map` names, the card) and loadable with
`trust_remote_code=True` in a clean process that cannot import this project. `--dry-run` prints
what would be sent, with no network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

from cvlm.loading import outside_references

try:  # huggingface_hub 2.x talks through httpx2; its transport errors mean "no network"
    from httpx2 import TransportError as NetworkError
except ImportError:  # pragma: no cover - older huggingface_hub
    NetworkError = OSError

# Trainer checkpoints, the separate adapter and temporary files stay home (fnmatch patterns, as upload_folder uses).
IGNORED = ["checkpoint-*", "adapter/*", ".staging-*", "*.tmp", "*.tmp.png"]


class PushError(ValueError):
    """A push refused before or during upload; the message says what to do."""


# ---- completeness and loading -------------------------------------------------------------------
def missing_files(folder: Path, adapter: bool = False) -> list[str]:
    if adapter:
        need = ["adapter_config.json"]
        if not (folder / "adapter_model.safetensors").exists():
            need.append("adapter_model.safetensors")
        return [n for n in need if not (folder / n).exists()] + ([] if (folder / "README.md").exists() else ["README.md"])
    missing = [n for n in ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json",
                           "README.md") if not (folder / n).exists()]
    if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
        missing.append("model.safetensors")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        missing.append("(safetensors only: remove the pickle files " + ", ".join(p.name for p in folder.glob("*.bin")) + ")")
    if (folder / "config.json").exists():
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
        if not auto_map:
            missing.append("auto_map in config.json")
        for reference in auto_map.values():
            module = reference.split("--")[-1].rsplit(".", 1)[0] + ".py"
            if not (folder / module).exists():
                missing.append(module)
    return sorted(set(missing))


_LOAD_CHECK = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cvlm" or name.startswith("cvlm."):
            raise ImportError("connector-vlm must not be importable here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert processor.num_image_tokens == config.num_image_tokens, (processor.num_image_tokens, config.num_image_tokens)
print("loads:", type(model).__name__, "Q =", config.num_image_tokens)
"""


def foreign_code(folder: Path) -> list[str]:
    """The folder's Python files that are not byte-for-byte this project's own modeling code: the
    load check would run them, so they need --trust-remote-code."""
    import cvlm.modeling

    ours = Path(cvlm.modeling.__file__).parent
    return sorted(p.name for p in folder.glob("*.py")
                  if not (ours / p.name).is_file() or (ours / p.name).read_bytes() != p.read_bytes())


def check_loads(folder: Path, trust_remote_code: bool = False) -> str:
    """Loads the folder through the Auto classes in a fresh, offline process without this project. That
    runs the folder's code: only this project's own modeling files, unless `trust_remote_code`."""
    foreign = foreign_code(folder)
    if foreign and not trust_remote_code:
        raise PushError(f"{folder} carries code that is not connector-vlm's own ({', '.join(foreign)}); the load check "
                        "would run it. Read it, then pass --trust-remote-code, or rewrite the folder with cvlm train / "
                        "cvlm build.")
    with tempfile.TemporaryDirectory() as modules:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules, "PYTHONPATH": ""}
        result = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(Path(folder).resolve())], cwd=modules, env=env,
                                capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise PushError(f"{folder} does not load with trust_remote_code=True in a clean process: {last}")
    return result.stdout.strip()


# ---- the plan ------------------------------------------------------------------------------------
def _stage_adapter(folder: Path, base_model: str | None) -> Path:
    """A copy of the adapter folder whose config names a base the Hub can resolve, and a card."""
    config = json.loads((folder / "adapter_config.json").read_text())
    base = base_model or config.get("base_model_name_or_path")
    if not base or os.path.isabs(base) or os.path.exists(base):
        raise PushError(f"The adapter's base is {base!r}, a local path nobody else has: push the base checkpoint "
                        "first and pass --base-model ORG/NAME.")
    staging = Path(tempfile.mkdtemp(prefix="cvlm-push-adapter-"))
    for path in folder.iterdir():
        if path.is_file() and path.name != "README.md":
            shutil.copy2(path, staging / path.name)
    config["base_model_name_or_path"] = base
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = ModelCard(f"""---
library_name: peft
base_model: {base}
pipeline_tag: image-text-to-text
tags:
- connector-vlm
- lora
---

# LoRA adapter for {base}

A connector-vlm LoRA adapter (r={config.get('r')}, alpha={config.get('lora_alpha')}) on the language model of
[{base}](https://huggingface.co/{base}), with the trained connector (`modules_to_save`).

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("THIS_REPO", trust_remote_code=True)
```
""")
    card.save(staging / "README.md")
    return staging


def plan(folder: str | os.PathLike, adapter: bool = False, base_model: str | None = None) -> tuple[Path, list[tuple[str, int]]]:
    """(folder to upload, [(file, bytes)]) after the completeness check; raises PushError."""
    folder = Path(folder)
    if adapter:
        folder = folder / "adapter" if (folder / "adapter" / "adapter_config.json").exists() else folder
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder.")
    if adapter:
        folder = _stage_adapter(folder, base_model)
    outside = outside_references(folder)
    if outside:
        raise PushError(f"{folder}: auto_map entries point outside the checkpoint ({'; '.join(outside)}); whoever "
                        "loads it would run code it does not carry. Rebuild it with cvlm build or cvlm train.")
    missing = missing_files(folder, adapter)
    if missing:
        raise PushError(f"{folder} is not complete, so it is not pushed. Missing: {', '.join(missing)}. "
                        "Write it with cvlm build / cvlm train (cvlm card rewrites a missing README.md).")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in IGNORED):
            files.append((relative, path.stat().st_size))
    return folder, files


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, adapter: bool = False,
         base_model: str | None = None, force: bool = False, api: HfApi | None = None,
         trust_remote_code: bool = False) -> dict:
    """Checks, then creates the repo (if needed) and uploads the folder in one commit."""
    upload_dir, files = plan(folder, adapter=adapter, base_model=base_model)
    card = ModelCard.load(upload_dir / "README.md")
    report = {"repo_id": repo_id, "folder": str(upload_dir), "files": files,
              "total_bytes": sum(size for _, size in files), "card_metadata": card.data.to_dict()}
    if not adapter:
        report["load_check"] = check_loads(upload_dir, trust_remote_code)
    if dry_run:
        return report
    api = api or HfApi()
    try:
        user = api.whoami()
    except LocalTokenNotFoundError:
        raise PushError("No Hugging Face token: run `hf auth login` or set HF_TOKEN.") from None
    except HfHubHTTPError as error:
        raise PushError(f"The Hub refused the token ({error}). Check HF_TOKEN / `hf auth login`.") from None
    except (NetworkError, OSError) as error:  # connection refused, DNS failure, ...
        raise PushError(f"The Hub is unreachable ({error}); nothing was uploaded.") from None
    try:
        existing = set(api.list_repo_files(repo_id, revision=revision))
    except RepositoryNotFoundError:
        existing = set()
    except HfHubHTTPError:
        existing = set()  # e.g. the branch does not exist yet
    overwritten = sorted((existing - {".gitattributes"}) & {name for name, _ in files})
    if overwritten and not force:
        raise PushError(f"{repo_id} already holds other content; this push would overwrite: {', '.join(overwritten)}. "
                        "Pass --force to go on, or push to another --repo-id / --revision.")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(upload_dir), revision=revision,
                                   commit_message=commit_message or f"Upload connector-vlm checkpoint ({len(files)} files)",
                                   ignore_patterns=IGNORED)
    except HfHubHTTPError as error:  # before OSError: the Hub's HTTP errors are OSErrors too
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 403:
            raise PushError(f"The token of {user.get('name', 'this user')} has no write access to {repo_id}: use a "
                            "write token or a namespace you own.") from None
        raise PushError(f"The Hub refused the upload to {repo_id}: {error}") from None
    except (NetworkError, OSError) as error:
        raise PushError(f"The Hub became unreachable during the push ({error}); run the same command again.") from None
    report["commit"] = str(commit)
    return report
