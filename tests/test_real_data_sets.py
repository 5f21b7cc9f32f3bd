"""The sets experiments/finetune.py builds from ../shared's TOFU and PISTOL files (skipped without them)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
finetune = pytest.importorskip("finetune")
pytestmark = pytest.mark.skipif(not finetune.SHARED.exists(), reason="shared data folder absent")


def questions(items):
    return {qa.question for qa in items}


def test_tofu_subsample_keeps_nested_forget_splits_and_disjoint_retain_sets():
    args = finetune.build_parser().parse_args(["tofu", "--out", "unused"])
    sets = finetune.tofu_sets(args)
    assert [len(sets[f"forget{n}"]) for n in ("01", "05", "10")] == [20, 100, 200]  # 10 questions × 2 / 10 / 20 authors
    assert questions(sets["forget01"]) < questions(sets["forget05"]) < questions(sets["forget10"])
    assert len(sets["train_target"]) == 400  # + the first 20 other authors, 10 questions each
    for n in ("01", "05", "10"):
        forget, retain = questions(sets[f"forget{n}"]), questions(sets[f"retain{n}"])
        assert not forget & retain and forget | retain == questions(sets["train_target"])
    assert len(sets["factual"]) == 217  # world facts + real authors


def test_pistol_forgets_one_edge_and_references_are_held_out():
    args = finetune.build_parser().parse_args(["pistol", "--out", "unused"])
    sets = finetune.pistol_sets(args)
    assert (len(sets["forget"]), len(sets["retain"]), len(sets["factual"])) == (20, 380, 169)
    assert not questions(sets["forget"]) & questions(sets["retain"])
    trained, held_out = finetune.reference_sets(args.reference, ["I can't say.", "No idea."], seed=0)
    assert len(held_out) == finetune.HELD_OUT_REFERENCE and not questions(trained) & questions(held_out)
    assert {qa.answer for qa in trained + held_out} == {"I can't say.", "No idea."}  # drawn at random: varied refusals


def test_tofu_retain_model_option_and_perturbed_evaluation_sets(tmp_path):
    """finetune.py --without SPLIT (TOFU's retain model) is part of the run's data options, and is absent
    otherwise (run folders trained before it still match); run_tofu's evaluation sets carry TOFU's
    perturbed answers for every question of the subsample, the answers unchanged."""
    import run_tofu

    from lunar_lens.data.qa import load_qa

    parser = finetune.build_parser()
    assert finetune.data_options(parser.parse_args(["tofu", "--out", "x", "--without", "forget05"]))["without"] == "forget05"
    assert "without" not in finetune.data_options(parser.parse_args(["tofu", "--out", "x"]))
    sets = finetune.tofu_sets(parser.parse_args(["tofu", "--out", "unused"]))
    for name in ("forget01", "retain01"):
        finetune.write_set(tmp_path / "sets" / f"{name}.json", sets[name])
    request = run_tofu.request(tmp_path / "sets", "forget01")
    for kept in (request.forget, request.retain):
        scored = load_qa(run_tofu.with_perturbed(kept), require_answers=True)
        assert [(qa.question, qa.answer) for qa in scored] == [(qa.question, qa.answer) for qa in load_qa(kept)]
        assert all(qa.paraphrased_answer and len(qa.perturbed_answers) == 5 for qa in scored)
    assert request.evaluation[request.evaluation.index("--retain-model") + 1] == str(tmp_path / "retain_model_forget01" / "model")
