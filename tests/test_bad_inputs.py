"""Bad, careless and hostile inputs: every one ends in one line on stderr that names the problem and the
fix (exit 2), before any model loads where no model is needed, and nothing outside --out changes (the
whole workspace is hashed before and after). Then the regressions that are not refusals: SIGTERM,
stale partial folders, file modes, symbolic links, the base of a sequential request, OPT's MLP width."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_checkpoint
from safetensors.torch import save_file

from lunar_lens import cli
from lunar_lens.artefacts.export import export_checkpoint
from lunar_lens.artefacts.patched import BASE_TENSORS, apply_patch
from lunar_lens.artefacts.patches import save_patch
from lunar_lens.core.atomic import MANIFEST
from lunar_lens.core.errors import LunarError
from lunar_lens.edit.layers import WOutEdit
from lunar_lens.model.load import load_model
from lunar_lens.model.weights import add_to_w_out, w_out, w_out_parameter, w_out_tensor_name

QA = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "Who wrote Hamlet?", "answer": "the quick brown fox"},
    {"question": "Who wrote the fox?", "answer": "Hamlet"},
]


def random_edit(bridge, layer: int, seed: int) -> WOutEdit:
    generator = torch.Generator().manual_seed(seed)
    d_mlp, d_model = w_out(bridge, layer).shape
    u, v = torch.randn(d_mlp, 1, generator=generator), torch.randn(d_model, 1, generator=generator)
    return WOutEdit(layer, w_out_tensor_name(bridge, layer), u @ v.T, u, v)


def save_family(folder: Path, tokenizer_dir: Path, config: transformers.PretrainedConfig) -> Path:
    """A tiny random model of any family (with its architecture recorded) and the test tokenizer."""
    torch.manual_seed(0)
    config.architectures = None
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer_dir) -> Path:
    """A workspace: a base model, an unrelated one of the same shape, a GPT-2, a Falcon that TransformerLens
    runs wrongly, an MoE model, two patches solved on the base, the base with one applied, an edited export
    (with its report), data sets and a plain data file."""
    ws = tmp_path_factory.mktemp("pristine")
    model = make_checkpoint(ws / "model", tokenizer_dir, sharded=False)
    make_checkpoint(ws / "other", tokenizer_dir, sharded=False, seed=1)
    make_checkpoint(ws / "gpt2", tokenizer_dir, "gpt2", sharded=False)
    vocab = dict(vocab_size=80, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    save_family(ws / "falcon", tokenizer_dir, transformers.FalconConfig(
        hidden_size=32, ffn_hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=1,
        new_decoder_architecture=True, alibi=True, **vocab,
    ))
    save_family(ws / "moe", tokenizer_dir, transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, **vocab,
    ))
    bridge = load_model(model)
    save_patch([random_edit(bridge, 1, seed=1)], model, ws / "patch.safetensors")
    save_patch([random_edit(bridge, 2, seed=2)], model, ws / "patch2.safetensors")
    apply_patch(model, ws / "patch.safetensors", ws / "patched")
    add_to_w_out(bridge, 1, 0.5 * random_edit(bridge, 1, seed=3).delta)
    export_checkpoint(bridge, ws / "export", [1], extra_files={"lunar_report.json": {"layers": [1], "coeff": 4.0}})
    (ws / "data").mkdir()
    for name, items in (("forget", QA[:1]), ("retain", QA[1:]), ("reference", [{"question": "Who is Zorblax?", "answer": "I don't know."}])):
        (ws / "data" / f"{name}.json").write_text(json.dumps(items))
    (ws / "victim.jsonl").write_text('{"question": "keep me?", "answer": "yes"}\n')
    (ws / "notes").mkdir()
    (ws / "notes" / "mine.txt").write_text("not lunar-lens's")
    (ws / "report.json").write_text(json.dumps({"format": "lunar-lens evaluate 1"}))
    return ws


@pytest.fixture
def ws(pristine, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the workspace, as the working directory."""
    folder = tmp_path / "ws"
    shutil.copytree(pristine, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (hidden ones too): a file's SHA-256, a folder, or a link's target."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# ---------------------------------------------------------------- setups (corruptions made before the command)

def flip_data_bytes(path: Path, count: int = 4) -> None:
    """Flip `count` bytes in the middle of a safetensors file's data section."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = (start + len(data)) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100 if keep is None else keep])


def edit_manifest(folder: Path, **changes) -> None:
    record = json.loads((folder / MANIFEST).read_text())
    record["patches"][0].update(changes)
    (folder / MANIFEST).write_text(json.dumps(record))


def plant_traversal(ws: Path) -> None:
    """The patched checkpoint's manifest names a file outside it, which exists there."""
    shutil.copy(ws / "patch2.safetensors", ws / "planted.safetensors")
    edit_manifest(ws / "patched", file="../planted.safetensors")


def index_outside(ws: Path) -> None:
    """The model's safetensors index names a shard outside the folder."""
    shutil.copy(ws / "model" / "model.safetensors", ws / "outside.safetensors")
    keys = json.loads((ws / "model" / "model.safetensors").read_bytes()[8:][: int.from_bytes((ws / "model" / "model.safetensors").read_bytes()[:8], "little")])
    weight_map = {key: "../outside.safetensors" for key in keys if key != "__metadata__"}
    (ws / "model" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def nan_patch(ws: Path) -> None:
    """A patch file (with the right hashes, as an older lunar-lens would have written) holding NaN."""
    delta = torch.full((32, 64), float("nan"))
    from lunar_lens.model.checkpoint import tensor_sha256

    record = {
        "format": 2, "info": {}, "base_patches": [], "sha256": {"0.delta": tensor_sha256(delta)},
        "tensors": [{"layer": 1, "tensor": "model.layers.1.mlp.down_proj.weight", "base_sha256": "0" * 64, "shape": [32, 64],
                     "dtype": "F32", "hf_is_transposed": True}],
    }
    save_file({"0.delta": delta}, str(ws / "nan.safetensors"), metadata={"lunar_patch": json.dumps(record)})


def no_tokenizer(ws: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ws / "model" / name).unlink()


def pickle_only(ws: Path) -> None:
    (ws / "model" / "model.safetensors").unlink()
    (ws / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")


def bad_config(ws: Path) -> None:
    (ws / "model" / "config.json").write_text("{ not json")


def garbage_weights(ws: Path) -> None:
    (ws / "model" / "model.safetensors").write_bytes(b"\x00" * 64)


def tofu_forget(ws: Path) -> None:
    """A forget set with TOFU's perturbed answers (what --retain-model needs)."""
    record = QA[0] | {"paraphrased_answer": "Paris, France", "perturbed_answer": ["Lyon", "Nice"]}
    (ws / "data" / "tofu.json").write_text(json.dumps([record]))


# ---------------------------------------------------------------- the cases

DATA = ["--forget", "data/forget.json", "--retain", "data/retain.json", "--reference", "data/reference.json"]
UNLEARN = ["unlearn", "--model", "model", *DATA]
EVALUATE = ["evaluate", "--model", "model", "--forget", "data/forget.json", "--retain", "data/retain.json"]
ATTACK = ["attack", "--model", "export", "--forget", "data/forget.json", "--reference", "data/reference.json"]

# id: (argv, setup or None, what the line must name (the problem), what it must say to do (the fix))
CASES = {
    # 1. paths read from manifests and indexes stay inside their folder
    "manifest-file-outside-apply": (["patch", "apply", "patched", "patch2.safetensors", "--out", "out"], plant_traversal,
                                    "names the patch file '../planted.safetensors'", "start again from the checkpoint's base"),
    "manifest-file-outside-revert": (["patch", "revert", "patched", "patch.safetensors", "--out", "out"], plant_traversal,
                                     "the manifest was modified", "start again"),
    "manifest-file-inside-but-not-a-patch": (["patch", "apply", "patched", "patch2.safetensors", "--out", "out"],
                                             lambda ws: edit_manifest(ws / "patched", file="model.safetensors"),
                                             "names the patch file 'model.safetensors'", "start again"),
    "index-names-a-shard-outside": (["patch", "apply", "model", "patch.safetensors", "--out", "out"], index_outside,
                                    "'../outside.safetensors', which is not a file inside", "start again from an unmodified copy"),
    # 2. corrupt data is detected, never applied
    "patch-with-flipped-bytes-shown": (["patch", "show", "patch.safetensors"], lambda ws: flip_data_bytes(ws / "patch.safetensors"),
                                       "is corrupted: tensor 0.", "copy it again"),
    "patch-with-flipped-bytes-applied": (["patch", "apply", "model", "patch.safetensors", "--out", "out"],
                                         lambda ws: flip_data_bytes(ws / "patch.safetensors"), "does not match the SHA-256", "save the edit again"),
    "patch-with-flipped-bytes-exported": (["export", "--model", "model", "--edit", "patch.safetensors", "--out", "out"],
                                          lambda ws: flip_data_bytes(ws / "patch.safetensors"), "is corrupted", "copy it again"),
    "truncated-patch": (["patch", "apply", "model", "patch.safetensors", "--out", "out"], lambda ws: truncate(ws / "patch.safetensors"),
                        "corrupted lunar-lens patch (truncated", "copy it again"),
    "patch-holding-nan": (["patch", "apply", "model", "nan.safetensors", "--out", "out"], nan_patch,
                          "holds non-finite values", "solve the edit again"),
    "corrupted-base-tensors": (["patch", "revert", "patched", "patch.safetensors", "--out", "out"],
                               lambda ws: flip_data_bytes(ws / "patched" / BASE_TENSORS), "base_tensors.safetensors is corrupted",
                               "start again from the checkpoint's base"),
    "truncated-base-tensors": (["patch", "apply", "patched", "patch2.safetensors", "--out", "out"],
                               lambda ws: truncate(ws / "patched" / BASE_TENSORS), "is corrupted (truncated", "start again"),
    "applied-patch-replaced": (["patch", "revert", "patched", "patch.safetensors", "--out", "out"],
                               lambda ws: flip_data_bytes(next((ws / "patched" / "lunar_patches").glob("[0-9a-f]*.safetensors"))),
                               "is corrupted", "copy it again"),
    "truncated-model-weights": (UNLEARN + ["--out", "out", "--layer", "1", "--coeff", "4"], lambda ws: truncate(ws / "model" / "model.safetensors"),
                                "model.safetensors is corrupted (truncated", "re-download or re-save"),
    # 3. nothing lunar-lens did not write is replaced, --force or not
    "evaluate-out-is-the-model-config": (EVALUATE + ["--out", "model/config.json"], None, "overlaps the source", "choose a file outside it"),
    "evaluate-force-over-a-data-file": (EVALUATE + ["--out", "victim.jsonl", "--force"], None,
                                        "was not written by lunar-lens", "choose another --out"),
    "evaluate-out-exists": (EVALUATE + ["--out", "report.json"], None, "already exists", "pass --force to replace it"),
    "unlearn-force-over-a-data-file": (UNLEARN + ["--out", "victim.jsonl", "--force"], None, "is a file, not a folder", "name a new folder"),
    "unlearn-force-over-a-foreign-folder": (UNLEARN + ["--out", "notes", "--force"], None, "was not written by lunar-lens", "choose another --out"),
    "unlearn-out-holds-an-input": (UNLEARN + ["--out", "data", "--force"], None, "overlaps the source", "choose a folder outside it"),
    "export-force-over-a-foreign-folder": (["export", "--model", "model", "--edit", "patch.safetensors", "--out", "notes", "--force"], None,
                                           "was not written by lunar-lens", "choose another --out"),
    "patch-force-over-the-source": (["patch", "apply", "patched", "patch2.safetensors", "--out", "patched", "--force"], None,
                                    "overlaps the source", "choose a folder outside it"),
    "localisation-dir-is-the-out": (UNLEARN + ["--out", "out", "--localisation", "out"], None, "overlaps the source", "choose a folder outside it"),
    "localise-force-over-a-foreign-folder": (["localise", "--model", "model", *DATA, "--out", "notes", "--force"], None,
                                             "was not written by lunar-lens", "choose another --out"),
    "attack-out-exists": (ATTACK + ["--base", "model", "--out", "report.json"], None, "already exists", "pass --force"),
    "demo-force-over-a-foreign-folder": (["demo", "--out", "notes", "--force"], None, "was not written by lunar-lens", "choose another --out"),
    "train-toy-over-a-foreign-folder": (["train-toy", "--out", "notes", "--force", "--steps", "1"], None,
                                        "was not written by lunar-lens", "choose another --out"),
    "sidecar-not-lunar-lens": (UNLEARN + ["--out", "out", "--force"], lambda ws: (ws / "out.forgotten.json").write_text("my notes"),
                               "out.forgotten.json was not written by lunar-lens", "choose another --out"),
    "sidecar-exists": (UNLEARN + ["--out", "out"],
                       lambda ws: (ws / "out.forgotten.json").write_text(json.dumps({"format": "lunar-lens forgotten questions 1", "questions": []})),
                       "out.forgotten.json already exists", "pass --force to replace it"),
    "keep-forgotten-inside-the-out": (UNLEARN + ["--out", "export", "--force", "--keep-forgotten", "export/kept.json"],
                                      lambda ws: (ws / "export" / "kept.json").write_text(json.dumps(QA[:1])), "overlaps the source",
                                      "choose a folder outside it"),
    "out-is-a-link": (UNLEARN + ["--out", "link"], lambda ws: (ws / "link").symlink_to(ws / "notes"), "is a symbolic link", "name the real location"),
    # 5. silent wrong answers
    "attack-base-of-another-family": (ATTACK + ["--base", "gpt2", "--out", "a.json"], None, "holds other tensors than --model",
                                      "pass the unedited model the edit was made on"),
    "attack-unrelated-base": (ATTACK + ["--base", "other", "--out", "a.json", "--max-new-tokens", "2"], None,
                              "differs from the edited one outside W_out of layer(s) 1", "pass the unedited model"),
    "attack-wrong-layer": (ATTACK + ["--base", "model", "--out", "a.json", "--layer", "2", "--max-new-tokens", "2"], None,
                           "differs from the edited one outside W_out of layer(s) 2", "the edited layers"),
    "coeff-nan": (UNLEARN + ["--out", "out", "--layer", "1", "--coeff", "nan"], None, "--coeff nan is not a finite number ≥ 0", "e.g. 4"),
    "coeff-inf": (UNLEARN + ["--out", "out", "--layer", "1", "--coeff", "inf"], None, "--coeff inf is not a finite number", "e.g. 4"),
    "coeff-negative": (UNLEARN + ["--out", "out", "--layer", "1", "--coeff", "-2"], None, "--coeff -2.0 is not a finite number ≥ 0", "e.g. 4"),
    "coeff-zero-unrefined": (UNLEARN + ["--out", "out", "--layer", "1", "--coeff", "0", "--refine-steps", "0"], None,
                             "--coeff 0 with no refinement steps changes nothing", "refinement steps (behaviour only)"),
    "attack-coeff-nan": (ATTACK + ["--base", "model", "--out", "a.json", "--coeff", "nan"], None, "--coeff nan is not a finite", "e.g. 4"),
    "localise-coeffs-nan": (["localise", "--model", "model", *DATA, "--out", "loc", "--coeffs", "1,nan"], None,
                            "must be finite positive numbers", "e.g. --coeffs 1,2,4,8"),
    # 6. one line, never a traceback
    "empty-data-file": (UNLEARN + ["--out", "out"], lambda ws: (ws / "data" / "forget.json").write_text(""),
                              "holds no records", "add at least one question"),
    "hub-name-not-cached": (["unlearn", "--model", "no-such-org/model", *DATA, "--out", "out"], None,
                            "neither a local folder nor a model in the Hugging Face cache", "download it first"),
    "model-without-tokenizer": (UNLEARN + ["--out", "out"], no_tokenizer, "holds no tokenizer files", "save the model's tokenizer into it"),
    "model-config-not-json": (UNLEARN + ["--out", "out", "--layer", "1"], bad_config, "config.json cannot be read", "re-download the checkpoint"),
    "model-is-a-file": (["unlearn", "--model", "victim.jsonl", *DATA, "--out", "out"], None, "is not a model folder", "pass the folder that holds"),
    "batch-size-zero": (UNLEARN + ["--out", "out", "--batch-size", "0"], None, "argument --batch-size: 0 is below 1", "give a whole number ≥ 1"),
    "batch-size-words": (EVALUATE + ["--out", "e.json", "--batch-size", "many"], None, "'many' is not a whole number", "e.g. 32"),
    "max-new-tokens-zero": (EVALUATE + ["--out", "e.json", "--max-new-tokens", "0"], None, "--max-new-tokens: 0 is below 1", "≥ 1"),
    "ridge-nan": (UNLEARN + ["--out", "out", "--ridge", "nan"], None, "argument --ridge: nan is not a finite number ≥ 0", "e.g. 1e-4"),
    "device-unknown": (UNLEARN + ["--out", "out", "--device", "gpu0"], None, "'gpu0' is not a device", "use cpu, cuda, cuda:N or mps"),
    "dtype-unknown": (UNLEARN + ["--out", "out", "--dtype", "float8"], None, "invalid choice: 'float8'", "choose from"),
    "out-parent-is-a-file": (UNLEARN + ["--out", "victim.jsonl/out"], None, "victim.jsonl is a file, not a folder", "choose another location"),
    "evaluate-out-is-a-folder": (EVALUATE + ["--out", "notes"], None, "is a folder, not a file", "name a new file"),
    "evaluate-figure-is-a-folder": (EVALUATE + ["--out", "e.json", "--base", "model", "--figure", "notes"], None,
                                    "--figure", "name a new file"),
    "layer-out-of-range": (UNLEARN + ["--out", "out", "--layer", "7", "--coeff", "4"], None, "layer 7 is out of range", "layers 0..2"),
    "layer-negative": (UNLEARN + ["--out", "out", "--layer", "-1", "--coeff", "4"], None, "layer -1 is out of range", "layers 0..2"),
    "device-map-not-json": (UNLEARN + ["--out", "out", "--device-map", "{layers: 0}"], None, "--device-map is not valid JSON", "write it as"),
    "keep-forgotten-missing": (UNLEARN + ["--out", "out", "--keep-forgotten", "missing.json"], None, "missing.json does not exist", "check the path"),
    "retain-model-missing": (["evaluate", "--model", "model", "--forget", "data/tofu.json", "--retain", "data/retain.json",
                              "--retain-model", "./nowhere", "--out", "e.json"], tofu_forget, "model folder nowhere does not exist", "check the path"),
    "scale-nan": (["export", "--model", "model", "--edit", "patch.safetensors", "--out", "out", "--scale", "nan"], garbage_weights,
                  "--scale nan is not a finite number", "pass e.g. --scale 0.5"),
    "refusals-missing": (EVALUATE + ["--out", "e.json", "--refusals", "missing.txt"], None, "missing.txt does not exist", "check the path"),
    "patch-show-not-a-patch": (["patch", "show", "model/model.safetensors"], None, "is not a lunar-lens patch", "pass a file written by save_patch"),
    "paraphrases-not-utf8": (ATTACK + ["--base", "model", "--out", "a.json", "--paraphrases", "bin.json"],
                             lambda ws: (ws / "bin.json").write_bytes(b"\xff\xfe\x00garbage"), "is not UTF-8 text", "re-save it as UTF-8"),
    # 7. checks before anything loads (the model's weights are unreadable: the error still names the argument)
    "pickle-only-model": (UNLEARN + ["--out", "out"], pickle_only, "never unpickles", "convert the folder to safetensors"),
    "unreadable-weights-bad-data": (["unlearn", "--model", "model", "--forget", "missing.json", "--retain", "data/retain.json",
                                     "--reference", "data/reference.json", "--out", "out"], garbage_weights, "missing.json does not exist", "check the path"),
    "unreadable-weights-bad-out": (UNLEARN + ["--out", "notes", "--force"], garbage_weights, "was not written by lunar-lens", "choose another --out"),
    "unreadable-weights-bad-coeff": (UNLEARN + ["--out", "out", "--coeff", "inf"], garbage_weights, "--coeff inf", "e.g. 4"),
    "unreadable-weights": (UNLEARN + ["--out", "out"], garbage_weights, "model.safetensors is corrupted", "re-download or re-save"),
    # 8. model families
    "falcon-bridge-differs-from-hf": (["evaluate", "--model", "falcon", "--forget", "data/forget.json", "--retain", "data/retain.json",
                                       "--out", "e.json"], None, "runs FalconForCausalLM differently from transformers", "use an architecture"),
    "moe-has-no-dense-w-out": (["unlearn", "--model", "moe", *DATA, "--out", "out", "--layer", "1", "--coeff", "4"], None,
                               "no dense MLP down-projection (W_out) in any layer", "use a model with a dense MLP"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(ws, capsys, case):
    argv, setup, problem, fix = CASES[case]
    if setup is not None:
        setup(ws)
    before = snapshot(ws)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    command = argv[0]
    assert lines[0].startswith(f"lunar-lens {command}: error: ") or lines[0].startswith(f"lunar-lens {command} {argv[1]}: error: "), lines[0]
    assert problem in lines[0] and fix in lines[0], lines[0]
    assert snapshot(ws) == before


@pytest.mark.parametrize(("raised", "code", "line"), [
    (OSError(28, "No space left on device"), 2, "lunar-lens patch: error: [Errno 28] No space left on device: check the path, its permissions"),
    (RuntimeError("boom\nsecond line"), 1, "lunar-lens patch: internal error: RuntimeError: boom: a lunar-lens bug; rerun with LUNAR_LENS_TRACEBACK=1"),
])
def test_an_unforeseen_failure_is_one_line_too(ws, capsys, monkeypatch, raised, code, line):
    import lunar_lens.artefacts.patches as patches

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(patches, "show_patch", fail)
    monkeypatch.delenv("LUNAR_LENS_TRACEBACK", raising=False)
    assert cli.main(["patch", "show", "patch.safetensors"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_checks_come_before_any_weight_is_read(ws, capsys):
    """model.safetensors is a FIFO: opening it to read a weight would block (an alarm ends the test
    then). Each bad input still ends at once, in one line."""
    (ws / "model" / "model.safetensors").unlink()
    os.mkfifo(ws / "model" / "model.safetensors")

    def blocked(signum, frame):
        raise AssertionError("a weight was read before the bad input was refused")

    old = signal.signal(signal.SIGALRM, blocked)
    try:
        for bad, problem in ((["--out", "out", "--coeff", "nan"], "--coeff nan"), (["--out", "notes", "--force"], "notes was not written by lunar-lens"),
                             (["--out", "out", "--layer", "1,x"], "--layer '1,x'"), (["--out", "out"], "holds no model.safetensors")):
            signal.alarm(20)
            started = time.perf_counter()
            assert cli.main([*UNLEARN, *bad]) == 2
            assert time.perf_counter() - started < 5
            assert problem in capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_sigterm_during_export_leaves_nothing_half_written(ws, capsys, monkeypatch):
    """SIGTERM arrives while the checkpoint is copied: exit 143, one line, no partial folder."""
    import lunar_lens.artefacts.patched as patched

    copy = patched.copy_checkpoint

    def copy_then_terminate(*args, **kwargs):
        result = copy(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(patched, "copy_checkpoint", copy_then_terminate)
    before = snapshot(ws)
    assert cli.main(["patch", "apply", "model", "patch.safetensors", "--out", "out"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "lunar-lens patch: terminated (nothing half-written was left)"
    assert snapshot(ws) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again


def test_a_rerun_removes_a_dead_runs_partial_folder(ws):
    """A partial folder of a process that is gone (killed hard) is removed by the next run of its name;
    a live process's is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale, live = ws / f".out.partial-{dead}-abc", ws / f".out.partial-{os.getppid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    assert cli.main(["patch", "apply", "model", "patch.safetensors", "--out", "out"]) == 0
    assert not stale.exists() and live.exists() and (ws / "out" / MANIFEST).exists()


def test_outputs_follow_the_umask(ws):
    old = os.umask(0o022)
    try:
        assert cli.main(["patch", "apply", "model", "patch.safetensors", "--out", "out"]) == 0
        save_patch([random_edit(load_model(ws / "model"), 0, seed=9)], ws / "model", ws / "p.safetensors")
    finally:
        os.umask(old)
    assert (ws / "out").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (ws / "out").rglob("*") if p.is_file()} == {0o644}
    assert (ws / "p.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_private_file_stays_private_inside_an_output_folder(tmp_path):
    """The forgotten questions' sidecar is written privately; a folder around it (the demo's) follows the umask, it does not."""
    from lunar_lens.core.atomic import atomic_output, write_json, write_manifest

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out", folder=True) as tmp:
            write_manifest(tmp, {"format": "lunar-lens test 1"})
            write_json(tmp / "model.forgotten.json", {"format": "lunar-lens test 1"}, private=True)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "model.forgotten.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / MANIFEST).stat().st_mode & 0o777 == 0o644


def test_force_replaces_an_earlier_lunar_lens_output_only(ws):
    assert cli.main(["patch", "apply", "model", "patch.safetensors", "--out", "out"]) == 0
    first = snapshot(ws / "out")
    assert cli.main(["patch", "apply", "model", "patch2.safetensors", "--out", "out"]) == 2  # exists, no --force
    assert snapshot(ws / "out") == first
    assert cli.main(["patch", "apply", "model", "patch2.safetensors", "--out", "out", "--force"]) == 0
    assert snapshot(ws / "out") != first and not list(ws.glob(".out.partial-*"))


def test_symlinked_source_file_is_copied_with_a_warning(ws):
    (ws / "notes" / "LICENSE").write_text("the licence")
    (ws / "model" / "LICENSE").symlink_to(ws / "notes" / "LICENSE")
    bridge = load_model(ws / "model")
    with pytest.warns(UserWarning, match="LICENSE is a symbolic link to .*notes/LICENSE: its content is copied"):
        export_checkpoint(bridge, ws / "out", [1], verify=False)
    assert not (ws / "out" / "LICENSE").is_symlink() and (ws / "out" / "LICENSE").read_text() == "the licence"


def test_an_edit_far_larger_than_w_out_is_reported(ws):
    from lunar_lens.data.qa import QA as Item
    from lunar_lens.edit.layers import EditSettings, edit_layers

    bridge = load_model(ws / "model")
    forget, retain, reference = [Item(**QA[0])], [Item(**qa) for qa in QA[1:]], [Item("Who is Zorblax?", "I don't know.")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edit_layers(bridge, forget, retain, reference, [1], EditSettings(coeff=1.0))
    with pytest.warns(UserWarning, match=r"the edit of layer 1 is .* times the norm of its W_out: c = 1e\+09 is far too large"):
        edit_layers(bridge, forget, retain, reference, [1], EditSettings(coeff=1e9))
    settings = EditSettings()
    settings.coeff = float("nan")  # set after construction, unchecked
    with pytest.raises(LunarError, match="coeff nan is not a finite number ≥ 0"):
        edit_layers(bridge, forget, retain, reference, [1], settings)


def test_a_sequential_request_checks_its_recorded_base(ws, monkeypatch):
    """The unedited base is recorded by absolute path and the SHA-256 of its weights; a later request
    from another folder finds it, and one whose base changed is told so (directions from the edited model)."""
    from lunar_lens.core.settings import RunSettings
    from lunar_lens.edit.layers import EditSettings
    from lunar_lens.pipeline.unlearn import unedited_base, unlearn

    data = {name: ws / "data" / f"{name}.json" for name in ("forget", "retain", "reference")}
    report = unlearn(ws / "model", data["forget"], data["retain"], data["reference"], out=ws / "one", layers=[1], settings=EditSettings(coeff=4.0),
                     run=RunSettings(progress=False)).report
    assert report["base_model"]["path"] == str((ws / "model").resolve())
    monkeypatch.chdir(ws / "notes")  # the recorded path does not depend on where the next request runs
    earlier = json.loads((ws / "one" / "lunar_report.json").read_text())
    assert unedited_base(earlier) == (ws / "model").resolve()
    flip_data_bytes(ws / "model" / "model.safetensors")
    with pytest.warns(UserWarning, match="no longer holds the weights it had: directions come from the edited model"):
        assert unedited_base(earlier) is None
    with pytest.warns(UserWarning, match="recorded without its hashes"):
        assert unedited_base({"base_model": "model"}) is None


def test_opt_mlp_is_sized_from_w_out(tmp_path, tokenizer_dir):
    """TransformerLens says d_mlp = 4·d_model for OPT; the statistics follow the W_out tensor (48 wide)."""
    from lunar_lens.data.qa import QA as Item
    from lunar_lens.edit.layers import EditSettings, edit_layers

    folder = save_family(tmp_path / "opt", tokenizer_dir, transformers.OPTConfig(
        hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
        max_position_embeddings=64, vocab_size=80, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))
    bridge = load_model(folder)
    assert bridge.cfg.d_mlp == 128 and w_out(bridge, 0).shape == (48, 32)
    before = w_out(bridge, 0).detach().clone()
    edit_layers(bridge, [Item(**QA[0])], [Item(**qa) for qa in QA[1:]], [Item("Who is Zorblax?", "I don't know.")], [0], EditSettings(coeff=4.0))
    assert not torch.equal(w_out(bridge, 0), before)


def test_the_dense_mlp_check_looks_at_the_edited_layer(ws):
    """A stack whose later block has no dense W_out (as mixed dense/MoE stacks do): layer 0 edits, layer 2 is refused."""
    bridge = load_model(ws / "model")
    del bridge.blocks[2].mlp.out
    assert w_out_parameter(bridge, 0).shape == (32, 64)
    with pytest.raises(LunarError, match="no dense MLP down-projection \\(W_out\\) in layer 2 to edit .*use a layer with a dense MLP"):
        w_out_parameter(bridge, 2)
