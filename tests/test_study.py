"""cvlm study --quick: the whole experiment in miniature, its output folder and its resume."""

from __future__ import annotations

import json

import pytest

from cvlm.study import StudyConfig, parse_connector, run_study


def quick(output, connectors=("mlp", "avgpool")) -> StudyConfig:
    return StudyConfig(output=str(output), connectors=list(connectors), resolutions=[32], seeds=[0], align_steps=6,
                       finetune_steps=12, train_per_subtask=4, test_per_subtask=2, pretrain_encoder_steps=8)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    result = run_study(quick(root, connectors=("mlp", "avgpool", "qformer", "pixel_shuffle:scale=3")))
    return root, result


def test_the_output_folder_holds_results_report_plots_and_checkpoints(study):
    root, result = study
    for name in ("results.json", "report.md", "radar.png", "accuracy_vs_tokens.png", "accuracy_vs_training_time.png",
                 "loss_curves.png", "study_config.json"):
        assert (root / name).stat().st_size > 0, name
    saved = json.loads((root / "results.json").read_text())
    assert [r["connector"] for r in saved["runs"]] == ["mlp", "avgpool", "qformer"]
    for run in saved["runs"]:
        assert {"connector", "family", "tokens", "resolution", "seed", "scores", "train_wall_s", "train_samples_per_s",
                "prefill_ms", "peak_memory_mb", "losses", "subtasks"} <= set(run)
        assert set(run["scores"]) == {"coarse", "fine", "reasoning"}
        assert all(0 <= v <= 100 for v in run["scores"].values())
    # 16 patches at 32 px; the study gives the Q-Former P/4 queries so that it compresses like the pools
    assert {r["connector"]: (r["patches"], r["tokens"]) for r in saved["runs"]} == {
        "mlp": (16, 16), "avgpool": (16, 4), "qformer": (16, 4)}
    assert len(saved["verdicts"]) == 5
    # what needs no picture: chance from the options, and the best model over grey pictures
    assert saved["baselines"]["chance"] == pytest.approx({"coarse": 100 * (1 / 4 + 1 / 3 + 1 / 2) / 3,
                                                          "fine": 25.0, "reasoning": 50.0})
    assert set(saved["baselines"]["blind"]["scores"]) == {"coarse", "fine", "reasoning"}
    assert "| chance (one over the options) |" in (root / "report.md").read_text()
    report = (root / "report.md").read_text()
    assert "Learnt at all?" in report and "Blind baseline within chance ± 5: " in report
    # what makes the from-scratch LM learn is said, and it is the same for every connector
    assert ("Setup, the same for every connector: tiny-clip (width 64, pre-trained 8 steps on synthetic pictures, then "
            "frozen) -> connector -> tiny-llama (from scratch: width 128, 3 layers, weights initialised at standard "
            "deviation 1/sqrt(width), a tokenizer in which each of the benchmark's answers is one token); align 6 steps at "
            "0.001 (connector only), finetune 12 steps at 0.001 (connector + the whole LM), batch 16.") in report
    # per subtask: what it needs from the picture, next to each family's scores
    assert "| object_colour | fine | one cell (the square's colour, among distractors) | " in report
    assert all(v["verdict"] in ("reproduced", "not reproduced", "inconclusive") for v in saved["verdicts"])
    for connector in ("mlp", "avgpool", "qformer"):
        assert (root / "checkpoints" / connector / "config.json").exists()
        assert (root / "checkpoints" / connector / "README.md").exists()
    # every run starts from the one encoder pre-trained (and cached) for its resolution, and a 128-wide LM
    facts = json.loads((root / "encoders" / "tiny-clip-32px" / "cvlm_encoder_pretraining.json").read_text())
    assert facts["steps"] == 8 and facts["width"] == 64 and facts["image_size"] == 32
    config = json.loads((root / "checkpoints" / "mlp" / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == 64 and config["text_config"]["hidden_size"] == 128


def test_a_failing_run_is_reported_and_the_others_go_on(study):
    root, result = study
    assert [f["run"] for f in result["failures"]] == ["pixel_shuffle-scale-3-32px-seed0"]
    assert "does not divide the 4x4 patch grid" in result["failures"][0]["error"]
    report = (root / "report.md").read_text()
    assert "## Failed runs" in report and "pixel_shuffle-scale-3-32px-seed0" in report
    assert "## Verdicts on the paper's claims" in report


def test_a_restarted_study_skips_finished_runs(study):
    root, _ = study
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/run.json")}
    again = run_study(quick(root))
    after = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/run.json")}
    assert before == after and len(again["runs"]) == 2  # the two asked for, both from their run.json


def test_the_default_study_has_every_family_of_the_paper_three_sizes_and_two_seeds():
    from cvlm.modeling import CONNECTORS

    config = StudyConfig()
    assert config.connectors == ["linear", "mlp", "dense_sci", "avgpool", "qformer", "cabstractor", "pixel_shuffle"]
    families = {CONNECTORS[parse_connector(spec)[0]].family for spec in config.connectors}
    assert families == {"preserving", "compressing"}
    assert config.resolutions == [32, 48, 64] and config.seeds == [0, 1]
    # the measured recipe that learns every granularity (README, "What it takes to learn")
    assert (config.llm_layers, config.finetune_steps, config.finetune_lr) == (3, 1000, 1e-3)


def test_a_preset_lm_is_finetuned_whole_and_a_hub_lm_through_lora():
    assert StudyConfig().lm_full is True and StudyConfig().llm_width == 128
    real = StudyConfig(vision="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5")
    assert real.lm_full is False and real.vision_width is None and real.llm_width is None
    assert StudyConfig(lm_full=False).lm_full is False


def test_connector_specs_parse_hyper_parameters_and_refuse_unknown_names():
    assert parse_connector("avgpool:output_grid=2,depth=1") == ("avgpool", {"output_grid": 2, "depth": 1},
                                                                 "avgpool-output_grid-2-depth-1")
    with pytest.raises(ValueError, match="'mlp3' is not a registered connector"):
        parse_connector("mlp3")


def test_loss_curves_can_fall_by_decades_on_a_log_axis(tmp_path):
    from PIL import Image

    from cvlm.plot import line_plot

    steps, losses = [1, 2, 3, 4], [6.0, 0.5, 0.01, 0.0]  # a zero loss has no logarithm: left out, no error
    linear = line_plot(steps, losses, tmp_path / "linear.png", y_label="loss")
    log = line_plot(steps, losses, tmp_path / "log.png", y_label="loss", log_y=True)
    assert Image.open(log).size == Image.open(linear).size == (720, 440)
    assert Image.open(log).tobytes() != Image.open(linear).tobytes()


def test_a_rerun_with_other_settings_redoes_the_runs_and_the_data_it_changed(study):
    root, _ = study
    run_json = root / "runs" / "mlp-32px-seed0" / "run.json"
    old = json.loads(run_json.read_text())
    changed = quick(root, connectors=("mlp",))
    changed.finetune_steps, changed.train_per_subtask = 13, 5
    again = run_study(changed)
    new = json.loads(run_json.read_text())
    assert new["fingerprint"] != old["fingerprint"] and new["losses"]["finetune"][-1][0] == 13
    assert again["runs"][0]["fingerprint"] == new["fingerprint"] and again["config"]["finetune_steps"] == 13
    saved = json.loads((root / "data" / "synthetic-32" / "paths.json").read_text())
    assert saved["settings"]["train_per_subtask"] == 5
    records = json.loads((root / "data" / "synthetic-32" / "train" / "data.json").read_text())
    assert len(records) == 5 * len({r["id"].rsplit("-", 1)[0] for r in records})


def test_a_study_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files this tool did not write"):
        run_study(quick(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_every_connector_of_the_registry_and_its_variants_get_their_own_colour_and_marker(tmp_path):
    from PIL import Image

    from cvlm.modeling import CONNECTORS
    from cvlm.plot import connector_styles, radar

    styles = connector_styles(["avgpool-output_grid-1", "qformer-num_queries-8"])
    assert set(CONNECTORS) <= set(styles) and len(styles) == len(CONNECTORS) + 2
    assert len({s["color"] for s in styles.values()}) == len(styles)
    assert len({s["marker"] for s in styles.values()}) == len(styles)
    rows = [{"connector": c, "family": CONNECTORS[c].family, "resolution": res, "seed": seed,
             "scores": {"coarse": 90.0, "fine": 50.0 + seed, "reasoning": 60.0}} for c in ("mlp", "avgpool")
            for res in (32, 48, 64) for seed in (0, 1)]
    one, three = radar(rows[:2], tmp_path / "one.png"), radar(rows, tmp_path / "three.png")
    assert Image.open(three).size[0] > 2.5 * Image.open(one).size[0]  # one panel per resolution


def test_each_connector_keeps_its_checkpoint_at_the_size_it_answered_best(tmp_path):
    from cvlm.study import _keep_checkpoints

    rows = []
    for connector, scores in {"mlp": {32: 90.0, 48: 70.0, 64: 60.0}, "avgpool": {32: 50.0, 48: 50.0, 64: 40.0}}.items():
        for resolution, score in scores.items():
            for seed in (0, 1):
                folder = tmp_path / "runs" / f"{connector}-{resolution}-{seed}"
                folder.mkdir(parents=True)
                (folder / "which.txt").write_text(f"{resolution}-{seed}")
                rows.append({"connector": connector, "resolution": resolution, "seed": seed, "checkpoint": str(folder),
                             "scores": {"coarse": score, "fine": score - 10 * seed, "reasoning": score}})
    _keep_checkpoints(tmp_path, rows, StudyConfig(output=str(tmp_path), resolutions=[32, 48, 64], seeds=[0, 1]))
    assert (tmp_path / "checkpoints" / "mlp" / "which.txt").read_text() == "32-0"
    assert (tmp_path / "checkpoints" / "avgpool" / "which.txt").read_text() == "48-0"  # a tie: the larger size
