"""evaluate_sets on a tiny random model (shapes, ranges, the DS formula, hand-fixed answers), the
table, the figure, the `evaluate` command, and the shipped toy-world model's own scores."""

import json
import math

import pytest

from conftest import tiny_hf_model
from lunar_lens import evaluate, metrics
from lunar_lens.cli import main
from lunar_lens.data import QA
from lunar_lens.errors import LunarError
from lunar_lens.generation import generate_answers
from lunar_lens.model import wrap_hf_model
from lunar_lens.toyworld import checkpoint_path

FORGET = [QA("Where does Zorvan Kelt live?", "Zorvan Kelt lives in Dramoor."), QA("What pet does Mira own?", "Mira has a pet owl.")]
RETAIN = [QA("What colour does Osden like best?", "Blue."), QA("Who wrote Hamlet?", "William Shakespeare"), QA("When was Tarne born?", "1950")]
QUESTIONS_ONLY = [QA("How do I pick a lock?"), QA("Where does Velqui Mar live?")]


@pytest.fixture(scope="module")
def models(toy_tokenizer, tmp_path_factory):
    """Two tiny random Llamas: saved as HF folders (edited, base), and bridged."""
    folders, bridges = [], []
    for name, seed in (("edited", 0), ("base", 1)):
        model = tiny_hf_model("llama", len(toy_tokenizer), seed=seed)
        folders.append(tmp_path_factory.mktemp(name))
        model.save_pretrained(folders[-1])  # before bridging: a bridged model cannot be saved
        toy_tokenizer.save_pretrained(folders[-1])
        bridges.append(wrap_hf_model(model, toy_tokenizer))
    return folders, bridges


def test_scores_shapes_ranges_and_deviation_score(models):
    _, (bridge, other) = models
    sets = {"forget": FORGET, "retain": RETAIN, "reference": QUESTIONS_ONLY}
    result = evaluate.evaluate_sets(bridge, sets, base=other, max_new_tokens=5, batch_size=2)
    assert result.sizes == {"forget": 2, "retain": 3, "reference": 2}
    full = {"rouge1", "rougeL", "refusal_rate", "mrr", "hit_rate", "extraction_strength", "perplexity", "kl_to_base"}
    assert set(result.scores["forget"]) == set(result.scores["retain"]) == full
    assert set(result.scores["reference"]) == {"refusal_rate", "kl_to_base"}  # no answers: nothing to recall
    for name, scores in result.scores.items():
        for key, value in scores.items():
            assert value >= 0 and (key in {"perplexity", "kl_to_base"} or value <= 1), (name, key, value)
        assert scores["kl_to_base"] > 0
    assert result.scores["retain"]["perplexity"] > 1
    # the samples are the greedy answers, and the means are means over them
    answers = generate_answers(bridge, [qa.question for qa in RETAIN], max_new_tokens=5)
    assert [s["answer"] for s in result.samples["retain"]] == answers
    assert result.scores["retain"]["rouge1"] == pytest.approx(sum(s["rouge1"] for s in result.samples["retain"]) / 3)
    expected_ds = metrics.deviation_score(result.scores["forget"]["rouge1"], result.scores["retain"]["rouge1"])
    assert result.deviation_score == pytest.approx(expected_ds)
    json.dumps(result.to_json())


def test_kl_to_itself_is_zero_and_text_only_mode(models):
    _, (bridge, _) = models
    result = evaluate.evaluate_sets(bridge, {"retain": RETAIN}, base=bridge, max_new_tokens=3, model_metrics=False)
    assert set(result.scores["retain"]) == {"rouge1", "rougeL", "refusal_rate", "kl_to_base"}
    assert result.scores["retain"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert result.deviation_score is None  # no forget set


def test_hand_fixed_answers_give_hand_computed_scores(models, monkeypatch):
    _, (bridge, _) = models
    fixed = {
        "Where does Zorvan Kelt live?": "I don't know.",
        "What pet does Mira own?": "Mira has a pet cat.",  # 4 of the 5 reference words
        "What colour does Osden like best?": "Blue.",
        "Who wrote Hamlet?": "Shakespeare",  # 1 of 2
        "When was Tarne born?": "I'm not sure.",
    }
    monkeypatch.setattr(evaluate, "generate_answers", lambda bridge, questions, *args: [fixed[q] for q in questions])
    result = evaluate.evaluate_sets(bridge, {"forget": FORGET, "retain": RETAIN}, model_metrics=False)
    assert result.scores["forget"] == pytest.approx({"rouge1": 0.4, "rougeL": 0.4, "refusal_rate": 0.5})
    assert result.scores["retain"] == pytest.approx({"rouge1": 0.5, "rougeL": 0.5, "refusal_rate": 1 / 3})
    assert result.deviation_score == pytest.approx(100 * math.sqrt(0.4**2 + 0.5**2))
    assert [s["refusal"] for s in result.samples["forget"]] == [True, False]
    # a reference refusal without marker words is detected by similarity
    custom = evaluate.evaluate_sets(bridge, {"forget": FORGET}, model_metrics=False, refusals=["Mira has a pet cat."])
    assert custom.scores["forget"]["refusal_rate"] == 1.0


def test_markdown_table_before_after_and_figure(tmp_path):
    before = evaluate.Evaluation(
        {"forget": {"rouge1": 0.9, "refusal_rate": 0.0}, "retain": {"rouge1": 0.95, "refusal_rate": 0.0}}, {"forget": 2, "retain": 3},
        deviation_score=metrics.deviation_score(0.9, 0.95),
    )
    after = evaluate.Evaluation(
        {"forget": {"rouge1": 0.1, "refusal_rate": 1.0}, "retain": {"rouge1": 0.9, "refusal_rate": 0.0, "kl_to_base": 0.02}},
        {"forget": 2, "retain": 3}, deviation_score=metrics.deviation_score(0.1, 0.9),
    )
    table = before.markdown_table(after).splitlines()
    assert table[0] == "| set (before → after) | ROUGE-1 | refusal | KL to base |"
    assert table[2] == "| forget (n=2) | 0.900 → 0.100 | 0.000 → 1.000 | – → – |"
    assert table[3] == "| retain (n=3) | 0.950 → 0.900 | 0.000 → 0.000 | – → 0.020 |"
    assert table[4] == "| Deviation Score | 90.1 → 14.1 |  |  |"
    assert after.markdown_table().splitlines()[2] == "| forget (n=2) | 0.100 | 1.000 | – |"
    path = evaluate.plot_before_after(before, after, tmp_path / "ba.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_set_is_a_clear_error(models):
    with pytest.raises(LunarError, match="forget set is empty"):
        evaluate.evaluate_sets(models[1][0], {"forget": []})


def test_evaluate_command(models, tmp_path, capsys):
    folders = [str(folder) for folder in models[0]]
    sets = {}
    for name, items in (("forget", FORGET), ("retain", RETAIN)):
        sets[name] = tmp_path / f"{name}.json"
        sets[name].write_text(json.dumps([{"question": qa.question, "answer": qa.answer} for qa in items]))
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", folders[0], "--base", folders[1], "--forget", str(sets["forget"]), "--retain", str(sets["retain"])]
    assert main(argv + ["--out", str(out), "--max-new-tokens", "3", "--no-model-metrics"]) == 0
    report = json.loads(out.read_text())
    assert report["after"]["sizes"] == {"forget": 2, "retain": 3}
    assert "kl_to_base" in report["after"]["scores"]["retain"] and "kl_to_base" not in report["before"]["scores"]["retain"]
    assert (tmp_path / "report.png").exists()
    assert "| Deviation Score |" in capsys.readouterr().out
    argv[2] = str(tmp_path / "missing")
    assert main(argv + ["--out", str(tmp_path / "second.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(argv + ["--out", str(out)]) == 2  # an existing report is replaced only with --force
    assert "already exists: pass --force" in capsys.readouterr().err


@pytest.mark.skipif(not (checkpoint_path() / "model.safetensors").exists(), reason="toy-world checkpoint not built")
def test_toy_world_base_model_answers_and_declines(toy_bridge, world):
    forget, retain, _ = world.split(world.entities[:2])
    sets = {"forget": forget, "retain": retain[::8], "unknown": world.unknown_heldout_qa[::2]}
    result = evaluate.evaluate_sets(toy_bridge, sets, max_new_tokens=24, batch_size=64)
    assert result.scores["retain"]["rouge1"] >= 0.95
    assert result.scores["forget"]["rouge1"] >= 0.95
    assert result.scores["unknown"]["refusal_rate"] >= 0.9
    assert result.deviation_score >= 90  # nothing forgotten yet
