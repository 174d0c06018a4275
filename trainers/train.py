"""`cvlm train`: LLaVA-1.5's two stages with the standard `transformers.Trainer`.

- `--stage align`: only the connector trains; the encoder and the LM are frozen.
- `--stage finetune`: the connector trains fully and LoRA adapters (peft) train on the LM's
  linear layers only (never the encoder's or the connector's); `--lm_full` trains the whole LM
  instead. Starts from a stage-1 output folder.

Arguments: the `ModelArguments`, `DataArguments` and `LoraArguments` below plus every
`TrainingArguments` flag, through `HfArgumentParser` (or one JSON/YAML file holding them all).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from cvlm.build import AUTO_MAP, save_checkpoint
from cvlm.files import MODEL_TYPE, check_output, model_digest, path_digest, read_json, write_atomic
from cvlm.loading import check_weights, load_processor, read_config
from cvlm.model_cards.card import BUILD_FACTS, write_card
from cvlm.modeling import ConnectorVLMForConditionalGeneration

from .data import Collator, SupervisedDataset, read_records, tokenize_all
from .feature_cache import FeatureCache

logger = logging.getLogger(__name__)

TRAINING_FACTS = "cvlm_training.json"
RUN_FINGERPRINT = "cvlm_run.json"  # written when a run starts: what its checkpoints came from
STAGES = ("align", "finetune")


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "a folder written by `cvlm build` or a previous stage, or a Hub id"})
    stage: str = field(default="align", metadata={"help": "align (connector only) or finetune (connector + LoRA)"})
    lm_full: bool = field(default=False, metadata={"help": "finetune: train the whole LM instead of LoRA adapters"})
    connector_lr: float | None = field(default=None, metadata={"help": "learning rate of the connector (default: --learning_rate)"})
    allow_unaligned: bool = field(default=False, metadata={"help": "finetune a model that has not been through --stage align"})
    save_adapter: bool = field(default=False, metadata={"help": "finetune: keep the LoRA adapter in adapter/ as well as merging it"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into an --output_dir that holds files this tool did not write, or another run's checkpoints"})


@dataclass
class DataArguments:
    data: str = field(metadata={"help": "LLaVA JSON/JSONL file, a `datasets` folder (imagefolder with metadata) or a Hub id"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the JSON's image paths are relative to"})
    image_column: str = field(default="image")
    conversations_column: str = field(default="conversations")
    model_max_length: int = field(default=2048, metadata={"help": "longer samples are cut, never through image tokens"})
    cache_features: str | None = field(default=None, metadata={"help": "folder of the frozen-encoder feature cache"})
    resume: bool = field(default=False, metadata={"help": "resume from the last complete checkpoint in --output_dir"})


@dataclass
class LoraArguments:
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target: str = field(default="all-linear", metadata={
        "help": "regex searched in the LM's linear layer names (e.g. 'q_proj|v_proj'); all-linear = every one"})


class _Parser(HfArgumentParser):
    def error(self, message):  # one line, not the usage of every TrainingArguments flag
        self.exit(2, f"cvlm train: error: {message} (see `cvlm train --help`)\n")


def parse_args(argv: list[str] | None = None):
    parser = _Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    # --lora-r and --lora_r both work: HfArgumentParser gives every field_name a --field-name alias
    cpu_flag = {"--use_cpu", "--use-cpu"} & {a.split("=")[0] for a in argv}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not cpu_flag:
        # Several CPU processes (torchrun / accelerate launch): without use_cpu, accelerate sets up no
        # distributed training and each process would silently train its own copy.
        argv += ["--use_cpu", "true"]
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        if argv[0].endswith(".json"):
            return parser.parse_json_file(argv[0], allow_extra_keys=False)
        return parser.parse_yaml_file(argv[0], allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)


# ---- which parameters train ----------------------------------------------------------------------
def lora_targets(model, pattern: str) -> list[str]:
    """Full names of the LM's Linear layers that `pattern` matches (searched in the name relative to
    the LM): the encoder's and the connector's layers are never targets."""
    prefix = "model.language_model."
    names = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]
    if pattern == "all-linear":
        return names
    regex = re.compile(pattern)
    targets = [n for n in names if regex.search(n[len(prefix):])]
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"--lora_target {pattern!r} matches no linear layer of the LM. Its linear layers are named: "
            f"{', '.join(leaves)} (e.g. --lora_target 'q_proj|v_proj')."
        )
    return targets


def prepare_model(model, model_args: ModelArguments, lora_args: LoraArguments):
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.connector.parameters():
        p.requires_grad_(True)
    if model_args.stage == "align":
        return model
    if model_args.lm_full:
        for p in model.model.language_model.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
        target_modules=lora_targets(model, lora_args.lora_target), modules_to_save=["connector"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_by_part(model) -> dict[str, int]:
    parts = {"vision_tower": 0, "connector": 0, "language_model": 0, "lm_head": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = next((k for k in parts if k in name), "language_model")
            parts[part] += p.numel()
    return parts


# ---- the Trainer ---------------------------------------------------------------------------------
class ConnectorTrainer(Trainer):
    """Trainer with a separate learning rate for the connector (`--connector_lr`)."""

    def __init__(self, *args, connector_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.connector_lr = connector_lr

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.connector_lr is None:
            return super().create_optimizer() if self.optimizer is None else self.optimizer
        decay = set(self.get_decay_parameter_names(self.model))
        groups = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = self.connector_lr if ".connector." in name else self.args.learning_rate
            wd = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, wd), []).append(p)
        params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(params, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def create_accelerator_and_postprocess(self):
        """accelerate turns `--fsdp` on only for accelerator processes: CPU processes would silently train
        with plain DDP. torch's FSDP2 shards over gloo as well, so CPU processes asked for FSDP get it."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type.value != "MULTI_CPU":
            return
        if self.args.fsdp_plugin_args.get("fsdp_version", 1) != 2:
            raise ValueError("--fsdp on CPU processes needs FSDP2 (torch's fully_shard, which runs over gloo): add "
                             "--fsdp_config '{\"version\": 2}' (the default).")
        if self.args.fsdp_config.get("state_dict_type", "SHARDED_STATE_DICT") != "SHARDED_STATE_DICT":
            raise ValueError("--fsdp on CPU processes keeps its checkpoints as sharded state dicts (resuming from a "
                             "full one stalls over gloo): leave state_dict_type out of --fsdp_config. The final "
                             "checkpoint holds the whole model either way.")
        self.args.fsdp_plugin_args["state_dict_type"] = "SHARDED_STATE_DICT"
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = self.fsdp_on_cpu = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if not getattr(self, "fsdp_on_cpu", False):
            return super().save_model(output_dir, _internal_call)
        state = full_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)


class CheckpointCodeCallback(TrainerCallback):
    """Every Trainer checkpoint carries the `modeling/` code and the processor, so any of them loads
    with trust_remote_code=True (an adapter checkpoint through its base, the stage-1 folder)."""

    def __init__(self, source_dir: str, processor):
        self.source_dir, self.processor = Path(source_dir), processor

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            for path in (p for p in self.source_dir.glob("*.py") if p.name != "__init__.py"):
                shutil.copy2(path, checkpoint / path.name)
            if not (checkpoint / "processor_config.json").exists():
                self.processor.save_pretrained(checkpoint)


class LogEndsCallback(TrainerCallback):
    """Logs the loss at the first and the last step whatever --logging_steps is, so that every run
    records a start and a final loss (and the loss curve has both ends)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (1, state.max_steps):
            control.should_log = True


CHECKPOINT_FILES = ("trainer_state.json", "scheduler.pt")  # what an exact resume reads, with the optimizer's
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_0")  # the Trainer's own; FSDP's full, sharded


def checkpoint_gaps(path: Path) -> list[str]:
    """What a Trainer checkpoint lacks for an exact resume: missing or empty files, a trainer_state.json
    that does not parse or names another step, weights that do not open."""
    def written(name: str) -> bool:  # a file with bytes, or a sharded checkpoint's folder with its index
        if (path / name).is_dir():
            return (path / name / ".metadata").is_file()
        return (path / name).is_file() and (path / name).stat().st_size > 0

    gaps = [n for n in CHECKPOINT_FILES if not written(n)]
    if not any(written(n) for n in OPTIMIZER_FILES):
        gaps.append(OPTIMIZER_FILES[0])
    if not list(path.glob("rng_state*.pth")):
        gaps.append("rng_state.pth")
    weights = [w for w in ("model.safetensors", "adapter_model.safetensors") if (path / w).is_file()]
    if not weights:
        gaps.append("model.safetensors")
    else:
        try:
            check_weights_file(path / weights[0])
        except ValueError:
            gaps.append(f"{weights[0]} (unreadable)")
    if "trainer_state.json" not in gaps:
        try:
            if json.loads((path / "trainer_state.json").read_text())["global_step"] != int(path.name.split("-")[1]):
                gaps.append("trainer_state.json (another step)")
        except (ValueError, KeyError, TypeError, OSError):
            gaps.append("trainer_state.json (unreadable)")
    return gaps


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N that holds everything an exact resume needs (see `checkpoint_gaps`): a save
    interrupted halfway, or a checkpoint that lost a file, is passed over with a warning."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        gaps = checkpoint_gaps(path)
        if not gaps:
            return str(path)
        logger.warning("--resume: %s is incomplete (%s); looking at an older checkpoint.", path, ", ".join(gaps))
    return None


def check_weights_file(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own type
        raise ValueError(f"{path} cannot be read ({error})") from None


# ---- checks before any work ----------------------------------------------------------------------
def check_model_folder(model_args: ModelArguments) -> dict | None:
    if model_args.stage not in STAGES:
        raise ValueError(f"--stage {model_args.stage!r} is invalid. Allowed values: {', '.join(STAGES)}.")
    config = read_config(model_args.model)
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"--model {model_args.model} is a {config.get('model_type')!r} checkpoint, not connector-vlm: "
                         "build one with `cvlm build` (or `cvlm convert from-llava`) first.")
    if Path(model_args.model).is_dir():
        check_weights(model_args.model)
    facts_path = Path(model_args.model) / TRAINING_FACTS
    facts = read_json(facts_path, "training facts") if facts_path.exists() else None
    if model_args.stage == "finetune" and not model_args.allow_unaligned and not (facts and facts.get("stage") == "align"):
        raise ValueError(
            f"--model {model_args.model} is not a stage-1 (align) output: run `cvlm train --stage align` first "
            "and pass its --output_dir, or add --allow_unaligned to fine-tune a connector that was never aligned."
        )
    return facts


def check_numbers(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, args) -> None:
    """Every numeric setting in range before any work (a zero batch or step count would fail deep inside,
    or train nothing)."""
    checks = [
        ("--max_steps", args.max_steps, args.max_steps == -1 or args.max_steps >= 1, "-1 (use epochs) or at least 1"),
        ("--num_train_epochs", args.num_train_epochs, args.max_steps >= 1 or args.num_train_epochs > 0, "above 0"),
        ("--per_device_train_batch_size", args.per_device_train_batch_size, args.per_device_train_batch_size >= 1,
         "at least 1"),
        ("--gradient_accumulation_steps", args.gradient_accumulation_steps, args.gradient_accumulation_steps >= 1,
         "at least 1"),
        ("--learning_rate", args.learning_rate, args.learning_rate > 0, "above 0"),
        ("--connector_lr", model_args.connector_lr, model_args.connector_lr is None or model_args.connector_lr > 0,
         "above 0"),
        ("--model_max_length", data_args.model_max_length, data_args.model_max_length >= 1, "at least 1"),
        ("--lora_r", lora_args.lora_r, lora_args.lora_r >= 1, "at least 1"),
        ("--lora_alpha", lora_args.lora_alpha, lora_args.lora_alpha > 0, "above 0"),
        ("--lora_dropout", lora_args.lora_dropout, 0 <= lora_args.lora_dropout < 1, "in [0, 1)"),
    ]
    for flag, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag} {value} is invalid: use a value {allowed}.")


def run_fingerprint(model_args, data_args, lora_args, args) -> dict:
    """What a training run's checkpoints depend on: the starting checkpoint, the data and every setting
    that changes the weights. A resume continues only a run with the same fingerprint."""
    settings = {k: getattr(args, k, None) for k in ("seed", "learning_rate", "per_device_train_batch_size",
                                              "gradient_accumulation_steps", "max_steps", "num_train_epochs",
                                              "lr_scheduler_type", "warmup_steps", "weight_decay",
                                              "optim", "bf16", "fp16")}
    return {"model": model_digest(model_args.model), "data": path_digest(data_args.data),
            "image_folder": data_args.image_folder and path_digest(data_args.image_folder),
            "stage": model_args.stage, "lm_full": model_args.lm_full, "connector_lr": model_args.connector_lr,
            "lora": asdict(lora_args), "model_max_length": data_args.model_max_length,
            "columns": [data_args.image_column, data_args.conversations_column], "settings": settings}


def claim_output_dir(output_dir: str, fingerprint: dict, resume: bool, overwrite: bool) -> None:
    """The run's folder is this run's: a folder of the user's is refused, and another run's checkpoints
    are never resumed from or mixed in (refused, or with --overwrite removed first)."""
    out = check_output(output_dir, overwrite, flag="--output_dir")
    record = out / RUN_FINGERPRINT
    theirs = read_json(record, "run fingerprint") if record.exists() else None
    checkpoints = sorted(out.glob("checkpoint-*"))
    if not checkpoints and (out / "config.json").is_file() and theirs != fingerprint and not overwrite:
        config = read_json(out / "config.json", "checkpoint config")
        raise ValueError(f"--output_dir {output_dir} holds a different model ({config.get('model_type')}/"
                         f"{config.get('connector_type', '-')}); training would mix the two. Pick another "
                         "--output_dir, or pass --overwrite to write over it.")
    if checkpoints and theirs != fingerprint:
        changed = ", ".join(k for k in fingerprint if (theirs or {}).get(k) != fingerprint[k]) if theirs else "unknown origin"
        if not overwrite:
            raise ValueError(f"--output_dir {output_dir} holds checkpoints of another run ({changed} differ); "
                             f"{'resuming' if resume else 'training'} there would mix the two. Pick another "
                             "--output_dir, or pass --overwrite to remove those checkpoints first.")
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(fingerprint, indent=2) + "\n")


# ---- the job -------------------------------------------------------------------------------------
def _load_model(folder: str):
    """The installed classes, in float32, registered so that the saved checkpoint names its own code."""
    model = ConnectorVLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.config.auto_map = dict(AUTO_MAP)
    type(model).register_for_auto_class("AutoModelForImageTextToText")
    type(model.config).register_for_auto_class()
    return model


def _name_fsdp_layers(model, args: TrainingArguments) -> None:
    """FSDP wraps each layer class the model names in `_no_split_modules`. A composite model inherits
    names of modules it does not hold (CLIP's vision model names CLIPTextEmbeddings), which accelerate
    refuses, so unless --fsdp_config names the classes, the ones the model holds are named."""
    plugin = args.fsdp_plugin_args
    if plugin is None or plugin.get("auto_wrap_policy") != "TRANSFORMER_BASED_WRAP" or "transformer_cls_names_to_wrap" in plugin:
        return
    present = {type(module).__name__ for module in model.modules()}
    plugin["transformer_cls_names_to_wrap"] = ",".join(sorted(set(model._no_split_modules or ()) & present))


def full_state_dict(model) -> dict:
    """Every weight whole, on every process (a collective). accelerate's gather leaves the DTensors of a
    CPU mesh sharded, so each is gathered here."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in model.state_dict().items()}


def _unsharded_copy(trainer, model_args: ModelArguments, lora_args: LoraArguments):
    """After FSDP each process holds a shard of every weight: the full weights are gathered (a collective,
    so every process calls this) into a fresh copy of the model on the main process; None elsewhere."""
    state = full_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    fresh = prepare_model(_load_model(model_args.model), model_args, lora_args)
    fresh.load_state_dict(state)
    return fresh


def train(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, args: TrainingArguments) -> Path:
    start = time.time()
    check_numbers(model_args, data_args, lora_args, args)
    facts_in = check_model_folder(model_args)
    set_seed(args.seed)
    args.remove_unused_columns = False  # the collator needs the raw columns
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    # the installed classes, and no tokenizer code from the folder: nothing in --model runs
    processor = load_processor(model_args.model)
    records = read_records(data_args.data, data_args.image_folder, data_args.image_column, data_args.conversations_column)
    samples = tokenize_all(records, processor, data_args.model_max_length)  # bad data fails before any heavy work
    if args.process_index == 0:
        claim_output_dir(args.output_dir, run_fingerprint(model_args, data_args, lora_args, args), data_args.resume,
                         model_args.overwrite)
    model = _load_model(model_args.model)
    cache = None
    if data_args.cache_features:
        images = [image for sample in samples for image in sample.images]
        with args.main_process_first(desc="feature cache"):
            cache = FeatureCache(data_args.cache_features, model, processor, images)
    dataset = SupervisedDataset(samples, feature_cache=cache)

    model = prepare_model(model, model_args, lora_args)
    _name_fsdp_layers(model, args)
    trainable = trainable_by_part(model)
    source_dir = Path(sys.modules[ConnectorVLMForConditionalGeneration.__module__].__file__).parent
    trainer = ConnectorTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(processor), processing_class=processor,
        connector_lr=model_args.connector_lr, callbacks=[CheckpointCodeCallback(str(source_dir), processor), LogEndsCallback()],
    )
    if args.world_size > 1 and trainer.accelerator.distributed_type.value == "NO":
        raise ValueError(f"{args.world_size} processes were launched but they do not train together; on CPUs "
                         "pass --use_cpu true.")
    resume_from = last_complete_checkpoint(args.output_dir) if data_args.resume else None
    if data_args.resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from the beginning.", args.output_dir)
    result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.is_fsdp_enabled:  # every process takes part in gathering the shards
        model = _unsharded_copy(trainer, model_args, lora_args)

    output = Path(args.output_dir)
    if trainer.is_world_process_zero():
        facts = _training_facts(model_args, data_args, lora_args, args, trainer, facts_in, trainable,
                                samples=len(samples), skipped=len(records) - len(samples), cached=bool(cache),
                                samples_per_second=result.metrics.get("train_samples_per_second"), start=start)
        facts["resumed_from"] = Path(resume_from).name if resume_from else None
        _write_outputs(output, model, processor, model_args, facts, trainer, result)
    return output


def _training_facts(model_args, data_args, lora_args, args, trainer, facts_in, trainable, samples: int, skipped: int,
                    cached: bool, samples_per_second, start: float) -> dict:
    """What the card and the next stage read: the run's settings, its losses and where it ran."""
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    return {
        "stage": model_args.stage,
        "started_from": model_args.model,
        "previous_stages": (facts_in or {}).get("previous_stages", []) + ([facts_in] if facts_in else []),
        "data": data_args.data,
        "samples": samples,
        "skipped_samples": skipped,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "learning_rate": args.learning_rate,
        "connector_lr": model_args.connector_lr,
        "lora": None if model_args.stage == "align" or model_args.lm_full else asdict(lora_args),
        "lm_full": model_args.lm_full,
        "feature_cache": cached,
        "trainable_parameters": trainable,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "wall_time_s": round(time.time() - start, 1),
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "world_size": args.world_size,
        # NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
        "distributed": "FSDP" if trainer.is_fsdp_enabled else trainer.accelerator.distributed_type.value,
        "samples_per_second": samples_per_second,
    }


def _write_outputs(output: Path, model, processor, model_args, facts: dict, trainer, result) -> None:
    """The merged checkpoint (and the LoRA adapter when asked), its facts, card and loss plot, and the
    Trainer's own state and metrics files."""
    final = model
    if hasattr(model, "merge_and_unload"):
        if model_args.save_adapter:
            model.save_pretrained(output / "adapter")
        final = model.merge_and_unload()
    save_checkpoint(final, processor, output, keep_existing=True)
    if (Path(model_args.model) / BUILD_FACTS).exists():
        shutil.copy2(Path(model_args.model) / BUILD_FACTS, output / BUILD_FACTS)
    write_atomic(output / TRAINING_FACTS, json.dumps(facts, indent=2) + "\n")
    # where the transformers example scripts leave them: train_results.json, all_results.json,
    # trainer_state.json (the whole log history)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    write_card(output)
    if facts["losses"]:
        from cvlm.plot import line_plot

        line_plot([s for s, _ in facts["losses"]], [l for _, l in facts["losses"]], output / "loss.png",
                  title=f"cvlm train --stage {model_args.stage}", x_label="step", y_label="training loss")
    parts = ", ".join(f"{k} {v:,}" for k, v in facts["trainable_parameters"].items() if v)
    print(f"cvlm train: {facts['steps']} steps, {facts['samples_per_second'] or 0:.1f} samples/s, "
          f"trainable: {parts}; final loss {facts['final_loss']}; checkpoint in {output}")


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, lora_args, args = parse_args(argv)
    train(model_args, data_args, lora_args, args)
    return 0
