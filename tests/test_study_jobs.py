"""The study as jobs: plan, run, collect, and the submitit launchers (submitit's local executor stands in
for Slurm: the same submission code path)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvlm.study import StudyConfig
from cvlm.study_jobs import LaunchOptions, read_plan, run_planned, submitit_executor, write_plan

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cvlm(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cvlm.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=900)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def answers(folder: Path) -> dict:
    """Each run's scores and its answer to every question, by run name."""
    result = json.loads((folder / "results.json").read_text())
    return {f"{r['connector']}-{r['resolution']}px-seed{r['seed']}": (r["scores"], r["questions"]) for r in result["runs"]}


@pytest.fixture(scope="module")
def local_quick(tmp_path_factory):
    """`cvlm study --quick` with the default launcher (the local process pool)."""
    root = tmp_path_factory.mktemp("local") / "study"
    cvlm("study", "--quick", "--output", str(root))
    return root


def test_the_plan_names_every_run_with_its_fingerprint_and_run_refuses_other_settings(tmp_path):
    root = tmp_path / "study"
    plan = write_plan(StudyConfig(output=str(root), connectors=["mlp", "avgpool:output_grid=1"], resolutions=[32, 48],
                                  seeds=[0, 1]))
    assert [e["name"] for e in plan["runs"]] == [
        "mlp-32px-seed0", "mlp-32px-seed1", "avgpool-output_grid-1-32px-seed0", "avgpool-output_grid-1-32px-seed1",
        "mlp-48px-seed0", "mlp-48px-seed1", "avgpool-output_grid-1-48px-seed0", "avgpool-output_grid-1-48px-seed1"]
    assert len({e["fingerprint"] for e in plan["runs"]}) == 8 and read_plan(root) == plan
    assert plan["config"]["finetune_steps"] == 1000  # the exact settings travel with the plan
    done = cvlm("study", "--output", str(root), "--run", "linear-32px-seed0", check=False)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"cvlm study: error: --run 'linear-32px-seed0' is not in {root / 'plan.json'}. Its runs: "
        + ", ".join(e["name"] for e in plan["runs"]) + ".")
    done = cvlm("study", "--output", str(root), "--run", "mlp-32px-seed0", "--finetune-steps", "5", check=False)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"cvlm study: error: --finetune-steps: --run and --collect take the settings from {root / 'plan.json'}; to "
        "change them, write the plan again with --plan.")
    done = cvlm("study", "--output", str(tmp_path / "none"), "--collect", check=False)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"cvlm study: error: {tmp_path / 'none' / 'plan.json'} does not exist: write the plan first with `cvlm study "
        f"--plan --output {tmp_path / 'none'}` (and the study's settings).")


@pytest.mark.parametrize("flags, message", [
    (["--gpus-per-run", "1"], "--gpus-per-run sets a submitit job: add --launcher submitit (Slurm) or submitit-local."),
    (["--launcher", "submitit", "--slurm-arg", "account"],
     "--slurm-arg 'account' is not NAME=VALUE: write it e.g. --slurm-arg account=my_project."),
])
def test_job_flags_are_checked_before_anything_is_written(tmp_path, flags, message):
    done = cvlm("study", "--quick", "--output", str(tmp_path / "study"), *flags, check=False)
    assert done.returncode == 2 and done.stderr.strip() == f"cvlm study: error: {message}"
    assert not (tmp_path / "study").exists()


def test_a_run_held_by_another_process_is_left_alone(tmp_path):
    from filelock import FileLock

    root = tmp_path / "study"
    write_plan(StudyConfig(output=str(root), connectors=["mlp"], resolutions=[32], seeds=[0]))
    (root / "locks").mkdir()
    with FileLock(str(root / "locks" / "mlp-32px-seed0.lock")):
        assert run_planned(str(root), "mlp-32px-seed0") == {"busy": "mlp-32px-seed0"}
    assert not (root / "runs").exists()  # nothing was started or removed


@pytest.mark.slow  # a minute each: whole --quick studies
def test_a_killed_job_resubmitted_finishes_the_study_without_redoing_the_others(local_quick, tmp_path):
    """One submitit job is killed (SIGKILL, as a scheduler's pre-emption would) while it trains: the study
    goes on, reports it unfinished, and the same command again runs only that job."""
    import psutil

    root = tmp_path / "study"
    command = [sys.executable, "-m", "cvlm.cli", "study", "--quick", "--output", str(root), "--launcher",
               "submitit-local", "--workers", "1"]  # one job at a time: mlp first, then avgpool
    study = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = root / "runs" / "mlp-32px-seed0" / "align" / "cvlm_run.json"  # mlp's job has begun training
    deadline = time.time() + 300
    while not started.exists() and study.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    jobs = [p for p in psutil.Process(study.pid).children(recursive=True)
            if "submitit.core._submit" in " ".join(p.cmdline())]
    assert len(jobs) == 1, "mlp's job should be the one running"
    os.kill(jobs[0].pid, signal.SIGKILL)
    output, _ = study.communicate(timeout=900)
    assert study.returncode == 0, output[-3000:]
    assert re.search(r"cvlm study: mlp-32px-seed0 failed: job \d+ ended without a result", output)
    assert "cvlm study: 1 of 2 runs have not finished: mlp-32px-seed0" in output
    first = json.loads((root / "results.json").read_text())
    assert first["pending"] == ["mlp-32px-seed0"] and [r["connector"] for r in first["runs"]] == ["avgpool"]
    kept = root / "runs" / "avgpool-32px-seed0" / "run.json"
    kept_at = kept.stat().st_mtime_ns

    again = cvlm(*command[3:])
    assert re.search(r"submitted mlp-32px-seed0 \(job \d+\)", again.stdout + again.stderr)
    assert "avgpool-32px-seed0 (job" not in again.stdout + again.stderr  # finished: not submitted again
    assert kept.stat().st_mtime_ns == kept_at
    result = json.loads((root / "results.json").read_text())
    assert result["pending"] == [] and result["failures"] == []
    # the same scores, question by question, as the default local run
    assert answers(root) == answers(local_quick)


@pytest.mark.slow  # a minute each: whole --quick studies
def test_a_run_of_two_processes_trains_together_and_answers_as_one_process(local_quick, tmp_path):
    """A job with two tasks is one run of two processes (DDP over gloo here, one per GPU on a cluster):
    same global batch, the questions shared out, the same answers."""
    root = tmp_path / "study"
    cvlm("study", "--quick", "--output", str(root), "--launcher", "submitit-local", "--tasks-per-run", "2",
         "--workers", "1")
    for name in ("mlp-32px-seed0", "avgpool-32px-seed0"):
        facts = json.loads((root / "runs" / name / "finetune" / "cvlm_training.json").read_text())
        assert (facts["world_size"], facts["train_batch_size"], facts["distributed"]) == (2, 16, "MULTI_CPU")
        assert json.loads((root / "runs" / name / "eval-mmbench" / "results.json").read_text())["processes"] == 2
    assert answers(root) == answers(local_quick)


@pytest.mark.slow  # a minute each: whole --quick studies
def test_the_readme_cluster_commands_run_on_the_local_executor(local_quick, tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- ci: cluster -->\n```bash\n(.*?)```", readme, re.S).group(1)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "runs" / "cluster"
    assert json.loads((root / "results.json").read_text())["pending"] == []
    assert answers(root) == answers(local_quick)


def test_the_slurm_launcher_writes_a_job_array_with_the_asked_resources(tmp_path, monkeypatch):
    """No Slurm here: a stand-in sbatch records the script submitit hands it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/script.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun to know it is on Slurm
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    options = LaunchOptions(launcher="submitit", workers=3, gpus_per_run=2, cpus_per_run=8, mem_gb_per_run=64,
                            timeout_min=600, partition="gpu", slurm_args={"account": "vision"})
    executor = submitit_executor(str(tmp_path / "study"), options)
    jobs = executor.map_array(print, ["a", "b", "c", "d"])
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2", "4242_3"]
    script = (tmp_path / "script.sh").read_text()
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=600", "#SBATCH --account=vision",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line


def test_collect_reads_the_runs_where_this_machine_sees_the_shared_folder(tmp_path):
    """A run records its checkpoint's path on the machine it ran on; collect (maybe on another machine,
    the folder mounted elsewhere) uses the run folder it sees."""
    import shutil

    from cvlm.study import collect

    root = tmp_path / "node-a" / "study"
    write_plan(StudyConfig(output=str(root), connectors=["mlp"], resolutions=[32], seeds=[0], align_steps=4,
                           finetune_steps=6, train_per_subtask=4, test_per_subtask=2, pretrain_encoder_steps=4))
    assert run_planned(str(root), "mlp-32px-seed0")["row"]["checkpoint"] == str(root / "runs" / "mlp-32px-seed0" / "finetune")
    elsewhere = tmp_path / "node-b" / "study"
    shutil.move(str(tmp_path / "node-a"), str(tmp_path / "node-b"))
    result = collect(elsewhere)
    assert [r["checkpoint"] for r in result["runs"]] == [str(elsewhere / "runs" / "mlp-32px-seed0" / "finetune")]
    assert (elsewhere / "checkpoints" / "mlp" / "model.safetensors").is_file() and result["pending"] == []
