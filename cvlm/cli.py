"""The `cvlm` command: thin wrappers over functions a user can call from Python."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal: the problem and where help is, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, minimum, maximum=None, what=""):
    """An argparse type: a `kind` (int or float) in [minimum, maximum]; anything else is named with the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if value < minimum or (maximum is not None and value > maximum) or value != value:
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {what or 'a value'} {bounds}")
        return value

    return parse


COUNT = _number(int, 1)  # a count of things: at least one
NATURAL = _number(int, 0)  # zero allowed (seeds, steps that may be skipped)
PIXELS = _number(int, 1, 8192, "a size in pixels")
RATE = _number(float, 1e-12, 10.0, "a learning rate")
PORT = _number(int, 1, 65535, "a port")


def _connector_arg(text: str) -> tuple[str, object]:
    """`key=value`; the value is read as JSON when it parses (ints, floats, bools, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--connector-arg {text!r} is not key=value (e.g. --connector-arg depth=3).")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_build(args) -> int:
    from cvlm.build import build

    layers = args.feature_layer[0] if args.feature_layer and len(args.feature_layer) == 1 else args.feature_layer
    path = build(
        args.output,
        overwrite=args.overwrite,
        vision=args.vision,
        llm=args.llm,
        connector=args.connector,
        connector_args=dict(args.connector_arg or []),
        image_size=args.image_size,
        feature_layer=-2 if layers is None else layers,
        select_strategy=args.select_strategy,
        seed=args.seed,
        dtype=args.dtype,
    )
    from cvlm.modeling import ConnectorVLMConfig

    config = ConnectorVLMConfig.from_pretrained(path)
    print(f"wrote {path}: connector={config.connector_type}, image tokens Q={config.num_image_tokens}")
    return 0


def _cmd_connectors(args) -> int:
    from cvlm.connector_table import connector_markdown, connector_table

    if args.markdown:
        print(connector_markdown(vision_hidden=args.vision_hidden, text_hidden=args.text_hidden))
        return 0
    rows = connector_table(grid=tuple(args.grid), vision_hidden=args.vision_hidden, text_hidden=args.text_hidden)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<12} {'family':<12} {'tokens':>6} {'params':>10}  (grid {args.grid[0]}x{args.grid[1]}, "
          f"C={args.vision_hidden}, D={args.text_hidden})")
    for row in rows:
        print(f"{row['name']:<12} {row['family']:<12} {row['num_tokens']:>6} {row['params']:>10,}")
    return 0


def _cmd_generate(args) -> int:
    from cvlm.generate import generate

    from cvlm.generate import demo_image

    images = list(args.image or []) + ([demo_image()] if args.demo_image else [])
    for answer in generate(args.model, args.prompt, images=images, max_new_tokens=args.max_new_tokens,
                           trust_remote_code=args.trust_remote_code):
        print(repr(answer))
    return 0


def _cmd_bench_connectors(args) -> int:
    import platform

    import torch

    from cvlm.bench import bench_connectors, format_table, write_results

    size = {"vision_width": args.vision_width, "vision_layers": args.vision_layers, "llm_width": args.llm_width,
            "llm_layers": args.llm_layers}
    rows = bench_connectors(vision=args.vision, llm=args.llm, image_size=args.image_size, connectors=args.connectors,
                            repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, device=args.device,
                            **{k: v for k, v in size.items() if v is not None})
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    machine = f"{device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    print(f"cvlm bench connectors: vision={args.vision} llm={args.llm} image_size={args.image_size} "
          f"dtype={args.dtype} device={args.device} ({machine}); median of {args.repeats} runs")
    print(format_table(rows))
    if args.output:
        write_results(rows, args.output, {**vars(args), "func": None, "machine": machine})
        print(f"wrote {args.output}")
    return 0


def _cmd_bench_train(args) -> int:
    import platform

    import torch

    from cvlm.bench import bench_train

    rows = bench_train(steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
                       vision_width=args.vision_width, vision_layers=args.vision_layers, llm_width=args.llm_width,
                       llm_layers=args.llm_layers, repeats=args.repeats)
    print(f"cvlm bench train: tiny presets resized to ViT width {args.vision_width} x {args.vision_layers} layers, "
          f"{args.image_size}px (8px patches), LM width {args.llm_width} x {args.llm_layers} layers; batch "
          f"{args.batch_size}, {args.steps} steps, median of {args.repeats}; {platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    speed = {r["run"]: r["samples_per_second"] for r in rows}
    for r in rows:
        print(f"  {r['run']:<32} {r['samples_per_second']:>8.1f} samples/s")
    names = list(speed)
    print(f"  feature cache speed-up (align): {speed[names[1]] / speed[names[0]]:.2f}x")
    print(f"  LoRA vs full LM (finetune):     {speed[names[2]] / speed[names[3]]:.2f}x")
    return 0


def _cmd_eval(args) -> int:
    from cvlm.eval.runner import evaluate_model

    results = evaluate_model(args.model, args.benchmark, args.data, args.output, limit=args.limit,
                             batch_size=args.batch_size, mode=args.mode, max_new_tokens=args.max_new_tokens,
                             image_folder=args.image_folder, mapping_file=args.mapping, dtype=args.dtype,
                             overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                             update_card=not args.no_card)
    if results is not None:  # the first process of a multi-process run reports
        from pathlib import Path

        print((Path(args.output) / "results.md").read_text())
    return 0


def _cmd_push(args) -> int:
    from cvlm.model_cards.push import push

    report = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, dry_run=args.dry_run, adapter=args.adapter,
                  base_model=args.base_model, force=args.force, trust_remote_code=args.trust_remote_code)
    print(f"{'would upload' if args.dry_run else 'uploaded'} {len(report['files'])} files "
          f"({report['total_bytes'] / 2**20:.2f} MiB) from {report['folder']} to {report['repo_id']}")
    for name, size in report["files"]:
        print(f"  {size:>12,}  {name}")
    if "load_check" in report:
        print(f"clean-process load check: {report['load_check']}")
    print("card metadata:", json.dumps(report["card_metadata"], indent=2))
    if "commit" in report:
        print(f"commit: {report['commit']}")
    return 0


def _cmd_space(args) -> int:
    import importlib.util
    import os
    from pathlib import Path

    if args.models:
        os.environ["CVLM_SPACE_MODELS"] = ",".join(args.models)
    app_path = Path(__file__).resolve().parents[1] / "spaces" / "connector_arena" / "app.py"
    spec = importlib.util.spec_from_file_location("connector_arena_app", app_path)
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app  # its dataclasses look themselves up there
    spec.loader.exec_module(app)
    import gradio as gr

    app.create_demo().launch(server_name="127.0.0.1", server_port=args.port, theme=gr.themes.Soft())
    return 0


STUDY_SETTINGS = ("connectors", "resolutions", "seeds", "vision", "llm", "vision_width", "llm_width", "llm_layers",
                  "align_steps", "finetune_steps", "batch_size", "train_per_subtask", "test_per_subtask", "align_data",
                  "finetune_data", "image_folder", "mapping", "pretrain_encoder_steps", "align_lr", "finetune_lr",
                  "lora_r", "lora_alpha", "lm_full", "benchmark")


def _study_config(args):
    from cvlm.study import StudyConfig

    settings = {}
    if args.quick:  # minutes: two connectors, one resolution, one seed, few steps
        settings = {"connectors": ["mlp", "avgpool"], "resolutions": [32], "seeds": [0], "align_steps": 10,
                    "finetune_steps": 30, "train_per_subtask": 8, "test_per_subtask": 3, "pretrain_encoder_steps": 30}
    settings |= {k: getattr(args, k) for k in (*STUDY_SETTINGS[:-1], "workers") if getattr(args, k) is not None}
    config = StudyConfig(output=args.output, **settings)
    if args.connectors == ["all"]:
        from cvlm.modeling import CONNECTORS

        config.connectors = list(CONNECTORS)
    if args.benchmark:
        config.benchmarks = _key_values("--benchmark", args.benchmark)
        if not config.align_data:
            raise ValueError("--benchmark needs --align-data (and optionally --finetune-data): real benchmarks "
                             "score models trained on real data.")
    return config


def _key_values(flag: str, items: list[str] | None) -> dict:
    """NAME=VALUE items of a repeatable flag, each checked."""
    bad = [item for item in items or [] if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise ValueError(f"{flag} {bad[0]!r} is not NAME=VALUE: write it e.g. {flag} account=my_project.")
    return dict(item.split("=", 1) for item in items or [])


def _launch_options(args, config):
    from cvlm.study_jobs import LaunchOptions

    job_flags = [f for f, given in (("--gpus-per-run", args.gpus_per_run), ("--tasks-per-run", args.tasks_per_run != 1),
                                    ("--cpus-per-run", args.cpus_per_run), ("--mem-gb-per-run", args.mem_gb_per_run),
                                    ("--partition", args.partition), ("--slurm-arg", args.slurm_arg)) if given]
    if job_flags and args.launcher == "local":
        raise ValueError(f"{job_flags[0]} sets a submitit job: add --launcher submitit (Slurm) or submitit-local.")
    slurm = _key_values("--slurm-arg", args.slurm_arg)
    return LaunchOptions(launcher=args.launcher, workers=config.workers, gpus_per_run=args.gpus_per_run,
                         tasks_per_run=args.tasks_per_run,
                         cpus_per_run=args.cpus_per_run, mem_gb_per_run=args.mem_gb_per_run,
                         timeout_min=args.timeout_min, partition=args.partition, slurm_args=slurm or None)


def _cmd_study(args) -> int:
    from cvlm.study import collect, run_study
    from cvlm.study_jobs import run_planned, write_plan

    if args.run or args.collect:  # the settings are the plan's
        given = [f"--{k.replace('_', '-')}" for k in STUDY_SETTINGS if getattr(args, k) is not None]
        if given or args.quick:
            raise ValueError(f"{' '.join(given) or '--quick'}: --run and --collect take the settings from "
                             f"{Path(args.output) / 'plan.json'}; to change them, write the plan again with --plan.")
    if args.run:
        outcome = run_planned(args.output, args.run)
        if "busy" in outcome:
            print(f"cvlm study: {args.run} is being run by another process (its lock is held); nothing done.")
        elif "failure" in outcome:
            print(f"cvlm study: {args.run} failed: {outcome['failure']['error']}", file=sys.stderr)
            return 1
        else:
            print(f"cvlm study: {args.run} {'had finished before' if outcome.get('reused') else 'finished'}; "
                  f"its row is {Path(args.output) / 'runs' / args.run / 'run.json'}")
        return 0
    if args.collect:
        result = collect(args.output)
    else:
        config = _study_config(args)
        if args.plan:
            plan = write_plan(config, overwrite=args.overwrite)
            print(f"cvlm study: {len(plan['runs'])} runs planned in {Path(config.output) / 'plan.json'}:")
            print("\n".join(f"  {e['name']}" for e in plan["runs"]))
            print(f"Run each with `cvlm study --output {config.output} --run NAME`, then "
                  f"`cvlm study --output {config.output} --collect`.")
            return 0
        result = run_study(config, overwrite=args.overwrite, options=_launch_options(args, config))
    print((Path(args.output) / "report.md").read_text())
    return 0 if result["runs"] else 2


def _cmd_card(args) -> int:
    from cvlm.model_cards.card import write_card

    print(f"wrote {write_card(args.folder, repo_id=args.repo_id)}")
    return 0


def _cmd_bench_overhead(args) -> int:
    import platform

    import torch

    from cvlm.bench import bench_overhead

    rows = bench_overhead(image_size=args.image_size, vision_width=args.vision_width, vision_layers=args.vision_layers,
                          llm_width=args.llm_width, llm_layers=args.llm_layers, new_tokens=args.new_tokens,
                          repeats=args.repeats, dtype=args.dtype, device=args.device, llm=args.llm)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.machine()
    from cvlm.presets import LM_PRESETS

    lm = f"LM width {args.llm_width} x {args.llm_layers}" if args.llm in LM_PRESETS else f"LM {args.llm}"
    print(f"cvlm bench overhead: mlp connector, ViT width {args.vision_width} x {args.vision_layers}, {args.image_size}px, "
          f"{lm}; {args.dtype} on {args.device} ({device}, torch "
          f"{torch.__version__}); median of {args.repeats} interleaved rounds")
    print(f"{'':<24}{'ours ms':>10}{'LLaVA ms':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['task']:<24}{r['ours_ms']:>10.2f}{r['llava_ms']:>10.2f}{r['ratio']:>8.3f}")
    return 0


def _cmd_convert(args) -> int:
    from cvlm.convert import from_llava, to_llava

    if args.direction == "from-llava":
        path = from_llava(args.source, args.output, projector=args.projector, vision=args.vision, overwrite=args.overwrite)
    else:
        path = to_llava(args.source, args.output, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _bench_size_flags(p, image_size: int | None, sized: bool = True) -> None:
    """The model size of the benchmarks: the image size, and the tiny presets resized to a width and
    depth (`sized`: the defaults of `bench train` / `bench overhead`; else each preset's own)."""
    _flag(p, "image-size", type=PIXELS, default=image_size)
    for name, default in (("vision-width", 256), ("vision-layers", 6), ("llm-width", 512), ("llm-layers", 4)):
        _flag(p, name, type=COUNT, default=default if sized else None,
              help="tiny presets only (default " + (str(default) if sized else "the preset's own") + ")")


def _flag(p, name: str, **kwargs) -> None:
    """--name-with-dashes, also spelled --name_with_underscores (as cvlm train's flags are)."""
    p.add_argument(f"--{name}", *([f"--{name.replace('-', '_')}"] if "-" in name else []), **kwargs)


def _add_build(sub) -> None:
    """cvlm build."""
    p = sub.add_parser("build", help="build a model from a vision encoder + LM + connector and save it")
    p.add_argument("--vision", default="tiny-clip", help="Hub id, local folder, or tiny-clip / tiny-siglip")
    p.add_argument("--llm", default="tiny-llama", help="Hub id, local folder, or tiny-llama / tiny-qwen2")
    p.add_argument("--connector", default="mlp", help="a registered connector (see `cvlm connectors`)")
    _flag(p, "connector-arg", action="append", type=_connector_arg, metavar="KEY=VALUE",
                   help="a connector hyper-parameter; repeat for several")
    _flag(p, "image-size", type=PIXELS, help="square input size (pretrained encoders: position embeddings interpolated)")
    _flag(p, "feature-layer", type=int, nargs="+",
                   help="vision hidden-state index (default -2); several are concatenated along channels")
    _flag(p, "select-strategy", choices=["default", "full"], default="default",
                   help="default drops the encoder's CLS/register tokens; full keeps them")
    p.add_argument("--seed", type=NATURAL, default=0, help="seed of the connector's (and presets') initialisation")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--output", required=True, help="folder to write the checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if it holds files this tool did not write")
    p.set_defaults(func=_cmd_build)


def _add_eval(sub) -> None:
    """cvlm eval."""
    p = sub.add_parser("eval", help="score a checkpoint on MME / MMBench / SEED-Bench with the granularity breakdown")
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--benchmark", required=True, choices=["mme", "mmbench", "seed_bench"])
    p.add_argument("--data", required=True, help="the benchmark's files (see README) or a Hub id")
    _flag(p, "image-folder", help="SEED-Bench JSON: the folder of its images")
    p.add_argument("--output", required=True, help="folder for predictions.jsonl, results.json, results.md")
    p.add_argument("--limit", type=COUNT, help="only the first N questions")
    _flag(p, "batch-size", type=COUNT, default=8)
    p.add_argument("--mode", choices=["generate", "likelihood"], default="generate")
    _flag(p, "max-new-tokens", type=COUNT, default=16)
    p.add_argument("--overwrite", action="store_true",
                   help="answer every question again when --output holds another run's predictions")
    _flag(p, "trust-remote-code", action="store_true",
                   help="run the code a non-connector-vlm checkpoint names in its auto_map (read it first)")
    p.add_argument("--mapping", help="your own subtask -> granularity JSON (default: eval/granularity_mapping.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _flag(p, "no-card", action="store_true",
                   help="leave a local checkpoint as it is (by default one that cvlm wrote gets the results in its "
                        "eval_results/ and card)")
    p.set_defaults(func=_cmd_eval)


def _add_convert_push(sub) -> None:
    """cvlm convert and cvlm push."""
    p = sub.add_parser("convert", help="LLaVA checkpoints in and out of the family")
    p.add_argument("direction", choices=["from-llava", "to-llava"])
    p.add_argument("source", help="from-llava: a LlavaForConditionalGeneration or LLaVA-repo checkpoint; "
                                  "to-llava: a connector-vlm checkpoint")
    p.add_argument("--output", required=True)
    p.add_argument("--projector", help="LLaVA repo: the mm_projector.bin / .safetensors of a stage-1 run")
    p.add_argument("--vision", help="LLaVA repo: the vision tower (default: the config's mm_vision_tower)")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if it holds files this tool did not write")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("push", help="publish a checkpoint folder (or its LoRA adapter) to the Hub in one commit")
    p.add_argument("folder")
    _flag(p, "repo-id", required=True, help="ORG/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="a branch to push to (created if needed)")
    _flag(p, "commit-message")
    _flag(p, "dry-run", action="store_true", help="check and list, no network")
    p.add_argument("--adapter", action="store_true", help="push the training run's LoRA adapter (adapter/) alone")
    _flag(p, "base-model", help="with --adapter: the Hub repo of its base checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite files the repo already holds")
    _flag(p, "trust-remote-code", action="store_true",
                   help="let the clean-process load check run modeling code that differs from this project's")
    p.set_defaults(func=_cmd_push)


def _add_study(sub) -> None:
    """cvlm study."""
    p = sub.add_parser("study", help="the connector paper's experiment: every connector trained, scored, reported")
    p.add_argument("--output", default="runs/study")
    p.add_argument("--connectors", nargs="+", help="registry names, optionally name:key=value,...; 'all' for the registry")
    p.add_argument("--resolutions", type=PIXELS, nargs="+", help="image sizes (default 32 48 64)")
    p.add_argument("--seeds", type=NATURAL, nargs="+")
    p.add_argument("--vision")
    p.add_argument("--llm")
    _flag(p, "vision-width", type=COUNT, help="tiny vision preset's width (default 64)")
    _flag(p, "llm-width", type=COUNT, help="tiny LM preset's width (default 128)")
    _flag(p, "llm-layers", type=_number(int, 1, 64), help="tiny LM preset's depth (default 3)")
    _flag(p, "align-steps", type=COUNT, help="default 30")
    p.add_argument("--finetune-steps", "--finetune_steps", "--steps", type=COUNT, help="default 1000")
    _flag(p, "batch-size", type=COUNT)
    _flag(p, "lm-full", action=argparse.BooleanOptionalAction,
                   help="finetune the whole LM instead of LoRA (default: yes for a tiny preset LM, no otherwise)")
    _flag(p, "lora-r", type=COUNT, help="LoRA rank (default 8)")
    _flag(p, "lora-alpha", type=COUNT, help="LoRA alpha (default 16)")
    _flag(p, "align-lr", type=RATE, help="default 1e-3")
    _flag(p, "finetune-lr", type=RATE, help="default 1e-3")
    _flag(p, "pretrain-encoder-steps", type=NATURAL,
                   help="steps of the tiny encoder's pre-training on synthetic pictures (0: keep it random)")
    p.add_argument("--workers", type=_number(int, 1, 64, "a number of processes"),
                   help="runs at once, the cores shared between them (default 2)")
    _flag(p, "train-per-subtask", type=COUNT)
    _flag(p, "test-per-subtask", type=COUNT)
    _flag(p, "align-data", help="real scale: LLaVA-format align data")
    _flag(p, "finetune-data", help="real scale: LLaVA-format finetune data")
    _flag(p, "image-folder")
    p.add_argument("--benchmark", action="append", metavar="NAME=PATH", help="real scale: mme=PATH, mmbench=PATH, ...")
    p.add_argument("--mapping", help="your own subtask -> granularity mapping")
    p.add_argument("--quick", action="store_true", help="two connectors, one resolution, one seed, few steps")
    p.add_argument("--overwrite", action="store_true", help="use --output even if it holds files this tool did not write")
    jobs = p.add_argument_group("the study as jobs (see the README's 'Running the study on a cluster')")
    steps = jobs.add_mutually_exclusive_group()
    steps.add_argument("--plan", action="store_true", help="write OUTPUT/plan.json (one entry per run) and stop")
    steps.add_argument("--run", "--run-name", metavar="NAME",
                       help="execute one run of OUTPUT/plan.json (idempotent), on any machine; under torchrun, spell it "
                            "--run-name (torchrun takes --run for its own --run-path)")
    steps.add_argument("--collect", action="store_true",
                       help="results.json, report and plots from the finished runs; lists the others")
    jobs.add_argument("--launcher", choices=("local", "submitit", "submitit-local"), default="local",
                      help="local: a process pool (default); submitit: a Slurm job array; submitit-local: submitit's "
                           "local executor (the same code path, on this machine)")
    _flag(jobs, "gpus-per-run", type=NATURAL, default=0, help="GPUs per job (submitit launchers)")
    _flag(jobs, "tasks-per-run", type=COUNT, default=1,
          help="processes per run, training together (submitit launchers; one per GPU)")
    _flag(jobs, "cpus-per-run", type=COUNT, help="Slurm --cpus-per-task")
    _flag(jobs, "mem-gb-per-run", type=COUNT, help="Slurm --mem, in GB")
    _flag(jobs, "timeout-min", type=COUNT, default=24 * 60, help="a job's time limit in minutes (default 1440)")
    jobs.add_argument("--partition", help="Slurm partition")
    _flag(jobs, "slurm-arg", action="append", metavar="KEY=VALUE",
          help="any other #SBATCH setting, e.g. account=proj or qos=high (repeatable)")
    p.set_defaults(func=_cmd_study)


def _add_small(sub) -> None:
    """cvlm space, card, connectors and generate."""
    p = sub.add_parser("space", help="the connector comparison Space on 127.0.0.1")
    p.add_argument("--models", nargs="+", help="Hub ids or folders (default: untrained tiny presets)")
    p.add_argument("--port", type=PORT, default=7860)
    p.set_defaults(func=_cmd_space)

    p = sub.add_parser("card", help="(re)write README.md of a checkpoint folder from its recorded facts")
    p.add_argument("folder")
    _flag(p, "repo-id", help="the Hub repo the card's usage snippet names")
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("connectors", help="list the connector registry")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--markdown", action="store_true",
                   help="print the README's table (CLIP-L/14 at 224/336/448 px; --grid is not used)")
    p.add_argument("--grid", type=_number(int, 1, 1024, "a grid side"), nargs=2, default=[24, 24], metavar=("H", "W"),
                   help="patch grid (default 24 24)")
    _flag(p, "vision-hidden", type=_number(int, 1, 65536), default=1024, help="encoder width C (default 1024)")
    _flag(p, "text-hidden", type=_number(int, 1, 65536), default=4096, help="LM width D (default 4096)")
    p.set_defaults(func=_cmd_connectors)

    p = sub.add_parser("generate", help="answer a prompt about an image with a checkpoint")
    p.add_argument("model", help="checkpoint folder or Hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", help="image file; repeat for several (omit for text only)")
    _flag(p, "demo-image", action="store_true", help="add a built-in test picture")
    _flag(p, "max-new-tokens", type=COUNT, default=32)
    _flag(p, "trust-remote-code", action="store_true",
                   help="run the code a non-connector-vlm checkpoint names in its auto_map (read it first)")
    p.set_defaults(func=_cmd_generate)


def _add_bench(sub) -> None:
    """cvlm bench connectors | train | overhead."""
    bench = sub.add_parser("bench", help="side-by-side speed benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("connectors", help="per connector: params, Q, connector and LM prefill time vs the P/Q bound")
    p.add_argument("--vision", default="tiny-clip")
    p.add_argument("--llm", default="tiny-llama")
    _bench_size_flags(p, image_size=None, sized=False)
    p.add_argument("--connectors", nargs="+", help="a subset of the registry (mlp is always measured)")
    p.add_argument("--repeats", type=COUNT, default=20)
    p.add_argument("--warmup", type=NATURAL, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="also write the rows to this JSON file")
    p.set_defaults(func=_cmd_bench_connectors)

    p = bench.add_parser("train", help="training samples/s: feature cache on/off, LoRA vs full LM")
    p.add_argument("--steps", type=COUNT, default=20)
    _flag(p, "batch-size", type=COUNT, default=8)
    _bench_size_flags(p, image_size=128)
    p.add_argument("--repeats", type=COUNT, default=2)
    p.set_defaults(func=_cmd_bench_train)

    p = bench.add_parser("overhead", help="our model vs transformers' LlavaForConditionalGeneration, same weights")
    _bench_size_flags(p, image_size=192)
    p.add_argument("--llm", default="tiny-llama", help="any LM cvlm build takes (--llm-width / --llm-layers: presets only)")
    _flag(p, "new-tokens", type=COUNT, default=16)
    p.add_argument("--repeats", type=COUNT, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_bench_overhead)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cvlm", description="connector-vlm: one family of VLMs, many connectors.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a checkpoint: --stage align | finetune (see `cvlm train --help`)")
    _add_build(sub)
    _add_eval(sub)
    _add_convert_push(sub)
    _add_study(sub)
    _add_small(sub)
    _add_bench(sub)
    return parser





def main(argv: list[str] | None = None) -> int:
    """Runs a command. A mistake in what the user gave ends in one or two lines naming it and the fix
    (exit status 2), never a traceback; `--debug` (anywhere on the line) shows the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "cvlm"
    _show_notes()
    try:
        if argv[:1] == ["train"]:  # HfArgumentParser owns the flags: every TrainingArguments field works
            from cvlm.trainers.train import main as train_main

            return train_main(argv[1:])
        args = make_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"cvlm {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes a message; --debug shows where
        if debug:
            raise
        print(f"cvlm {command}: error: {describe(error)}", file=sys.stderr)
        return 2


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced after the handler is made)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _show_notes() -> None:
    """The project's notes (what was written where, what was left alone) go to stderr, one line each."""
    log = logging.getLogger("cvlm")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def describe(error: BaseException) -> str:
    """One readable line for an exception: the project's own errors are sentences already; others get
    their type and a pointer to --debug."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError)) and not type(error).__module__.startswith(("torch", "safetensors")):
        return text
    return f"{type(error).__name__}: {text} (run again with --debug to see where)"


if __name__ == "__main__":
    sys.exit(main())
