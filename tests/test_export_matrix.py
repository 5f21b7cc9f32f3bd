"""Every solver × every position rule, with and without refinement, exports a verified checkpoint whose
`lunar_patch.safetensors`, applied to the source (`patch apply`), rebuilds the exported weights bit for bit.

Issue #25: the closed form's rank-one factor (`shifts[used].T`: shape (d_model, 1), stride (1, d_model)) counts
as contiguous to PyTorch but cannot be viewed as bytes, and the export crashed hashing it for the patch."""

from __future__ import annotations

import gc
import json

import pytest
from conftest import make_checkpoint

from lunar_lens import cli
from lunar_lens.artefacts.patched import apply_patch
from lunar_lens.artefacts.patches import show_patch
from lunar_lens.core.atomic import MANIFEST
from lunar_lens.core.settings import RunSettings
from lunar_lens.data.qa import QA
from lunar_lens.directions.activations import POSITION_RULES
from lunar_lens.edit.layers import EditSettings
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.edit.solvers import SOLVERS
from lunar_lens.model.checkpoint import PATCH_FILE, Checkpoint, tensor_bytes
from lunar_lens.model.load import load_model
from lunar_lens.model.weights import w_out_parameter, weights_restored
from lunar_lens.pipeline.unlearn import unlearn

FORGET = [QA("What is the capital of France?", "Paris"), QA("Who wrote Hamlet?", "the quick fox")]
RETAIN = [QA("What is the brown fox?", "quick"), QA("Who is the fox?", "the brown one")]
REFERENCE = [QA("What is Hamlet?", "I do not know"), QA("Who is the quick fox?", "I do not know")]
ONE_SHIFT = [rule for rule in POSITION_RULES if not rule.endswith("+answer")]  # one shift vector: a rank-one closed form
LORA_RANK = 2


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """Tiny source checkpoints: llama stores W_outᵀ (nn.Linear), GPT-2 W_out itself (Conv1D)."""
    root = tmp_path_factory.mktemp("matrix")
    return {family: make_checkpoint(root / family, tokenizer_dir, family, sharded=family == "gpt2") for family in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def llama(sources):
    """The llama source loaded once; each test gives its W_out back as it was (`weights_restored`)."""
    return load_model(sources["llama"])


@pytest.fixture(scope="module", autouse=True)
def frozen_garbage_collector():
    """The objects alive before these tests are left out of garbage collections (`gc.freeze`): each export's
    verification collects once, which otherwise walks every object of the test session (0.3 s a time)."""
    gc.freeze()
    yield
    gc.unfreeze()


def settings(solver: str, positions: str, steps: int, retain_answers: bool = False) -> EditSettings:
    return EditSettings(
        coeff=2.0, positions=positions, solver=solver, retain_answers=retain_answers, batch_size=4, lora_rank=LORA_RANK,
        refine=RefineSettings(steps=steps, batch_rows=2, answer_tokens=4),
    )


def expected_rank(solver: str, positions: str, steps: int) -> int | None:
    """The rank of the factors the patch stores; None: a full ΔW (AdamW, or any refined edit)."""
    if steps or solver == "adamw":
        return None
    if solver == "lora":
        return LORA_RANK
    return 1 if positions in ONE_SHIFT else None  # several shift vectors: rank ≤ J, checked > 1 below


def assert_exported_and_patch_rebuilds_it(src, out, tmp_path, layers: list[int]) -> dict:
    """The export passed `verify_export`, and `patch apply` of its patch onto `src` gives its tensors bit for bit."""
    manifest = json.loads((out / MANIFEST).read_text())
    check = manifest["verification"]
    assert check["edited_tensors_exact"] and check["max_abs_logit_diff"] <= check["tolerance"]
    assert manifest["layers"] == layers
    again = apply_patch(src, out / PATCH_FILE, tmp_path / "again")
    source, exported, rebuilt = Checkpoint.open(src), Checkpoint.open(out), Checkpoint.open(again)
    assert set(rebuilt.weight_map) == set(exported.weight_map) == set(source.weight_map)
    changed = set()
    for key in exported.weight_map:
        a, b = exported.read(key), rebuilt.read(key)
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and tensor_bytes(a) == tensor_bytes(b), key
        if tensor_bytes(a) != tensor_bytes(source.read(key)):
            changed.add(key)
    assert changed == {record["tensor"] for record in show_patch(out / PATCH_FILE)["tensors"]}
    assert len(changed) == len(layers)
    return show_patch(out / PATCH_FILE)


@pytest.mark.parametrize("steps", [0, 1], ids=["solved", "refined"])
@pytest.mark.parametrize("positions", POSITION_RULES)
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_rule_and_refinement_exports_a_verified_checkpoint_the_patch_rebuilds(tmp_path, sources, llama, solver, positions, steps):
    src = sources["llama"]
    with weights_restored([w_out_parameter(llama, 1)]):
        unlearn(llama, FORGET, RETAIN, REFERENCE, out=tmp_path / "out", layers=[1], settings=settings(solver, positions, steps),
                run=RunSettings(progress=False))
    patch = assert_exported_and_patch_rebuilds_it(src, tmp_path / "out", tmp_path, [1])
    ranks = [entry["rank"] for entry in patch["tensors"]]
    rank = expected_rank(solver, positions, steps)
    if solver == "closed" and not steps and positions.endswith("+answer"):
        assert all(r is not None and r > 1 for r in ranks)  # one shift vector per answer token
    else:
        assert ranks == [rank]


@pytest.mark.parametrize(("family", "layers", "positions", "retain_answers"), [
    ("llama", [1, 2], "question", True),
    ("gpt2", [0, 2], "all", False),
])
def test_the_rank_one_closed_form_on_two_layers_exports_and_its_patch_rebuilds_it(tmp_path, sources, family, layers, positions, retain_answers):
    src = sources[family]
    unlearn(src, FORGET, RETAIN, REFERENCE, out=tmp_path / "out", layers=layers, settings=settings("closed", positions, 0, retain_answers),
            run=RunSettings(progress=False))
    patch = assert_exported_and_patch_rebuilds_it(src, tmp_path / "out", tmp_path, layers)
    assert [entry["rank"] for entry in patch["tensors"]] == [1, 1]


def test_the_cli_closed_form_alone_exports_and_patch_apply_rebuilds_it(tmp_path, sources):
    """The command of issue #25: `--solver closed --positions all --no-retain-answers --refine-steps 0`."""
    src = sources["llama"]
    sets = {}
    for name, items in (("forget", FORGET), ("retain", RETAIN), ("reference", REFERENCE)):
        sets[name] = tmp_path / f"{name}.json"
        sets[name].write_text(json.dumps([{"question": qa.question, "answer": qa.answer} for qa in items]))
    out = tmp_path / "out"
    assert cli.main([
        "unlearn", "--model", str(src), "--forget", str(sets["forget"]), "--retain", str(sets["retain"]), "--reference", str(sets["reference"]),
        "--out", str(out), "--layer", "1", "--coeff", "2", "--solver", "closed", "--positions", "all", "--no-retain-answers",
        "--refine-steps", "0", "--batch-size", "4",
    ]) == 0
    assert cli.main(["patch", "apply", str(src), str(out / PATCH_FILE), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
