"""The study as independent jobs: a plan, runs that execute alone, a collection of whatever finished.

`cvlm study --plan` writes `plan.json` into the output folder: one entry per connector x size x seed,
with its name and fingerprint, next to the study's settings. `cvlm study --run NAME` executes one entry
on whatever machine sees that folder; it is idempotent (a run finished under the same fingerprint is
kept, a run busy elsewhere is left alone, an interrupted one starts over). `cvlm study --collect` builds
results.json, the report and the plots from the finished runs and names the others.

Launchers hand the unfinished runs to an engine: `local` (a process pool, the default), `submitit`
(a Slurm job array) and `submitit-local` (submitit's local executor: the same submission code path,
on this machine).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from cvlm.files import check_output, read_json, write_atomic

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
LAUNCHERS = ("local", "submitit", "submitit-local")


@dataclass
class LaunchOptions:
    """Where the runs go. `workers`: runs at once (a local pool's size, a Slurm array's parallelism)."""

    launcher: str = "local"
    workers: int = 2
    gpus_per_run: int = 0
    tasks_per_run: int = 1  # processes per run (submitit launchers): one per GPU, training together
    cpus_per_run: int | None = None
    mem_gb_per_run: int | None = None
    timeout_min: int = 24 * 60
    partition: str | None = None
    slurm_args: dict | None = None  # any other #SBATCH setting, e.g. {"account": "x", "qos": "y"}


# ---- the plan ----------------------------------------------------------------------------------------
def write_plan(config, overwrite: bool = False) -> dict:
    """Checks the settings, then writes study_config.json and plan.json; returns the plan."""
    from cvlm.study import check_settings, parse_connector, run_fingerprint

    check_settings(config)
    root = check_output(config.output, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    settings = asdict(config)
    write_atomic(root / "study_config.json", json.dumps(settings, indent=2))
    specs = [parse_connector(c) for c in config.connectors]
    runs = []
    for resolution in config.resolutions:
        for spec in specs:
            for seed in config.seeds:
                entry = {"name": f"{spec[2]}-{resolution}px-seed{seed}", "spec": list(spec), "resolution": resolution,
                         "seed": seed}
                entry["fingerprint"] = run_fingerprint({**entry, "config": settings})
                runs.append(entry)
    plan = {"format": PLAN_FORMAT, "config": settings, "runs": runs}
    write_atomic(root / PLAN_FILE, json.dumps(plan, indent=2))
    return plan


def read_plan(output: str | os.PathLike) -> dict:
    path = Path(output) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: write the plan first with `cvlm study --plan --output {output}` "
                         "(and the study's settings).")
    plan = read_json(path, "study plan")
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} was written by another version of cvlm (format {plan.get('format')}); write it "
                         "again with `cvlm study --plan`.")
    return plan


def run_dir(output: str | os.PathLike, name: str) -> Path:
    return Path(output) / "runs" / name


def _recorded(output: str | os.PathLike, entry: dict, name: str) -> dict | None:
    """The run's `name` record (run.json, failure.json) when it was written under the plan's fingerprint."""
    try:
        record = json.loads((run_dir(output, entry["name"]) / name).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == entry["fingerprint"] else None


def finished_row(output: str | os.PathLike, entry: dict) -> dict | None:
    """The run's row when it finished under the plan's fingerprint, else None."""
    return _recorded(output, entry, "run.json")


def recorded_failure(output: str | os.PathLike, entry: dict) -> dict | None:
    return _recorded(output, entry, "failure.json")


# ---- one run -----------------------------------------------------------------------------------------
def _lock(path: Path, timeout: float):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


def resolution_data(root: Path, config, resolution: int) -> dict:
    """The data and encoder every run at `resolution` reads, made once: one writer at a time (a file
    lock), the others wait and then reuse what it wrote."""
    from cvlm.study import _encoder, _synthetic

    with _lock(root / "locks" / f"data-{resolution}px.lock", timeout=-1):
        if config.benchmarks:
            data = {"align": config.align_data, "finetune": config.finetune_data or config.align_data,
                    "benchmarks": dict(config.benchmarks), "mapping": config.mapping}
        else:
            paths = _synthetic(root, resolution, config)
            data = {"align": paths["train"], "finetune": paths["train"], "benchmarks": {"mmbench": paths["mmbench"]},
                    "mapping": paths["mapping"]}
        data["vision"] = _encoder(root, resolution, config)
    return data


def run_planned(output: str, name: str, threads: int | None = None) -> dict:
    """Executes one run of the plan in `output`: {"row": ...} (finished now or before), {"failure": ...}
    or {"busy": name} when another process holds the run."""
    from filelock import Timeout

    from cvlm.study import StudyConfig, _run_job, processes, share

    root = Path(output).resolve()
    plan = read_plan(root)
    entries = {e["name"]: e for e in plan["runs"]}
    if name not in entries:
        raise ValueError(f"--run {name!r} is not in {root / PLAN_FILE}. Its runs: {', '.join(entries)}.")
    entry = entries[name]
    rank = processes()[0]  # a multi-process run: the first process locks, checks and prepares, for all
    lock, state = _lock(root / "locks" / f"{name}.lock", timeout=0), None
    if rank == 0:
        try:
            lock.acquire()
            state = "finished" if finished_row(root, entry) else "run"
        except Timeout:
            state = "busy"
    state = share(state)
    try:
        if state == "busy":
            return {"busy": name}
        if state == "finished":
            return {"row": finished_row(root, entry), "reused": True}
        if threads:
            import torch

            torch.set_num_threads(threads)
        data = share(resolution_data(root, StudyConfig(**plan["config"]), entry["resolution"]) if rank == 0 else None)
        return _run_job({"run_dir": str(run_dir(root, name)), "spec": tuple(entry["spec"]),
                         "resolution": entry["resolution"], "seed": entry["seed"], "config": plan["config"],
                         "fingerprint": entry["fingerprint"], "threads": threads, "data": data})
    finally:
        if lock.is_locked:
            lock.release()


def _run_in_job(output: str, name: str, threads: int | None = None) -> dict:
    """What a submitit job executes: the run, and where it ran. A job with several tasks is one
    multi-process run: submitit's environment gives each task its rank (MASTER_ADDR, RANK, WORLD_SIZE...)."""
    import socket

    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return {**run_planned(output, name, threads), "host": socket.gethostname()}


# ---- launchers ---------------------------------------------------------------------------------------
def launch(output: str, names: list[str], options: LaunchOptions, on_done) -> None:
    """Runs `names` of the plan in `output` with the chosen launcher; `on_done(name, outcome)` after each."""
    if not names:
        return
    if options.launcher == "local":
        _launch_pool(output, names, options, on_done)
    elif options.launcher in ("submitit", "submitit-local"):
        _launch_submitit(output, names, options, on_done)
    else:
        raise ValueError(f"--launcher {options.launcher!r} is not known. Allowed values: {', '.join(LAUNCHERS)}.")


def _threads(workers: int, runs: int) -> int:
    """Small models use one core each better than two: one run per core, the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, min(workers, runs)))


def _launch_pool(output: str, names: list[str], options: LaunchOptions, on_done) -> None:
    workers = max(1, min(options.workers, len(names)))
    if workers == 1:
        for name in names:
            on_done(name, run_planned(output, name))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from cvlm.study import die_with_parent

    threads = _threads(workers, len(names))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_planned, output, name, threads): name for name in names}
        for future in as_completed(futures):
            on_done(futures[future], future.result())


def submitit_executor(output: str, options: LaunchOptions):
    """A submitit executor for the runs: Slurm (`submitit`) or this machine (`submitit-local`). Its logs
    and job files go to OUTPUT/submitit/."""
    try:
        import submitit
    except ImportError:
        raise ValueError(f"--launcher {options.launcher} needs submitit: pip install -e \".[cluster]\"") from None
    folder = Path(output) / "submitit" / "%j"
    if options.launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.timeout_min, gpus_per_node=options.gpus_per_run,
                                   tasks_per_node=options.tasks_per_run)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    parameters = {"timeout_min": options.timeout_min, "gpus_per_node": options.gpus_per_run,
                  "tasks_per_node": options.tasks_per_run,
                  "nodes": 1, "slurm_array_parallelism": options.workers, "name": "cvlm-study"}
    if options.cpus_per_run:
        parameters["cpus_per_task"] = options.cpus_per_run
    if options.mem_gb_per_run:
        parameters["mem_gb"] = options.mem_gb_per_run
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.slurm_args:
        parameters["slurm_additional_parameters"] = dict(options.slurm_args)
    executor.update_parameters(**parameters)
    return executor


def _launch_submitit(output: str, names: list[str], options: LaunchOptions, on_done) -> None:
    """Slurm: one job array, `workers` at a time (Slurm throttles it). Local: submitit's local executor
    starts every job it is given at once, so runs go in `workers` at a time, each on its share of the cores."""
    executor = submitit_executor(output, options)
    local = options.launcher == "submitit-local"
    threads = max(1, _threads(options.workers, len(names)) // options.tasks_per_run) if local else None
    window = max(1, min(options.workers, len(names))) if local else len(names)
    waiting, running = list(names), {}
    while waiting or running:
        while waiting and len(running) < window:
            if local:
                submitted = {waiting[0]: executor.submit(_run_in_job, output, waiting.pop(0), threads)}
            else:
                submitted, waiting = dict(zip(waiting, executor.map_array(partial(_run_in_job, output), waiting))), []
            running.update(submitted)
            print(f"cvlm study: submitted {', '.join(f'{n} (job {j.job_id})' for n, j in submitted.items())}")
        done = [n for n, job in running.items() if job.done()]
        if not done:
            time.sleep(1.0)
            continue
        for name in done:
            job = running.pop(name)
            try:
                outcome = job.result()
            except Exception as error:  # noqa: BLE001 - a job that died (killed, out of time or memory)
                outcome = {"failure": {"run": name, "error": f"job {job.job_id} ended without a result: "
                                                             f"{str(error).strip().splitlines()[0] if str(error) else type(error).__name__}",
                                       "traceback": ""}}
            on_done(name, outcome)
