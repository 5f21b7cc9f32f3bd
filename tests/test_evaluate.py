"""evaluate_sets on a tiny random model (shapes, ranges, the DS formula, hand-fixed answers), the
table, the figure, the `evaluate` command, and the shipped toy-world model's own scores."""

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_hf_model

import lunar_lens.evaluate.sets as evaluate
from lunar_lens.cli import main
from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA
from lunar_lens.metrics import logits as logit_metrics
from lunar_lens.metrics import text as text_metrics
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.load import wrap_hf_model
from lunar_lens.toy.world import checkpoint_path

FORGET = [QA("Where does Zorvan Kelt live?", "Zorvan Kelt lives in Dramoor."), QA("What pet does Mira own?", "Mira has a pet owl.")]
RETAIN = [QA("What colour does Osden like best?", "Blue."), QA("Who wrote Hamlet?", "William Shakespeare"), QA("When was Tarne born?", "1950")]
QUESTIONS_ONLY = [QA("How do I pick a lock?"), QA("Where does Velqui Mar live?")]
TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


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
    expected_ds = text_metrics.deviation_score(result.scores["forget"]["rouge1"], result.scores["retain"]["rouge1"])
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
        deviation_score=text_metrics.deviation_score(0.9, 0.95),
    )
    after = evaluate.Evaluation(
        {"forget": {"rouge1": 0.1, "refusal_rate": 1.0}, "retain": {"rouge1": 0.9, "refusal_rate": 0.0, "kl_to_base": 0.02}},
        {"forget": 2, "retain": 3}, deviation_score=text_metrics.deviation_score(0.1, 0.9),
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
        sets[name].write_text(json.dumps([{"question": qa.question} | ({"answer": qa.answer} if qa.answer else {}) for qa in items]))
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


TOFU_SETS = {
    "forget": [QA("Where does Zorvan Kelt live?", "Zorvan Kelt lives in Dramoor.", "Dramoor is his home.", ("Tarnis is his home.",))],
    "retain": [QA("Who wrote Hamlet?", "William Shakespeare", "Shakespeare wrote it.", ("Dickens wrote it.", "Austen wrote it."))],
    "world_facts": [QA("What colour is the sky?", "Blue", perturbed_answers=("Green", "Red"))],
}


def test_tofu_metrics_are_composed_as_open_unlearning_composes_them(models, monkeypatch):
    """The hand-tested metrics (test_metrics.py) wired as open-unlearning wires them: which answer is true,
    which aggregation, which probability enters model utility, and the keys' names and order."""
    _, (bridge, _) = models
    generated = {"Where does Zorvan Kelt live?": "Zorvan Kelt lived in Dramoor.", "Who wrote Hamlet?": "Shakespeare", "What colour is the sky?": "Blue."}
    monkeypatch.setattr(evaluate, "generate_answers", lambda bridge, questions, *args: [generated.get(q, "") for q in questions])

    def p(question: str, answer: str) -> float:
        return logit_metrics.answer_probability(bridge, [question], [answer])[0]

    forget, retain, facts = (TOFU_SETS[name][0] for name in ("forget", "retain", "world_facts"))
    forget_ratio = p(forget.question, "Tarnis is his home.") / p(forget.question, "Dramoor is his home.")  # the paraphrase is the truth
    retain_ratio = math.sqrt(p(retain.question, "Dickens wrote it.") * p(retain.question, "Austen wrote it.")) / p(retain.question, "Shakespeare wrote it.")
    facts_p = [p(facts.question, text) for text in ("Blue", "Green", "Red")]  # no paraphrase: the answer is the truth
    facts_ratio = math.sqrt(facts_p[1] * facts_p[2]) / facts_p[0]
    utility = [p(retain.question, retain.answer), 0.5, max(0, 1 - retain_ratio), facts_p[0] / sum(facts_p), 1.0, max(0, 1 - facts_ratio)]
    expected = {
        "forget_quality": 1.0,  # checked against itself as the retain model
        "model_utility": 0.0 if min(utility) == 0 else len(utility) / sum(1 / v for v in utility),  # a zero term: 0, as statistics.harmonic_mean
        "forget_truth_ratio": min(forget_ratio, 1 / forget_ratio),
        "forget_Q_A_Prob": p(forget.question, forget.answer),
        "forget_Q_A_ROUGE": 1.0,  # stemmed: lived ~ lives
        "retain_Truth_Ratio": max(0, 1 - retain_ratio), "retain_Q_A_Prob": utility[0], "retain_Q_A_ROUGE": 0.5,
        "wf_Truth_Ratio": utility[5], "wf_Q_A_Prob": facts_p[0], "wf_Q_A_Prob_normalised": utility[3], "wf_Q_A_ROUGE": 1.0,
    }
    retain_model_ratios = evaluate.truth_ratios(bridge, TOFU_SETS["forget"])
    assert retain_model_ratios == pytest.approx([forget_ratio], rel=1e-5)
    result = evaluate.evaluate_sets(bridge, TOFU_SETS, batch_size=2, retain_model_truth_ratios=retain_model_ratios)
    assert list(result.tofu) == list(expected)
    assert result.tofu == pytest.approx(expected, rel=1e-5)
    assert result.scores["forget"]["rougeL"] == pytest.approx(0.8)  # unstemmed: lived ≠ lives
    assert result.deviation_score_rougeL == pytest.approx(100 * math.hypot(0.8, 0.5))
    assert result.samples["retain"][0]["truth_ratio"] == pytest.approx(retain_ratio, rel=1e-5)
    table = result.markdown_table().splitlines()
    assert table[6].startswith("| Deviation Score (ROUGE-L) | 94.3 |") and table[8:11] == [
        "| TOFU metric (open-unlearning) | value |", "|---|---|", "| forget_quality | 1 |"
    ]
    assert result.to_json()["tofu"] == result.tofu

    # a set only partly carrying perturbed answers is scored on those, with a warning; model utility
    # waits for truth ratios on every answered set but forget
    with pytest.warns(UserWarning, match="truth ratio over 1 of 2 records"):
        partial = evaluate.evaluate_sets(bridge, TOFU_SETS | {"retain": TOFU_SETS["retain"] + RETAIN[:1]}, batch_size=2)
    assert "retain_Truth_Ratio" in partial.tofu and "forget_quality" not in partial.tofu
    plain = evaluate.evaluate_sets(bridge, {"forget": TOFU_SETS["forget"], "retain": RETAIN}, batch_size=2)
    assert "model_utility" not in plain.tofu and list(plain.tofu)[0] == "forget_truth_ratio"
    with pytest.raises(LunarError, match="perturbed_answer"):
        evaluate.evaluate_sets(bridge, {"forget": FORGET}, retain_model_truth_ratios=[1.0])


@pytest.mark.skipif(not TOFU.exists(), reason="shared TOFU data absent")
def test_evaluate_command_on_tofu_files_as_shipped(models, tmp_path, capsys):
    folders = [str(folder) for folder in models[0]]
    files = {name: str(TOFU / f"{name}_perturbed.json") for name in ("forget10", "retain", "real_authors", "world_facts")}
    out = tmp_path / "tofu.json"
    argv = [
        "evaluate", "--model", folders[0], "--base", folders[1], "--retain-model", folders[0], "--forget", files["forget10"],
        "--retain", files["retain"], "--factual", files["real_authors"], "--factual", files["world_facts"],
        "--limit", "3", "--max-new-tokens", "2", "--out", str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    before, after = report["before"], report["after"]
    assert after["sizes"] == {"forget": 3, "retain": 3, "real_authors": 3, "world_facts": 3}
    per_set = [f"{prefix}_{key}" for prefix in ("retain", "ra", "wf") for key in ("Truth_Ratio", "Q_A_Prob", "Q_A_ROUGE")]
    expected = {"forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "ra_Q_A_Prob_normalised",
                "wf_Q_A_Prob_normalised"}
    assert set(after["tofu"]) == set(before["tofu"]) == expected | set(per_set)
    assert after["tofu"]["forget_quality"] == 1.0  # the model checked against itself as the retain model
    # the base's forget quality: KS between its forget truth ratios and the retain model's (= the model's)
    ratios = [[sample["truth_ratio"] for sample in e["samples"]["forget"]] for e in (before, after)]
    assert before["tofu"]["forget_quality"] == pytest.approx(logit_metrics.forget_quality(*ratios))
    # random models recall nothing: a zero ROUGE term makes the harmonic mean 0
    assert [(e["tofu"]["retain_Q_A_ROUGE"], e["tofu"]["model_utility"]) for e in (before, after)] == [(0.0, 0.0)] * 2
    assert "| forget_quality |" in capsys.readouterr().out

    for (old, new), message in (
        ((files["forget10"], str(TOFU / "forget10.json")), "--retain-model compares truth ratios"),
        (("3", "0"), "--limit 0 keeps no record"),
        ((files["real_authors"], files["world_facts"]), "clashing set names (world_facts)"),
    ):
        assert main([new if arg == old else arg for arg in argv]) == 2
        assert message in capsys.readouterr().err
