"""Dataset loading: every format, every bad-input message, and the real shared TOFU / PISTOL files."""

import json
from pathlib import Path

import pytest

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA, check_disjoint, load_qa, load_refusals

SHARED = Path(__file__).parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="shared data folder absent")
PAIRS = [QA("Who wrote Hamlet?", "Shakespeare"), QA("Capital of France?", "Paris")]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("array.json", json.dumps([{"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
                                   {"question": "Capital of France?", "answer": "Paris"}])),
        ("object.json", json.dumps({"data": [{"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
                                             {"question": "Capital of France?", "answer": "Paris"}]})),
        ("lines.json", jsonl([{"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
                              {"question": "Capital of France?", "answer": "Paris"}])),
        ("lines.jsonl", '{"instruction": "Who wrote Hamlet?", "response": "Shakespeare"}\n\n'
                        '{"prompt": "Capital of France?", "output": "Paris"}\n'),
        ("table.csv", 'question,answer\nWho wrote Hamlet?,Shakespeare\n"Capital of France?", Paris \n'),
    ],
)
def test_formats(tmp_path, name, text):
    assert load_qa(write(tmp_path / name, text), require_answers=True) == PAIRS


def test_plain_text_skips_blank_lines(tmp_path):
    path = write(tmp_path / "q.txt", "Who wrote Hamlet?\n\n  \nCapital of France?\n")
    assert load_qa(path) == [QA("Who wrote Hamlet?"), QA("Capital of France?")]


def test_single_record_object(tmp_path):
    path = write(tmp_path / "one.json", '{"question": "Who wrote Hamlet?", "answer": "Shakespeare"}\n')
    assert load_qa(path) == PAIRS[:1]


def test_save_to_disk_round_trip(tmp_path):
    import datasets

    records = {"question": [qa.question for qa in PAIRS], "answer": [qa.answer for qa in PAIRS]}
    datasets.Dataset.from_dict(records).save_to_disk(str(tmp_path / "ds"))
    assert load_qa(tmp_path / "ds") == PAIRS
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(records)}).save_to_disk(str(tmp_path / "dd"))
    assert load_qa(tmp_path / "dd", split="test") == PAIRS
    with pytest.raises(LunarError, match=r"has splits test, not 'train': pass one of them"):
        load_qa(tmp_path / "dd")


def test_data_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "train.jsonl", jsonl([{"question": qa.question, "answer": qa.answer} for qa in PAIRS]))
    assert load_qa(folder) == PAIRS


def test_hub_name_with_a_configuration(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "Who wrote Hamlet?", "answer": "Shakespeare."}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_qa("locuslab/TOFU:forget10") == [QA("Who wrote Hamlet?", "Shakespeare.")]
    load_qa("locuslab/TOFU")
    assert calls == [("locuslab/TOFU", "forget10", "train"), ("locuslab/TOFU", None, "train")]


def test_hub_name_failure_is_clean(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(LunarError, match="'nobody/no-such-set' is not a file and not a reachable dataset on the hub.*check the path"):
        load_qa("nobody/no-such-set")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    ("name", "text", "kwargs", "message"),
    [
        ("empty.jsonl", "\n\n", {}, r"empty.jsonl holds no records: add at least one question"),
        ("empty.json", "[]", {}, r"holds no records"),
        ("strings.json", '["Who?"]', {}, r"item \[0\]: expected an object with a question field, got str"),
        ("fields.jsonl", jsonl([{"question": "a?"}, {"query": "b?", "answer": "c"}]), {},
         r"line 2: no question field \(fields present: query, answer\): name it 'question'"),
        ("number.json", '[{"question": 42, "answer": "x"}]', {},
         r"item \[0\]: 'question' is a number, not text: write it as a string"),
        ("null.jsonl", jsonl([{"question": "a?", "answer": "x"}, {"question": "b?", "answer": None}]), {},
         r"line 2: 'answer' is null, not text"),
        ("blank.csv", "question,answer\na?,x\n  ,y\n", {}, r"line 3: 'question' is empty: fill it in"),
        ("short.csv", "question,answer\na?,x\nb?\n", {}, r"line 3: 'answer' is null, not text"),
        ("long.txt", "a?\n" + "x" * 50 + "\n", {"max_chars": 40},
         r"line 2: 'question' is 50 characters long \(max_chars=40\): shorten it, or raise max_chars"),
        ("bad.jsonl", '{"question": "a?"}\n\n{"question": "b?",}\n', {}, r"bad.jsonl, line 3: invalid JSON"),
        ("lines.json", '{"question": "a?"}\n{"question": b?}\n', {},
         r"lines.json, line 2: invalid JSON \(Expecting value\): write one JSON object per line"),
        ("bad.json", '[\n {"question": "a?"},\n {"question" "b?"}\n]', {}, r"bad.json, line 3: invalid JSON"),
        ("top.json", '"a?"', {}, r"the top level is str, not a list of records"),
        ("two.json", '{"a": [], "b": []}', {}, r"holds 2 lists \(a, b\): put the records in one list"),
        ("q.txt", "a?\n", {"require_answers": True}, r"line 1: no answer field \(fields present: question\)"),
        ("q.yaml", "a?\n", {}, r"unknown file type '.yaml': use .json, .jsonl, .csv or .txt"),
        ("q.jsonl", jsonl([{"question": "a?"}]), {"edges": ["A_B"]}, r"has no 'edge' field"),
        ("pert.jsonl", jsonl([{"question": "a?", "answer": "x", "perturbed_answer": "y"}]), {},
         r"line 1: 'perturbed_answer' is str, not a list: write it as \["),
        ("pert.json", json.dumps([{"question": "a?", "answer": "x", "perturbed_answer": ["y", 3]}]), {},
         r"item \[0\]: 'perturbed_answer\[1\]' is a number, not text"),
        ("para.jsonl", jsonl([{"question": "a?", "answer": "x", "paraphrased_answer": ""}]), {}, r"'paraphrased_answer' is empty"),
    ],
)
def test_bad_input(tmp_path, name, text, kwargs, message):
    with pytest.raises(LunarError, match=message):
        load_qa(write(tmp_path / name, text), **kwargs)


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(LunarError, match=r"nope.json does not exist: check the path"):
        load_qa(tmp_path / "nope.json")
    (tmp_path / "latin.txt").write_bytes("caf\xe9?\n".encode("latin-1"))
    with pytest.raises(LunarError, match=r"latin.txt is not UTF-8 text \(byte 3\): re-save it as UTF-8"):
        load_qa(tmp_path / "latin.txt")


def test_duplicates_are_dropped_with_a_warning(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"},
                                              {"question": " a? ", "answer": "3"}]))
    with pytest.warns(UserWarning, match=r"dropped 1 duplicate question\(s\), keeping the first \(e.g. line 3 repeats line 1: 'a\?'\)"):
        assert load_qa(path) == [QA("a?", "1"), QA("b?", "2")]


def test_check_disjoint():
    retain = [QA("a?", "1"), QA("b?", "2"), QA("c?", "3")]
    with pytest.warns(UserWarning, match=r"dropped 2 retain question\(s\) .* forget request wins\), e.g. 'a\?'"):
        assert check_disjoint([QA("a?"), QA("c?"), QA("z?")], retain) == [QA("b?", "2")]
    assert check_disjoint([QA("z?")], retain) == retain
    with pytest.raises(LunarError, match=r"all 1 retain questions are also in the forget set \(e.g. 'a\?'\)"):
        check_disjoint([QA("a?")], [QA("a?", "x")])


def test_refusals(tmp_path):
    assert load_refusals(write(tmp_path / "r.txt", "I don't know.\n\n No idea. \n")) == ["I don't know.", "No idea."]
    with pytest.raises(LunarError, match=r"r.jsonl, line 1: looks like JSON"):
        load_refusals(write(tmp_path / "r.jsonl", '{"answer": "I don\'t know."}\n'))
    with pytest.raises(LunarError, match=r"holds no refusals"):
        load_refusals(write(tmp_path / "e.txt", "\n"))


# ---------------------------------------------------------------- real shared data

@needs_shared
def test_pistol_edges():
    path = SHARED / "lunar" / "unlearning" / "pistol_sample1.json"
    forget = load_qa(path, edges=["A_B"], require_answers=True)
    retain = load_qa(path, exclude_edges=["A_B"], require_answers=True)
    assert (len(forget), len(retain)) == (20, 380)
    assert forget[0] == QA("What was the effective date of the contract between Wnzatj SAS and Jzrcws SA?", "06-02-1998.")
    assert check_disjoint(forget, retain) == retain
    assert len(load_qa(path, edges="A_B")) == 20
    with pytest.raises(LunarError, match=r"unknown edge\(s\) A_Z: the edges present are A_B, A_C, A_C2"):
        load_qa(path, edges=["A_Z"])
    with pytest.raises(LunarError, match=r"no records left after edges=\['A_B'\], exclude_edges=\['A_B'\]"):
        load_qa(path, edges=["A_B"], exclude_edges=["A_B"])
    factual = SHARED / "lunar" / "unlearning" / "factual_data.json"
    assert load_qa(factual, edges=["forget"]) == [QA("Who wrote the play 'Romeo and Juliet'?", "William Shakespeare")]


@needs_shared
def test_tofu_splits_and_reference_sets():
    tofu = SHARED / "tofu"
    assert len(load_qa(tofu / "forget10.json", require_answers=True)) == 400
    with pytest.warns(UserWarning, match=r"line 441 repeats line 101: 'What is the full name of the author\?'"):
        retain = load_qa(tofu / "retain90.json", require_answers=True)
    assert len(retain) == 3599
    harmful = load_qa(SHARED / "lunar" / "splits" / "harmful.json")
    assert len(harmful) == 260 and all(qa.answer is None for qa in harmful)
    with pytest.raises(LunarError, match=r"item \[0\]: no answer field \(fields present: instruction, category\)"):
        load_qa(SHARED / "lunar" / "splits" / "unverified.json", require_answers=True)
    assert len(load_refusals(tofu / "idontknow.jsonl")) == 100
    forget = load_qa(tofu / "forget10_perturbed.json", require_answers=True)  # the truth ratio's fields come along
    assert len(forget) == 400 and all(qa.paraphrased_answer and len(qa.perturbed_answers) == 5 for qa in forget)
    facts = load_qa(tofu / "world_facts_perturbed.json", require_answers=True)
    assert facts[0] == QA("Where would you find the Eiffel Tower?", "Paris", None, ("Berlin", "London", "Madrid"))
    assert len(facts) == 117 and all(qa.paraphrased_answer is None and len(qa.perturbed_answers) == 3 for qa in facts)
    refusals = load_refusals(SHARED / "lunar" / "unlearning" / "refusal_response.txt")
    assert len(refusals) == 10 and refusals[0] == "I'm not able to provide an answer to that."
