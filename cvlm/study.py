"""`cvlm study`: the connector paper's experiment end to end with the project's own build, train
and eval code — every connector × resolution × seed built, aligned, fine-tuned and scored on the
synthetic granularity benchmark (or on real data and benchmarks), then one report with tables,
plots and a verdict per claim of the paper.

Resumable: each run's `run.json` is written when it is complete and a restarted study skips it;
a failed run is recorded and the others go on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cvlm.files import path_digest, read_json, settings_digest, write_atomic
from cvlm.modeling import CONNECTORS, ConnectorVLMConfig
from cvlm.eval import GRANULARITIES

# every family of the paper: two preserving MLPs and a Dense Connector; pooling, Q-Former, C-Abstractor, pixel shuffle
DEFAULT_CONNECTORS = ["linear", "mlp", "dense_sci", "avgpool", "qformer", "cabstractor", "pixel_shuffle"]
RUN_FORMAT = 4  # bumped when what a run records changes: older run.json files are redone


@dataclass
class StudyConfig:
    output: str = "runs/study"
    connectors: list[str] = field(default_factory=lambda: list(DEFAULT_CONNECTORS))
    resolutions: list[int] = field(default_factory=lambda: [32, 48, 64])  # three sizes: do returns diminish?
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    vision: str = "tiny-clip"
    llm: str = "tiny-llama"
    vision_width: int | None = 64  # the tiny presets' sizes (ignored for Hub ids and folders)
    llm_width: int | None = 128  # measured: a 64-wide LM never found the small objects, a 128-wide one did
    llm_layers: int | None = 3  # measured: 3 layers learn fine/reasoning at 1000 steps, 2 need ~1500
    pretrain_encoder_steps: int = 600  # synthetic study with a preset encoder: 0 keeps it random
    align_steps: int = 30
    finetune_steps: int = 1000
    batch_size: int = 16
    align_lr: float = 1e-3
    finetune_lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    lm_full: bool | None = None  # finetune the whole LM instead of LoRA; default: yes for a from-scratch preset LM
    workers: int = 2  # runs at once, each on its share of the cores
    train_per_subtask: int = 300
    test_per_subtask: int = 20
    align_data: str | None = None  # real scale: LLaVA-format files; default: the synthetic benchmark
    finetune_data: str | None = None
    image_folder: str | None = None
    benchmarks: dict = field(default_factory=dict)  # real scale: {"mme": PATH, "mmbench": PATH, ...}
    mapping: str | None = None

    def __post_init__(self):
        from cvlm.presets import LM_PRESETS, VISION_PRESETS

        if self.vision not in VISION_PRESETS:
            self.vision_width = None
        if self.llm not in LM_PRESETS:
            self.llm_width = self.llm_layers = None
        if self.lm_full is None:  # LoRA adapts what a pre-trained LM knows; a preset LM starts from nothing
            self.lm_full = self.llm in LM_PRESETS


def parse_connector(spec: str) -> tuple[str, dict, str]:
    """"avgpool:output_grid=2,depth=2" -> ("avgpool", {"output_grid": 2, "depth": 2}, "avgpool-output_grid-2")."""
    name, _, args = spec.partition(":")
    if name not in CONNECTORS:
        raise ValueError(f"--connectors {spec!r}: {name!r} is not a registered connector. "
                         f"Allowed values: {', '.join(CONNECTORS)}.")
    hyper = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        try:
            hyper[key] = json.loads(value)
        except json.JSONDecodeError:
            hyper[key] = value
    try:
        CONNECTORS[name].resolve_hyper(hyper)
    except ValueError as error:
        raise ValueError(f"--connectors {spec!r}: {error}") from None
    label = name + "".join(f"-{k}-{v}" for k, v in hyper.items())
    return name, hyper, label


def check_settings(config: StudyConfig) -> None:
    """Every list non-empty and every number in range, before any work."""
    for key in ("connectors", "resolutions", "seeds"):
        if not getattr(config, key):
            raise ValueError(f"--{key} is empty: give at least one value.")
    counts = ("align_steps", "finetune_steps", "batch_size", "lora_r", "lora_alpha", "workers", "train_per_subtask",
              "test_per_subtask")
    for key in counts:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} is invalid: use a whole number of at least 1.")
    for key in ("align_lr", "finetune_lr"):
        if not getattr(config, key) > 0:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(config, key)!r} is invalid: use a learning rate above 0.")
    for value in config.resolutions:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--resolutions {value!r} is invalid: use image sizes in pixels, e.g. 32 48 64.")
    for spec in config.connectors:
        parse_connector(spec)


def die_with_parent(parent: int) -> None:
    """A worker's initializer: it ends when the study's main process is gone, even after kill -9 (which
    runs no clean-up). Linux says so at once through PR_SET_PDEATHSIG; elsewhere a thread watches."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _patch_size(vision: str) -> int:
    from cvlm.presets import TINY_PATCH_SIZE, VISION_PRESETS

    if vision in VISION_PRESETS:
        return TINY_PATCH_SIZE
    from transformers import AutoConfig

    vision_config = AutoConfig.from_pretrained(vision)
    patch = getattr(vision_config, "vision_config", vision_config).patch_size
    return patch if isinstance(patch, int) else patch[0]


def _synthetic(root: Path, resolution: int, config: StudyConfig) -> dict:
    from cvlm.eval.synthetic import Difficulty, write_benchmark

    folder = root / "data" / f"synthetic-{resolution}"
    marker = folder / "paths.json"
    # objects keep their size relative to the picture, so a low resolution blurs small things, as in the paper
    difficulty = Difficulty(image_size=resolution, object_size=max(2, round(6 * resolution / 64)))
    settings = {"seed": 0, "train_per_subtask": config.train_per_subtask, "test_per_subtask": config.test_per_subtask,
                "difficulty": asdict(difficulty), "open_questions_only": True}
    if marker.exists():
        saved = read_json(marker, "study data record")
        if saved.get("settings") == settings:
            return _data_paths(folder)
        shutil.rmtree(folder)  # written for other settings: made again, never reused
    paths = write_benchmark(folder, **settings | {"difficulty": difficulty})
    # recorded relative to the folder: machines that mount a shared study elsewhere find them too
    relative = {k: os.path.relpath(v, folder) for k, v in paths.items()}
    write_atomic(marker, json.dumps({"settings": settings, "paths": relative}))
    return _data_paths(folder)


def _data_paths(folder: Path) -> dict:
    """The synthetic data's files, from the folder's record (older records hold absolute paths)."""
    saved = read_json(folder / "paths.json", "study data record")["paths"]
    return {k: str(folder / v) for k, v in saved.items()}  # an absolute v stays as it is


def _encoder(root: Path, resolution: int, config: StudyConfig) -> str:
    """The vision encoder every run at `resolution` starts from: the preset pre-trained on synthetic
    pictures (cached under encoders/) for the synthetic study, else `config.vision` itself."""
    from cvlm.presets import VISION_PRESETS

    if config.benchmarks or config.vision not in VISION_PRESETS or config.pretrain_encoder_steps <= 0:
        return config.vision
    from cvlm.encoder_pretraining import pretrain_encoder

    return str(pretrain_encoder(root / "encoders" / f"{config.vision}-{resolution}px", resolution,
                                steps=config.pretrain_encoder_steps, vision=config.vision, width=config.vision_width))


def processes() -> tuple[int, int, callable]:
    """(rank, world size, barrier) of the processes that run one study run together. A run may itself
    be a multi-process job (torchrun, accelerate launch, a submitit job with several tasks): every
    process trains and answers its share of the questions, the first one builds and writes."""
    from cvlm.eval.runner import process_state

    state = process_state()
    return state.process_index, state.num_processes, state.wait_for_everyone


def share(value):
    """The first process's `value`, on every process of the run."""
    from cvlm.eval.runner import process_state

    if process_state().num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def run_one(run_dir: Path, connector: str, hyper: dict, label: str, resolution: int, seed: int,
            config: StudyConfig, data: dict) -> dict | None:
    """One run: build, align, finetune, score; its row (None on the other processes of a multi-process run)."""
    from cvlm.build import build
    from cvlm.eval.runner import evaluate_model

    start = time.time()
    rank, world, barrier = processes()
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} does not split over the run's {world} processes: use a "
                         f"multiple of {world} (the global batch stays the study's).")
    grid = resolution // _patch_size(config.vision)
    hyper = {**CONNECTORS[connector].hyper_for_grid(grid, grid), **hyper}  # what the class needs at this grid
    if rank == 0:
        build(run_dir / "base", vision=data["vision"], llm=config.llm, connector=connector, connector_args=hyper,
              image_size=resolution, seed=seed, llm_width=config.llm_width, llm_layers=config.llm_layers,
              vision_width=config.vision_width if data["vision"] == config.vision else None)
    barrier()
    _train_stages(run_dir, seed, config, data, world, barrier)
    results = {}
    for benchmark, path in data["benchmarks"].items():  # the processes share the questions out
        # likelihood ranking of the option texts: a perception test that needs no letter / yes-no binding
        mode = "likelihood" if benchmark in ("mmbench", "seed_bench") else "generate"
        results[benchmark] = evaluate_model(str(run_dir / "finetune"), benchmark, path, str(run_dir / f"eval-{benchmark}"),
                                            mode=mode, mapping_file=data.get("mapping"), max_new_tokens=4)
    if rank:
        return None
    return {**_row(run_dir, results), "connector": label, "connector_type": connector, "hyper_parameters": hyper,
            "family": CONNECTORS[connector].family, "resolution": resolution, "seed": seed,
            "wall_s": round(time.time() - start, 1)}


def _train_stages(run_dir: Path, seed: int, config: StudyConfig, data: dict, world: int, barrier) -> None:
    """Align (the connector alone), then finetune (connector + LoRA or the whole LM), the study's global
    batch split between the run's processes."""
    import torch
    from transformers import TrainingArguments

    from cvlm.trainers.train import DataArguments, LoraArguments, ModelArguments, train

    together = {} if world == 1 or torch.cuda.is_available() else {"use_cpu": True, "ddp_backend": "gloo"}
    stages = [("align", run_dir / "base", data["align"], config.align_steps, config.align_lr),
              ("finetune", run_dir / "align", data["finetune"], config.finetune_steps, config.finetune_lr)]
    for stage, source, train_data, steps, lr in stages:
        train(ModelArguments(model=str(source), stage=stage, lm_full=stage == "finetune" and config.lm_full),
              DataArguments(data=train_data, image_folder=config.image_folder,
                            cache_features=str(run_dir.parents[1] / "feature_cache")),  # the study's, shared
              LoraArguments(lora_r=config.lora_r, lora_alpha=config.lora_alpha),
              TrainingArguments(output_dir=str(run_dir / stage), max_steps=steps, learning_rate=lr,
                                per_device_train_batch_size=config.batch_size // world, seed=seed, report_to="none",
                                disable_tqdm=True, save_strategy="no", logging_steps=10, warmup_steps=10, **together))
        barrier()  # the first process has written the stage's checkpoint


def _row(run_dir: Path, results: dict) -> dict:
    """What a run records from its scores, its training facts and its checkpoint."""
    final = run_dir / "finetune"
    facts = [json.loads((run_dir / s / "cvlm_training.json").read_text()) for s in ("align", "finetune")]
    config_json = json.loads((final / "config.json").read_text())
    scores = {}
    for g in GRANULARITIES:
        values = [r["granularity"][g]["macro"] for r in results.values() if r["granularity"][g]["macro"] is not None]
        scores[g] = statistics.fmean(values) if values else None
    questions = {}
    for benchmark, r in results.items():  # per question: its granularity and whether it was right
        granularity_of = {key.split("/", 1)[1]: g for g in GRANULARITIES for key in r["granularity"][g]["subtasks"]}
        questions.update({f"{benchmark}/{q}": [granularity_of[o["subtask"]], o["right"]]
                          for q, o in r["questions"].items() if o["subtask"] in granularity_of})
    return {
        "questions": questions,
        "tokens": next(iter(results.values()))["speed"]["visual_tokens_per_image"],
        "patches": math.prod(ConnectorVLMConfig.from_dict(config_json).vision_grid),
        "scores": scores, "benchmarks": {b: r["granularity"] for b, r in results.items()},
        "subtasks": {b: {k: v for g in GRANULARITIES for k, v in r["granularity"][g]["subtasks"].items()}
                     for b, r in results.items()},
        "train_wall_s": sum(f["wall_time_s"] for f in facts),
        "train_samples_per_s": statistics.fmean(f["samples_per_second"] or 0 for f in facts),
        "losses": {f["stage"]: f["losses"] for f in facts},
        "prefill_ms": 1000 * statistics.fmean(r["speed"]["mean_prefill_latency_s"] for r in results.values()),
        "peak_memory_mb": max(r["speed"]["peak_memory_mb"] for r in results.values()),
        "checkpoint": str(final), "connector_config": config_json.get("connector_config"),
    }


RUN_SETTINGS = ("vision", "llm", "vision_width", "llm_width", "llm_layers", "pretrain_encoder_steps", "align_steps", "finetune_steps",
                "batch_size", "align_lr", "finetune_lr", "lora_r", "lora_alpha", "lm_full", "train_per_subtask",
                "test_per_subtask", "benchmarks", "mapping")


def run_fingerprint(job: dict) -> str:
    """What one run's numbers depend on: its connector, size and seed, the study settings that reach it,
    and the bytes of any data files it reads. A finished run is reused only under the same fingerprint."""
    config = job["config"]
    files = {k: path_digest(config[k]) for k in ("align_data", "finetune_data", "image_folder", "mapping") if config[k]}
    benchmarks = {k: path_digest(v) for k, v in (config["benchmarks"] or {}).items()}
    return settings_digest({"spec": list(job["spec"]), "resolution": job["resolution"], "seed": job["seed"],
                            "settings": {k: config[k] for k in RUN_SETTINGS}, "files": files, "benchmarks": benchmarks,
                            "version": RUN_FORMAT})


def _run_job(job: dict) -> dict:
    """One run, in a worker process (or inline): its row, written to run.json, or its failure."""
    run_dir = Path(job["run_dir"])
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    rank, _, barrier = processes()
    try:
        if rank == 0:  # an interrupted run, or one made with other settings, starts over
            shutil.rmtree(run_dir, ignore_errors=True)
        barrier()
        row = run_one(run_dir, *job["spec"], job["resolution"], job["seed"], StudyConfig(**job["config"]), job["data"])
        if row is None:  # another process of a multi-process run: the first one writes
            return {"row": None}
        row["fingerprint"] = job["fingerprint"]
    except Exception as error:  # noqa: BLE001 - reported, and the study goes on
        failure = {"run": run_dir.name, "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=3)}
        run_dir.mkdir(parents=True, exist_ok=True)  # recorded for `--collect`, under the run's fingerprint
        write_atomic(run_dir / "failure.json", json.dumps({**failure, "fingerprint": job["fingerprint"]}, indent=2))
        return {"failure": failure}
    write_atomic(run_dir / "run.json", json.dumps(row, indent=2))
    return {"row": row}


def run_study(config: StudyConfig, overwrite: bool = False, options=None) -> dict:
    """Every run of the grid (reusing those finished before with the same fingerprint) through the chosen
    launcher, then results.json, the report and the plots. `overwrite` lets the study write into a folder
    it did not make."""
    from cvlm.study_jobs import LaunchOptions, finished_row, launch, resolution_data, write_plan

    options = options or LaunchOptions(workers=config.workers)
    plan = write_plan(config, overwrite)
    root = Path(config.output).resolve()
    todo = [e for e in plan["runs"] if not finished_row(root, e)]
    if options.launcher != "submitit":  # on this machine: data and encoders first, once per size, with every core
        for resolution in sorted({e["resolution"] for e in todo}):
            resolution_data(root, config, resolution)
    bar = tqdm(total=len(plan["runs"]), initial=len(plan["runs"]) - len(todo), desc="cvlm study", unit="run")

    def on_done(name: str, outcome: dict) -> None:
        if "failure" in outcome:
            tqdm.write(f"cvlm study: {name} failed: {outcome['failure']['error']}")
        elif "busy" in outcome:
            tqdm.write(f"cvlm study: {name} is being run by another process; left to it")
        bar.update(1)
        bar.set_postfix_str(f"last: {name}")

    # the largest pictures (the longest runs) first, so that no long run is left alone at the end
    launch(str(root), [e["name"] for e in sorted(todo, key=lambda e: -e["resolution"])], options, on_done)
    bar.close()
    return collect(root)


def collect(output: str | os.PathLike) -> dict:
    """results.json, the report and the plots from the runs of the plan that finished; the others are
    listed (`pending`: never run, busy or interrupted; `failures`: ended with an error)."""
    from cvlm.report import learnt, verdicts, write_report
    from cvlm.study_jobs import finished_row, read_plan, recorded_failure, run_dir

    root = Path(output).resolve()
    plan = read_plan(root)
    config = StudyConfig(**plan["config"])
    rows, failures, pending = [], [], []
    for entry in plan["runs"]:
        row = finished_row(root, entry)
        failure = None if row else recorded_failure(root, entry)
        if row:  # its checkpoint where this machine sees the shared folder (it may have run on another)
            rows.append({**row, "checkpoint": str(run_dir(root, entry["name"]) / "finetune")})
        elif failure:
            failures.append({k: v for k, v in failure.items() if k != "fingerprint"})
        else:
            pending.append(entry["name"])
    if pending:
        print(f"cvlm study: {len(pending)} of {len(plan['runs'])} runs have not finished: {', '.join(pending)}")
    timing = quiet_timing(root, rows, config) if rows else []
    baselines = _baselines(root, rows) if rows and not config.benchmarks else None
    chance = baselines["chance"] if baselines else None
    result = {"config": plan["config"], "runs": rows, "failures": sorted(failures, key=lambda f: f["run"]),
              "pending": pending, "timing": timing, "verdicts": verdicts(rows, chance, timing) if rows else []}
    if baselines:
        result["baselines"] = {**baselines, "learnt": learnt(rows, chance)}
    write_atomic(root / "results.json", json.dumps(result, indent=2))
    write_report(root, result)
    _keep_checkpoints(root, rows, config)
    return result


def quiet_timing(root: Path, rows: list[dict], config: StudyConfig) -> list[dict]:
    """The speed figures the verdict uses: after every run, with no worker left, each connector's
    training step and prefill at each resolution (its first seed's checkpoint) timed in interleaved
    rounds in this one process, with its visual tokens and FLOPs. The runs' own timings, taken while
    runs shared the cores, stay in results.json as information only."""
    import torch

    from cvlm.bench import time_checkpoints

    torch.set_num_threads(os.cpu_count() or 1)
    first = min(r["seed"] for r in rows)
    cases = []
    for r in sorted((r for r in rows if r["seed"] == first), key=lambda r: (r["resolution"], r["connector"])):
        if config.benchmarks:
            train, question = config.finetune_data or config.align_data, "What is in the image?"
        else:
            train, question = _synthetic(root, r["resolution"], config)["train"], "What colour is the small square?"
        cases.append({"label": r["connector"], "family": r["family"], "resolution": r["resolution"],
                      "checkpoint": r["checkpoint"], "train_data": train, "question": question,
                      "image_folder": config.image_folder if config.benchmarks else None})
    print(f"cvlm study: timing {len(cases)} checkpoints in interleaved rounds (nothing else running)")
    try:
        return time_checkpoints(cases, batch_size=config.batch_size)
    except Exception as error:  # noqa: BLE001 - the runs stand; the speed verdict falls back to their timings
        print(f"cvlm study: the timing phase failed ({type(error).__name__}: {error}); the speed verdict uses the "
              "runs' own timings")
        return []


def _granularity_means(subtask_scores: dict, mapping: dict) -> dict:
    return {g: statistics.fmean(v for k, v in subtask_scores.items() if mapping[k] == g) for g in GRANULARITIES}


def _baselines(root: Path, rows: list[dict]) -> dict:
    """What needs no picture: chance (one over the options, per subtask) and the blind baseline: the
    best run's model asked the same questions over plain grey pictures."""
    from cvlm.eval.loaders import load_benchmark
    from cvlm.eval.runner import evaluate_model
    from cvlm.eval.synthetic import SUBTASKS

    best = max(rows, key=lambda r: statistics.fmean(v or 0 for v in r["scores"].values()))
    paths = _data_paths(root / "data" / f"synthetic-{best['resolution']}")
    questions, _ = load_benchmark("mmbench", paths["mmbench"])
    per_subtask: dict[str, list[float]] = {}
    for q in questions:
        per_subtask.setdefault(q.fields["category"], []).append(100 / len(q.choices))
    chance = _granularity_means({k: statistics.fmean(v) for k, v in per_subtask.items()}, SUBTASKS)
    name = f"{best['connector']}-{best['resolution']}px-seed{best['seed']}"
    if "mmbench_blind" not in paths:  # data written by an older version
        return {"chance": chance, "blind": None}
    blind = evaluate_model(best["checkpoint"], "mmbench", paths["mmbench_blind"], str(root / "blind" / name),
                           mode="likelihood", mapping_file=paths["mapping"], overwrite=True)
    scores = {g: blind["granularity"][g]["macro"] for g in GRANULARITIES}
    return {"chance": chance, "blind": {"run": name, "scores": scores}}


def _keep_checkpoints(root: Path, rows: list[dict], config: StudyConfig) -> None:
    """One Hub-ready checkpoint per connector: the first seed's run at the image size where that connector
    scored best (its mean over the granularities; the larger size on a tie), so the Space shows each
    connector at its best."""
    first = min(config.seeds)
    best: dict[str, tuple] = {}  # connector -> ((mean score, resolution), row)
    for row in rows:
        if row["seed"] != first:
            continue
        score = (statistics.fmean(v or 0 for v in row["scores"].values()), row["resolution"])
        if row["connector"] not in best or score > best[row["connector"]][0]:
            best[row["connector"]] = (score, row)
    for connector, (_, row) in best.items():
        target = root / "checkpoints" / connector
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(row["checkpoint"], target, ignore=shutil.ignore_patterns("checkpoint-*", "adapter"))
