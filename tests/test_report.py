"""The study report's verdicts follow from the numbers: fixtures with known answers."""

from __future__ import annotations

import itertools
import math

import pytest

from cvlm.report import verdicts

FAMILY = {"mlp": "preserving", "linear": "preserving", "avgpool": "compressing", "cabstractor": "compressing",
          "qformer": "compressing"}


def rows(scores, resolutions=(32, 48, 64), seeds=(0, 1), jitter=0.5, speed=None):
    """scores: connector -> (coarse, fine, reasoning) or connector -> {resolution: (...)}."""
    out = []
    for (connector, value), resolution, seed in itertools.product(scores.items(), resolutions, seeds):
        coarse, fine, reasoning = value[resolution] if isinstance(value, dict) else value
        d = jitter if seed else -jitter
        family = FAMILY[connector]
        samples, prefill = speed[family] if speed else ((100.0, 50.0) if family == "preserving" else (180.0, 20.0))
        out.append({"connector": connector, "family": family, "resolution": resolution, "seed": seed,
                    "scores": {"coarse": coarse + d, "fine": fine + d, "reasoning": reasoning + d},
                    "train_samples_per_s": samples, "prefill_ms": prefill})
    return out


PAPER_LIKE = {"mlp": (90, 80, 70), "linear": (88, 78, 69), "avgpool": (89, 55, 70), "cabstractor": (90, 56, 71),
              "qformer": (85, 40, 60)}


def test_paper_like_numbers_reproduce_the_family_claims():
    result = {v["claim"]: v for v in verdicts(rows(PAPER_LIKE))}
    fine = result["Feature-preserving connectors beat compressing ones on fine-grained perception."]
    assert fine["verdict"] == "reproduced" and "difference +" in fine["evidence"]
    faster = result["Compressing connectors train and answer faster."]
    assert faster["verdict"] == "reproduced" and "1.80x" in faster["evidence"] and "2.50x" in faster["evidence"]
    ranking = result["Average pooling ≈ C-Abstractor > Q-Former (mean over the three granularities)."]
    assert ranking["verdict"] == "reproduced"


def test_comparable_needs_small_gaps_and_agreeing_seeds():
    close = {"mlp": (90, 80, 70), "linear": (90, 80, 70), "avgpool": (89.5, 50, 69.5), "cabstractor": (90, 52, 70),
             "qformer": (89, 40, 70)}
    claim = "Compressing connectors are comparable on coarse-grained perception and reasoning."
    assert {v["claim"]: v["verdict"] for v in verdicts(rows(close))}[claim] == "reproduced"
    far = dict(close, avgpool=(70, 50, 50), cabstractor=(70, 52, 50), qformer=(70, 40, 50))
    assert {v["claim"]: v["verdict"] for v in verdicts(rows(far))}[claim] == "not reproduced"
    noisy = {v["claim"]: v["verdict"] for v in verdicts(rows(close, jitter=6))}
    assert noisy[claim] == "inconclusive"


def test_the_opposite_result_is_not_reproduced_and_noise_is_inconclusive():
    reversed_fine = {k: (c, 100 - f, r) for k, (c, f, r) in PAPER_LIKE.items()}
    result = {v["claim"]: v["verdict"] for v in verdicts(rows(reversed_fine))}
    assert result["Feature-preserving connectors beat compressing ones on fine-grained perception."] == "not reproduced"
    chance = {k: (50, 50, 50) for k in PAPER_LIKE}
    result = {v["claim"]: v["verdict"] for v in verdicts(rows(chance, jitter=8))}
    assert result["Feature-preserving connectors beat compressing ones on fine-grained perception."] == "inconclusive"
    slower = rows(PAPER_LIKE, speed={"preserving": (100.0, 20.0), "compressing": (150.0, 30.0)})
    result = {v["claim"]: v["verdict"] for v in verdicts(slower)}
    assert result["Compressing connectors train and answer faster."] == "not reproduced"


def test_resolution_claim_needs_three_resolutions_and_a_shrinking_gain():
    growing = {k: {32: (50, 50, 50), 48: (70, 70, 70), 64: (75, 75, 75)} for k in PAPER_LIKE}
    result = {v["claim"]: v for v in verdicts(rows(growing))}["Returns diminish with resolution."]
    assert result["verdict"] == "reproduced" and "gains +20.0 then +5.0" in result["evidence"]
    linear_gain = {k: {32: (50, 50, 50), 48: (60, 60, 60), 64: (70, 70, 70)} for k in PAPER_LIKE}
    assert {v["claim"]: v["verdict"] for v in verdicts(rows(linear_gain))}["Returns diminish with resolution."] \
        == "inconclusive"
    two = {v["claim"]: v for v in verdicts(rows(PAPER_LIKE, resolutions=(32, 64)))}["Returns diminish with resolution."]
    assert two["verdict"] == "inconclusive" and two["evidence"] == "needs 3 resolutions, the study has 2"


def test_one_seed_leaves_score_claims_inconclusive():
    result = {v["claim"]: v for v in verdicts(rows(PAPER_LIKE, seeds=(0,)))}
    fine = result["Feature-preserving connectors beat compressing ones on fine-grained perception."]
    assert fine["verdict"] == "inconclusive" and "no margin: one seed has no spread to judge by" in fine["evidence"]
    assert result["Compressing connectors train and answer faster."]["verdict"] == "reproduced"  # no seed spread needed


def test_a_claim_on_a_granularity_no_connector_learnt_is_inconclusive():
    chance = {"coarse": 36.1, "fine": 25.0, "reasoning": 50.0}
    well_learnt = {k: (c, f, r + 15) for k, (c, f, r) in PAPER_LIKE.items()}  # best reasoning 86 vs chance 50
    learnt_all = {v["claim"]: v["verdict"] for v in verdicts(rows(well_learnt), chance)}
    assert learnt_all == {v["claim"]: v["verdict"] for v in verdicts(rows(well_learnt))}  # all learnt: no change
    barely = {v["claim"]: v["verdict"] for v in verdicts(rows(PAPER_LIKE), chance)}  # reasoning 71.5: 21.5 above
    assert barely["Compressing connectors are comparable on coarse-grained perception and reasoning."] == "inconclusive"
    # fine and reasoning at chance for everyone: the small differences there are noise, not findings
    at_chance = {"mlp": (90, 31, 52), "linear": (88, 30, 51), "avgpool": (89, 25, 50), "cabstractor": (90, 24, 50),
                 "qformer": (85, 25, 49)}
    without = {v["claim"]: v for v in verdicts(rows(at_chance))}
    fine_claim = "Feature-preserving connectors beat compressing ones on fine-grained perception."
    assert without[fine_claim]["verdict"] == "reproduced"  # +5.5 points beats the 2-point margin...
    result = {v["claim"]: v for v in verdicts(rows(at_chance), chance)}
    assert result[fine_claim]["verdict"] == "inconclusive"  # ...but 31 vs chance 25 is not learnt
    assert result[fine_claim]["evidence"].startswith(
        "no connector learnt fine (best 31.0 vs chance 25.0, 30 points above chance needed); fine-grained: preserving")
    comparable = result["Compressing connectors are comparable on coarse-grained perception and reasoning."]
    assert comparable["verdict"] == "inconclusive" and "no connector learnt reasoning" in comparable["evidence"]
    assert result["Compressing connectors train and answer faster."]["verdict"] == "reproduced"  # no score involved


# ---- paired comparisons over questions and seeds ------------------------------------------------------------
def question_rows(right_share, seeds=(0, 1), n=40, resolutions=(32,)):
    """Rows whose per-question outcomes give each connector `right_share[connector][granularity]` of its
    questions right (the first questions in order), identically for every seed and resolution."""
    out = []
    for connector, shares in right_share.items():
        for resolution, seed in itertools.product(resolutions, seeds):
            questions = {f"mmbench/{g}-{i}": [g, i < round(shares[g] * n)] for g in ("coarse", "fine", "reasoning")
                         for i in range(n)}
            scores = {g: 100 * shares[g] for g in ("coarse", "fine", "reasoning")}
            out.append({"connector": connector, "family": FAMILY[connector], "resolution": resolution, "seed": seed,
                        "scores": scores, "questions": questions, "train_samples_per_s": 1.0, "prefill_ms": 1.0})
    return out


def test_a_clear_fine_grained_gap_is_reproduced_with_its_interval_and_p_value():
    from cvlm.paired import compare

    rows_ = question_rows({"mlp": {"coarse": 0.9, "fine": 0.9, "reasoning": 0.8},
                           "avgpool": {"coarse": 0.9, "fine": 0.3, "reasoning": 0.8}})
    result = compare([r for r in rows_ if r["family"] == "preserving"], [r for r in rows_ if r["family"] == "compressing"],
                     ("fine",))
    assert result["difference"] == pytest.approx(60.0)
    assert 40 < result["ci95"][0] <= 60 <= result["ci95"][1] < 80 and result["p_value"] < 0.001
    assert result["n_questions"] == 40 and result["n_seeds"] == 2
    verdict = {v["claim"]: v for v in verdicts(rows_)}["Feature-preserving connectors beat compressing ones on "
                                                           "fine-grained perception."]
    assert verdict["verdict"] == "reproduced" and "95 % CI [+" in verdict["evidence"] and "p = 0.000" in verdict["evidence"]
    assert compare(rows_[:2], rows_[2:], ("fine",)) == result  # the same runs give the same numbers


def test_identical_families_are_comparable_and_a_real_gap_is_not():
    same = {"coarse": 0.9, "fine": 0.5, "reasoning": 0.7}
    rows_ = question_rows({"mlp": same, "avgpool": same})
    claim = "Compressing connectors are comparable on coarse-grained perception and reasoning."
    result = {v["claim"]: v for v in verdicts(rows_)}[claim]
    assert result["verdict"] == "reproduced" and "within the ±5-point equivalence margin" in result["evidence"]
    worse = question_rows({"mlp": same, "avgpool": {**same, "reasoning": 0.3}})
    assert {v["claim"]: v for v in verdicts(worse)}[claim]["verdict"] == "not reproduced"


def test_few_questions_leave_a_small_gap_undecided_and_say_how_many_are_needed():
    from cvlm.paired import compare

    rows_ = question_rows({"mlp": {"coarse": 0.5, "fine": 0.6, "reasoning": 0.5},
                           "avgpool": {"coarse": 0.5, "fine": 0.5, "reasoning": 0.5}}, n=10)
    result = compare(rows_[:2], rows_[2:], ("fine",))
    assert result["difference"] == pytest.approx(10.0) and result["ci95"][0] <= 0 < result["ci95"][1]
    # per-question differences: one question in ten at +100, the rest 0 -> spread 30 points
    assert result["questions_for_5_points"] == math.ceil(((1.959964 + 0.841621) * 30 / 5) ** 2)
    verdict = {v["claim"]: v for v in verdicts(rows_)}["Feature-preserving connectors beat compressing ones on "
                                                           "fine-grained perception."]
    assert verdict["verdict"] == "inconclusive" and "a 5-point difference needs 283 questions" in verdict["evidence"]


def test_the_speed_verdict_comes_from_the_quiet_timing_phase():
    from cvlm.report import claim_faster_timed

    def timing(preserving_ms, compressing_ms):
        return [{"label": name, "family": FAMILY[name], "resolution": res, "tokens": 16 if FAMILY[name] == "preserving" else 4,
                 "train_step_ms": (preserving_ms if FAMILY[name] == "preserving" else compressing_ms) * res / 32,
                 "prefill_ms": (preserving_ms if FAMILY[name] == "preserving" else compressing_ms) / 4,
                 "train_flops_per_sample": 1e8, "prefill_flops": 1e7}
                for name in ("mlp", "avgpool") for res in (32, 48, 64)]

    fast = claim_faster_timed(timing(60.0, 30.0))
    assert fast["verdict"] == "reproduced" and "training step: 2.00x in favour of compressing" in fast["evidence"]
    assert claim_faster_timed(timing(30.0, 33.0))["verdict"] == "not reproduced"
    assert claim_faster_timed(timing(30.0, 28.0))["verdict"] == "inconclusive"  # 7 %: inside the margin
    one_family = claim_faster_timed([t for t in timing(60.0, 30.0) if t["family"] == "preserving"])
    assert one_family["verdict"] == "inconclusive" and "nan" not in one_family["evidence"]
    assert one_family["evidence"].startswith("training step: no resolution has runs of both families; prefill: no ")
    rows_ = question_rows({"mlp": {"coarse": 0.9, "fine": 0.9, "reasoning": 0.8},
                           "avgpool": {"coarse": 0.9, "fine": 0.3, "reasoning": 0.8}})
    by_claim = {v["claim"]: v for v in verdicts(rows_, timing=timing(60.0, 30.0))}
    assert "quiet timing phase" in by_claim["Compressing connectors train and answer faster."]["evidence"]


def test_the_resolution_verdict_comes_from_paired_intervals_of_the_two_gains():
    def at(shares_by_resolution, n=40):
        return [row for resolution, share in shares_by_resolution.items()
                for row in question_rows({"mlp": {g: share for g in ("coarse", "fine", "reasoning")}}, n=n,
                                         resolutions=(resolution,))]

    claim = "Returns diminish with resolution."
    shrinking = {v["claim"]: v for v in verdicts(at({32: 0.4, 48: 0.8, 64: 0.85}))}[claim]
    assert shrinking["verdict"] == "reproduced"
    assert shrinking["evidence"].startswith("mean score at 32, 48, 64 px: 40.0, 80.0, 85.0 %; 48 - 32 px: +40.0 points")
    assert "first gain - second gain: +35.0 points" in shrinking["evidence"]
    growing = {v["claim"]: v for v in verdicts(at({32: 0.4, 48: 0.45, 64: 0.9}))}[claim]
    assert growing["verdict"] == "not reproduced"  # the second step gains more than the first
    flat = {v["claim"]: v for v in verdicts(at({32: 0.5, 48: 0.5, 64: 0.5}))}[claim]
    assert flat["verdict"] == "not reproduced"  # no gain to diminish: both steps within the equivalence margin
    few = {v["claim"]: v for v in verdicts(at({32: 0.5, 48: 0.6, 64: 0.65}, n=10))}[claim]
    assert few["verdict"] == "inconclusive"  # 10 questions per granularity: the intervals straddle zero
