"""Files in and out: where the project writes, what it may reuse, how it reads what users give it.

- An output folder is never someone else's: an existing folder that holds files this project did
  not write is refused (the message names `--overwrite`), and the current folder or one that holds
  it is never replaced at all.
- A folder appears whole or not at all: it is written into a hidden sibling and renamed into place.
- A cached or resumable result is reused only when the fingerprint of what produced it matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

# A folder holding one of these (or a config.json of our model type) was written by this project.
CHECKPOINT_MARKERS = ("cvlm_build.json", "cvlm_training.json", "cvlm_convert.json")  # in a model folder
MARKERS = CHECKPOINT_MARKERS + ("study_config.json", "eval_fingerprint.json", "cvlm_encoder_pretraining.json",
                                "cvlm_run.json")
MODEL_TYPE = "connector_vlm"


class OutputError(ValueError):
    """An output path the project refuses to write to; the message names the fix."""


def written_by_cvlm(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    if any((folder / marker).exists() for marker in MARKERS):
        return True
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def check_output(path: str | os.PathLike, overwrite: bool = False, flag: str = "--output",
                 overwrite_flag: str = "--overwrite") -> Path:
    """`path`, checked before any work: not the current folder or one of its parents, not a file,
    and, when it exists with files in it, written by this project (or `overwrite` given)."""
    target = Path(path).expanduser().resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents or target == Path.home().resolve() or target == Path(target.anchor):
        raise OutputError(f"{flag} {path} is the current folder, a folder that holds it, or the home folder; it is "
                          f"never replaced. Name a new folder inside it, e.g. {flag} {Path(path) / 'out'}.")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder. Name a folder to write to.")
    if target.is_dir() and not overwrite and not written_by_cvlm(target):
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise OutputError(f"{flag} {path} already holds files this tool did not write ({shown}). Pick a new "
                              f"folder, or pass {overwrite_flag} to replace it.")
    return target


@contextmanager
def atomic_folder(output: str | os.PathLike):
    """Yields an empty hidden sibling of `output`; when the block succeeds it replaces `output` in one
    rename (a previous `output` is moved aside first and deleted last). On failure nothing changes."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        yield staging
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        if output.exists():
            output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a hidden temporary path beside `path`, named per process and ending in .tmp (so no glob
    for the real files matches it); when the block succeeds the file replaces `path` in one rename, so
    readers see the old file or the new one, never half of one. On failure the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---- reading what users give ----------------------------------------------------------------------
def read_text(path: str | os.PathLike, what: str) -> str:
    """The file's text; a missing, unreadable or non-UTF-8 file is named with the fix."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder; give the file.") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {error.start}): save it as UTF-8.") from None


def read_json(path: str | os.PathLike, what: str):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                         f"{error.colno}. Fix the file (a JSON validator shows the place).") from None


def read_jsonl(path: str | os.PathLike, what: str) -> list:
    rows = []
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} {path}, line {number}, is not valid JSON: {error.msg} at column "
                                 f"{error.colno}. Each line of a .jsonl file is one JSON record.") from None
    return rows


def open_image(path: str | os.PathLike, where: str = ""):
    """The picture at `path`, fully decoded (a truncated file fails here, not at some training step) and
    made RGB by the family's one conversion. Errors name the file (and `where`: the record or row)."""
    from PIL import Image, UnidentifiedImageError

    from cvlm.modeling.image_conversion import to_rgb

    prefix = f"{where}: " if where else ""
    try:
        with Image.open(path) as handle:
            handle.load()
            return to_rgb(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}image file {path} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"{prefix}{path} is a folder, not an image file.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{prefix}image file {path} is not a readable image ({error}). Replace or remove it.") from None


# ---- fingerprints ---------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_digest(path: str | os.PathLike, patterns: tuple[str, ...] = ("*",), recursive: bool = True,
                contents: bool = False) -> str:
    """sha256 of a file's bytes; of a folder's files matching `patterns` in name order, by relative name,
    size and modification time (`contents`: by their bytes, for small folders such as a checkpoint's —
    an image folder of a real data set is far too large to read at every start); for a name that is not
    on disk (a Hub id), of the name itself."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(f"name:{path}".encode())
        return digest.hexdigest()
    find = path.rglob if recursive else path.glob
    files = sorted({p for pattern in patterns for p in find(pattern) if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)})
    for file in files:
        stat = file.stat()
        identity = file_digest(file) if contents else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(str(file.relative_to(path)).encode() + b"\0" + identity.encode())
    return digest.hexdigest()


def model_digest(model_id: str | os.PathLike) -> str:
    """What identifies a checkpoint's answers: its config, weights, generation config and processor files."""
    return path_digest(model_id, ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                                  "processor_config.json", "preprocessor_config.json", "tokenizer*.json",
                                  "chat_template.jinja", "special_tokens_map.json"), recursive=False, contents=True)


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
