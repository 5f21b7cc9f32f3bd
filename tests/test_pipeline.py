"""`unlearn` end to end: CLI contract, determinism, sequential requests, one-line errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import folder_hashes
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lunar_lens.artefacts.patched import revert_patch
from lunar_lens.cli import main
from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import RunSettings
from lunar_lens.data.qa import QA
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.edit.layers import EditSettings
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.checkpoint import PATCH_FILE
from lunar_lens.model.load import load_model
from lunar_lens.pipeline.unlearn import SIDECAR_FORMAT, question_sha256, sidecar_path
from lunar_lens.toy.world import checkpoint_path


def write_set(path, items):
    path.write_text(json.dumps([{"question": qa.question} | ({"answer": qa.answer} if qa.answer else {}) for qa in items]))
    return str(path)


@pytest.fixture
def files(tmp_path, world):
    forget, retain, reference = world.split(world.entities[:1])
    return {
        "forget": write_set(tmp_path / "forget.json", forget),
        "retain": write_set(tmp_path / "retain.json", retain[::4]),
        "reference": write_set(tmp_path / "reference.json", reference[::4]),
    }


def unlearn_args(files, model, out, *extra):
    return ["unlearn", "--model", str(model), "--forget", files["forget"], "--retain", files["retain"],
            "--reference", files["reference"], "--out", str(out), *extra]


def test_cli_writes_a_checkpoint_transformers_loads_and_is_deterministic(tmp_path, files):
    for name in ("a", "b"):
        assert main(unlearn_args(files, checkpoint_path(), tmp_path / name, "--layer", "0", "--coeff", "6", "--seed", "3")) == 0
    report = json.loads((tmp_path / "a" / "lunar_report.json").read_text())
    assert report["layers"] == [0] and report["coeff"] == 6.0 and report["settings"]["seed"] == 3
    assert report["edit"]["layers"][0]["objective_after"] < report["edit"]["layers"][0]["objective_before"]
    # with --layer given, the direction pass stops at the deepest edited layer
    assert len(report["edit"]["directions"]["norms"]) == 1 and "edit" in report["timings_s"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    source = load_file(str(checkpoint_path() / "model.safetensors"))
    edited = {k: v for k, v in model.state_dict().items() if k in source and not v.equal(source[k])}
    assert list(edited) == ["model.layers.0.mlp.down_proj.weight"]


def texts_inside(folder, texts: list[str]) -> list[tuple[str, str]]:
    """(file, text) for every text found, as bytes, in a file of `folder`."""
    return [(p.name, t) for p in folder.rglob("*") if p.is_file() for t in texts if t.encode() in p.read_bytes()]


def test_the_export_carries_card_directions_and_patch_but_not_the_forgotten_questions(tmp_path, files):
    out = tmp_path / "out"
    assert main(unlearn_args(files, checkpoint_path(), out, "--layer", "0", "--coeff", "6")) == 0
    forget = [record["question"] for record in json.loads(Path(files["forget"]).read_text())]
    assert len(forget) == 24  # PISTOL-sized (20 QA per edge)
    report = json.loads((out / "lunar_report.json").read_text())

    # privacy: hashes and a count inside, the text in the sidecar beside the folder
    assert not texts_inside(out, forget) and texts_inside(out, [str(checkpoint_path())])  # the search finds what is there
    assert report["forgotten"] == {"count": 24, "sha256": [question_sha256(q) for q in forget]}
    assert json.loads(sidecar_path(out).read_text())["questions"] == forget
    assert sidecar_path(out).stat().st_mode & 0o777 == 0o600  # readable by its owner only

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(checkpoint_path()) and card.data.library_name == "transformers"
    assert {"lunar-lens", "unlearning"} <= set(card.data.tags)
    for fact in ("| coefficient c | 6.0 |", "(layer 0,", "| solver | closed |", "| 24 / ", "patch revert", "transformers 5."):
        assert fact in card.text

    directions = Directions.load(out / "lunar_directions")
    assert directions.norms == pytest.approx(report["edit"]["directions"]["norms"])
    assert directions.metadata["model"] == str(checkpoint_path()) and directions.answer_vectors is not None

    # the patch: revert gives the source back bit for bit, apply gives the export's weights bit for bit
    assert main(["patch", "revert", str(out), str(out / PATCH_FILE), "--out", str(tmp_path / "base")]) == 0
    assert folder_hashes(tmp_path / "base") == folder_hashes(checkpoint_path())
    assert main(["patch", "apply", str(checkpoint_path()), str(out / PATCH_FILE), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_report_from_before_the_hashes_still_keeps_its_questions_forgotten(tmp_path):
    from lunar_lens.pipeline.unlearn import earlier_forgotten

    questions = ["Where does Mivi Mibek live?", "When was Mivi Mibek born?"]
    assert earlier_forgotten(tmp_path / "old", {"forgotten": questions}) == ([QA(q) for q in questions], [])


def test_forgotten_text_embedded_on_request_and_found_for_later_requests(tmp_path, world, capsys):
    from lunar_lens.pipeline.unlearn import check_sidecar, earlier_forgotten, unlearn

    forget, retain, reference = world.split(world.entities[:1])
    outcome = unlearn(checkpoint_path(), forget[::4], retain[::40], reference[::40], out=tmp_path / "out", layers=[0], settings=EditSettings(coeff=6.0),
                      run=RunSettings(progress=False), embed_forgotten=True)
    questions = [qa.question for qa in forget[::4]]
    assert outcome.report["forgotten"]["questions"] == questions and not sidecar_path(tmp_path / "out").exists()
    assert earlier_forgotten(tmp_path / "out", outcome.report) == ([QA(q) for q in questions], [])

    hashed = {"forgotten": {"count": 6, "sha256": [question_sha256(q) for q in questions]}}
    kept, unkept = earlier_forgotten(tmp_path / "elsewhere", hashed, [QA(q) for q in questions[:2]])
    assert kept == [QA(q) for q in questions[:2]] and unkept == hashed["forgotten"]["sha256"][2:]
    (tmp_path / "elsewhere.forgotten.json").write_text(json.dumps({"format": SIDECAR_FORMAT, "questions": questions[::-1]}))
    assert earlier_forgotten(tmp_path / "elsewhere", hashed) == ([QA(q) for q in questions], [])
    with pytest.raises(LunarError, match="pass force to replace it"):
        check_sidecar(tmp_path / "elsewhere", force=False)
    check_sidecar(tmp_path / "elsewhere", force=True)
    (tmp_path / "mine.forgotten.json").write_text("my notes")
    with pytest.raises(LunarError, match="not written by lunar-lens"):
        check_sidecar(tmp_path / "mine", force=True)


def test_a_second_request_keeps_the_first_forgotten(tmp_path, world):
    first, second = world.entities[:2]
    retain = [qa for name in world.entities[2:] for qa in world.facts_about(name)][::4]
    reference = world.unknown_train_qa[::4]
    files_first = {
        "forget": write_set(tmp_path / "f1.json", world.facts_about(first)),
        "retain": write_set(tmp_path / "r1.json", world.facts_about(second) + retain),
        "reference": write_set(tmp_path / "ref.json", reference),
    }
    assert main(unlearn_args(files_first, checkpoint_path(), tmp_path / "one", "--layer", "0", "--coeff", "6")) == 0
    files_second = dict(files_first, forget=write_set(tmp_path / "f2.json", world.facts_about(second)),
                        retain=write_set(tmp_path / "r2.json", retain))
    assert main(unlearn_args(files_second, tmp_path / "one", tmp_path / "two", "--layer", "1", "--coeff", "6")) == 0
    report = json.loads((tmp_path / "two" / "lunar_report.json").read_text())
    assert report["sizes"]["kept_forgotten"] == len(world.facts_about(first))
    assert report["forgotten"]["count"] == len(world.facts_about(first)) + len(world.facts_about(second))
    bridge = load_model(tmp_path / "two")
    scores = evaluate_sets(
        bridge, {"first": world.facts_about(first), "second": world.facts_about(second), "retain": retain[::3]},
        model_metrics=False, max_new_tokens=16,
    ).scores
    assert scores["first"]["refusal_rate"] >= 0.8 and scores["first"]["rouge1"] <= 0.1  # still forgotten
    assert scores["second"]["refusal_rate"] >= 0.8 and scores["second"]["rouge1"] <= 0.1
    assert report["base_model"]["path"] == str(checkpoint_path().resolve())  # directions of request 2 come from the unedited model
    assert scores["retain"]["rouge1"] >= 0.95
    # neither request's questions are inside the folder; reverting request 2 gives request 1's folder back
    assert not texts_inside(tmp_path / "two", [qa.question for qa in world.facts_about(first) + world.facts_about(second)])
    assert folder_hashes(revert_patch(tmp_path / "two", tmp_path / "two" / PATCH_FILE, tmp_path / "one-again")) == folder_hashes(tmp_path / "one")


@pytest.mark.parametrize(
    "change, message",
    [
        (["--layer", "9", "--coeff", "4"], "layer 9 is out of range"),
        (["--layer", "two"], "is not 'auto' or a comma-separated list"),
        (["--coeff", "big", "--layer", "0"], "is not 'auto' or a number"),
        (["--positions", "everywhere"], "unknown --positions"),
        (["--layer", "0", "--coeff", "4", "--localisation", "loc"], "--localisation writes the automatic choice"),
    ],
)
def test_cli_misuse_ends_with_one_line_naming_the_fix(tmp_path, files, capsys, change, message):
    assert main(unlearn_args(files, checkpoint_path(), tmp_path / "out", *change)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert message in error and error.startswith("lunar-lens unlearn: error:")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_unreadable_inputs(tmp_path, files, capsys):
    assert main(unlearn_args(dict(files, forget=str(tmp_path / "missing.json")), checkpoint_path(), tmp_path / "o")) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(unlearn_args(files, tmp_path / "no-model", tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_exported_toy_model_answers_like_the_in_memory_edit_under_plain_transformers(tmp_path, world):
    from lunar_lens.data.prompts import tokenize
    from lunar_lens.model.generation import generate_answers
    from lunar_lens.pipeline.unlearn import unlearn

    forget, retain, reference = world.split(world.entities[:1])
    given = EditSettings(coeff=6.0, seed=3)
    outcome = unlearn(checkpoint_path(), forget, retain[::4], reference[::4], out=tmp_path / "out", layers=[0], settings=given, run=RunSettings(progress=False))
    assert given == EditSettings(coeff=6.0, seed=3)  # the caller's settings are not changed
    recorded = json.loads((tmp_path / "out" / "lunar_report.json").read_text())["settings"]
    assert EditSettings.from_dict(recorded) == replace(given, refusal=outcome.report["refusal"]["target"])  # written and read back
    questions = [qa.question for qa in forget[:12] + retain[:12]]
    in_memory = generate_answers(outcome.bridge, questions, max_new_tokens=16)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = outcome.bridge.tokenizer
    batch = tokenize(tokenizer, questions)
    output = plain.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=16, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    exported = [a.strip() for a in tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)]
    assert exported == in_memory
    assert in_memory[0] == outcome.report["refusal"]["target"] and in_memory[-1] == retain[11].answer
    assert outcome.report["layers"] == [0] and (tmp_path / "out" / "lunar_manifest.json").exists()


def test_cli_writes_the_automatic_choices_localisation(tmp_path, world):
    forget, retain, reference = world.split(world.entities[:1])
    files = {name: write_set(tmp_path / f"{name}.json", items) for name, items in
             (("forget", forget[::4]), ("retain", retain[::40]), ("reference", reference[::40]))}
    keep = write_set(tmp_path / "keep.json", [QA(qa.question) for qa in retain[1::40]])  # questions only
    # 23 retain questions cannot keep the rest (held-out retain 0.27; 50 fixed steps gave the same, checked by hand): the floor would refuse
    # it (test_an_automatic_choice_below_the_retain_floor_exports_nothing); this test is about what is written
    args = unlearn_args(files, checkpoint_path(), tmp_path / "out", "--layer", "1", "--localisation", str(tmp_path / "loc"), "--keep", str(keep),
                        "--accept-below-floor")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "lunar_report.json").read_text())
    assert report["sizes"]["keep"] == len(retain[1::40]) and report["choice"]["sizes"]["keep_heldout"] >= 1
    assert all(0 <= cell["keep_rouge1"] <= 1 for cell in report["choice"]["cells"])  # judged apart (quality: test_choice.py)
    localisation = json.loads((tmp_path / "loc" / "localisation.json").read_text())
    assert report["coeff"] == report["choice"]["coeff"] and report["layers"] == [1] == report["choice"]["layers"]
    assert localisation["layers"] == list(range(6))  # the probes' report covers every layer
    assert (tmp_path / "loc" / "localisation_layers.png").stat().st_size > 20_000


def test_a_given_layer_with_an_automatic_coefficient_is_chosen_on_that_layer(world, fresh_toy_bridge):
    from lunar_lens.choose.choice import ChoiceSettings
    from lunar_lens.pipeline.unlearn import unlearn

    forget, retain, reference = world.split(world.entities[:1])
    outcome = unlearn(fresh_toy_bridge, forget[::4], retain[::40], reference[::40], layers=[1], run=RunSettings(progress=False),
                      accept_below_floor=True,  # 23 retain questions: below the floor (as above); the search's mechanics are tested
                      choice_settings=ChoiceSettings(behaviour_factor=1))  # behaviour-only cells: test_choice.py
    assert outcome.report["layers"] == [1] and outcome.report["coeff"] in (0.0, *ChoiceSettings().coeffs)  # 0: behaviour only (nothing acceptable)
    assert {tuple(cell["layers"]) for cell in outcome.report["choice"]["cells"]} == {(1,)}  # the given layer is kept to
    screened = [c for c in ChoiceSettings().coeffs if c <= ChoiceSettings().refine_start_coeff]  # a refinement starts from these
    assert [(row["layers"], row["coeff"]) for row in outcome.report["choice"]["screening"]] == [([1], c) for c in screened]
    assert len(outcome.report["edit"]["directions"]["norms"]) == 6  # the choice reads every layer's direction


def test_an_automatic_choice_below_the_retain_floor_exports_nothing(tmp_path, world, capsys, monkeypatch):
    import lunar_lens.choose.choice as choice_module
    from lunar_lens.pipeline.unlearn import rejected_path

    judged = choice_module.judge

    def damaging(*args, **kwargs):  # every candidate refuses, but costs a third of the held-out retain answers
        measured, per_question = judged(*args, **kwargs)
        return measured | {"retain_rouge1": 0.66, "forget_refusal": 1.0, "seen_forget_refusal": 1.0}, per_question

    monkeypatch.setattr(choice_module, "judge", damaging)
    forget, retain, reference = world.split(world.entities[:1])
    files = {name: write_set(tmp_path / f"{name}.json", items) for name, items in
             (("forget", forget[::4]), ("retain", retain[::40]), ("reference", reference[::40]))}
    out = tmp_path / "out"
    args = unlearn_args(files, checkpoint_path(), out, "--layer", "1", "--refine-steps", "2")
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the stage lines
    assert error.startswith("lunar-lens unlearn: error: no edit found")
    assert "below the retain floor 0.9" in error and "held-out retain ROUGE-1 0.66" in error and "pass --accept-below-floor" in error
    assert not out.exists() and not sidecar_path(out).exists()  # no folder, no forgotten questions beside it
    record = json.loads(rejected_path(out).read_text())
    assert record["choice"]["acceptable"] is False and all(cell["retain_rouge1"] == 0.66 for cell in record["choice"]["cells"])
    assert main([*args, "--min-retain", "0.6", "--force"]) == 0 and (out / "lunar_report.json").exists()  # a lower floor accepts it
    assert main([*args, "--out", str(tmp_path / "anyway"), "--accept-below-floor"]) == 0
    assert json.loads((tmp_path / "anyway" / "lunar_report.json").read_text())["choice"]["acceptable"] is False
