"""Export: untouched tensors byte-identical, the edited W_out as in memory, dtype and files kept,
a plain-transformers reload equal to the in-memory model; atomic, refusing and loud on failure."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import folder_hashes, make_checkpoint
from transformers import AutoModelForCausalLM

import lunar_lens.artefacts.export as export_module
import lunar_lens.artefacts.verification as verification_module
import lunar_lens.core.atomic as outputs_module
from lunar_lens.artefacts.export import export_checkpoint
from lunar_lens.artefacts.patched import BASE_TENSORS, revert_patch
from lunar_lens.core.atomic import MANIFEST
from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import tokenize
from lunar_lens.model.checkpoint import CARD_FILE, PATCH_DIR, PATCH_FILE, Checkpoint, file_sha256, tensor_bytes
from lunar_lens.model.load import SOURCES, load_model
from lunar_lens.model.weights import add_to_w_out, w_out, w_out_parameter, w_out_tensor_name

PROMPTS = ["What is the capital of France?", "Who wrote Hamlet?"]
CARRIED = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json"}


def edit_randomly(bridge, layers: list[int], seed: int = 1) -> None:
    torch.manual_seed(seed)
    for layer in layers:
        add_to_w_out(bridge, layer, 0.2 * torch.randn(w_out(bridge, layer).shape))


@torch.no_grad()
def max_logit_diff(model_a, model_b, tokenizer) -> float:
    batch = tokenize(tokenizer, PROMPTS)
    real = batch.attention_mask.bool()
    a, b = (m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[real] for m in (model_a, model_b))
    return float((a - b).abs().max())


CASES = [  # family, sharded, source dtype, in-memory dtype, tied embeddings, edited layers
    ("gpt2", True, torch.float32, "float32", True, [0, 2]),
    ("llama", False, torch.bfloat16, "bfloat16", False, [1]),
    ("qwen2", True, torch.bfloat16, "float32", True, [1]),
    ("gemma", True, torch.float32, "float32", False, [2]),
    ("gemma", False, torch.bfloat16, "bfloat16", True, [1]),
    ("mistral", False, torch.float32, "float32", True, [0]),
    ("mistral", True, torch.bfloat16, "bfloat16", False, [0, 1]),
]


def case_id(case: tuple) -> str:
    family, sharded, source_dtype, dtype, tie, layers = case
    source = str(source_dtype).removeprefix("torch.")
    return f"{family}-{'sharded' if sharded else 'single'}-{source}-as-{dtype}-{'tied' if tie else 'untied'}"


@pytest.mark.parametrize(("family", "sharded", "source_dtype", "dtype", "tie", "layers"), CASES, ids=map(case_id, CASES))
def test_round_trip(tmp_path, tokenizer_dir, family, sharded, source_dtype, dtype, tie, layers):
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, family, dtype=source_dtype, sharded=sharded, tie=tie)
    before = folder_hashes(src)
    bridge = load_model(src, dtype=dtype)
    edit_randomly(bridge, layers)
    in_memory = {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}
    result = export_checkpoint(bridge, tmp_path / "out", layers, manifest={"coeff": 4.0})
    out = tmp_path / "out"
    # the verification released the in-memory weights for the reload and gave them back bit for bit
    assert all(torch.equal(p, in_memory[name]) for name, p in bridge.original_model.named_parameters())

    assert folder_hashes(src) == before
    after = folder_hashes(out)
    patch_copy = f"{PATCH_DIR}/{file_sha256(out / PATCH_FILE)[:16]}.safetensors"
    assert CARRIED <= set(before) and set(after) == set(before) | {MANIFEST, CARD_FILE, PATCH_FILE, BASE_TENSORS, patch_copy}
    source, exported = Checkpoint.open(src), Checkpoint.open(out)
    edited = {source.key(w_out_tensor_name(bridge, layer)): layer for layer in layers}
    assert result.rewritten_files == sorted({source.weight_map[key] for key in edited})
    assert len(result.rewritten_files) == (len(layers) if sharded else 1)
    assert {rel for rel in before if after[rel] != before[rel]} == set(result.rewritten_files)
    for key in source.weight_map:
        old, new = source.read(key), exported.read(key)
        assert new.dtype == old.dtype == source_dtype and new.shape == old.shape
        if key in edited:
            assert torch.equal(new, w_out_parameter(bridge, edited[key]).detach().to(source_dtype))
            assert not torch.equal(new, old)
        else:
            assert tensor_bytes(new) == tensor_bytes(old)

    record = json.loads((out / MANIFEST).read_text())
    assert record["source"]["sha256"] == before and record["source"]["skipped_weight_files"] == []
    assert [t["tensor"] for t in record["edited_tensors"]] == list(edited) and record["layers"] == layers
    assert record["run"] == {"coeff": 4.0} and record["versions"]["torch"] == torch.__version__
    check = record["verification"]
    assert check["edited_tensors_exact"] and check["max_abs_logit_diff"] <= (1e-4 if dtype == "float32" else 1e-2)

    # independent check: plain transformers, default settings, in the in-memory dtype
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=bridge.original_model.dtype)
    diff = max_logit_diff(reloaded, bridge.original_model, bridge.tokenizer)
    rounded = source_dtype != bridge.original_model.dtype
    if rounded:  # the file holds W_out rounded to bf16: the difference is the rounding, as recorded
        assert check["rounding_max_abs_logit_change"] > 0 and record["edited_tensors"][0]["cast_relative_error"] > 0
        assert diff == pytest.approx(check["rounding_max_abs_logit_change"], abs=1e-4)
    else:
        assert check["rounding_max_abs_logit_change"] == 0
        assert diff <= (1e-4 if dtype == "float32" else 2e-2)

    # the export is its source with the export's patch applied: reverting it gives the source back, file for file
    assert [p["sha256"] for p in record["patches"]] == [file_sha256(out / PATCH_FILE)] and record["patches"][0]["replaced"] == []
    assert folder_hashes(revert_patch(out, out / PATCH_FILE, tmp_path / "base-again")) == before


@pytest.fixture
def edited_llama(tmp_path, tokenizer_dir):
    src = make_checkpoint(tmp_path / "src", tokenizer_dir)
    bridge = load_model(src)
    edit_randomly(bridge, [1])
    return src, bridge


def test_refuses_non_empty_out_unless_force(tmp_path, edited_llama):
    _, bridge = edited_llama
    out = tmp_path / "out"
    out.mkdir()
    export_checkpoint(bridge, out, [1], verify=False)  # an empty folder is fine
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(LunarError, match="already exists: pass force"):
        export_checkpoint(bridge, out, [1], verify=False)
    assert (out / "mine.txt").read_text() == "keep me"
    export_checkpoint(bridge, out, [1], force=True)
    assert not (out / "mine.txt").exists() and (out / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_refuses_out_overlapping_source(tmp_path, edited_llama):
    src, bridge = edited_llama
    before = folder_hashes(src)
    for out in (src, src / "export", tmp_path):
        with pytest.raises(LunarError, match="overlaps the source"):
            export_checkpoint(bridge, out, [1], force=True)
    assert folder_hashes(src) == before


@pytest.mark.parametrize("where", ["verification", "rename"])
def test_interrupted_export_leaves_no_folder(tmp_path, edited_llama, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "verification":
        monkeypatch.setattr(export_module, "verify_export", interrupt)
    else:
        monkeypatch.setattr(outputs_module.os, "replace", interrupt)  # the atomic rename
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(edited_llama[1], tmp_path / "out", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("chunk", [verification_module.READ_CHUNK_BYTES, 40])  # 40 bytes: many reads per tensor
def test_verification_fails_loudly(tmp_path, edited_llama, monkeypatch, chunk):
    monkeypatch.setattr(verification_module, "READ_CHUNK_BYTES", chunk)
    _, bridge = edited_llama
    edit_randomly(bridge, [0], seed=2)  # layer 0 edited too, but not declared
    with pytest.raises(LunarError, match="verification failed"):
        export_checkpoint(bridge, tmp_path / "out", [1])
    assert not (tmp_path / "out").exists()
    assert export_checkpoint(bridge, tmp_path / "out", [0, 1]).verification["max_abs_logit_diff"] <= 1e-4


def test_the_reload_runs_while_the_in_memory_weights_are_released(tmp_path, edited_llama, monkeypatch):
    _, bridge = edited_llama
    held = []
    real_load = AutoModelForCausalLM.from_pretrained

    class Counting:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            held.append(sum(p.numel() for p in bridge.original_model.parameters()))
            return real_load(*args, **kwargs)

    monkeypatch.setattr(verification_module, "AutoModelForCausalLM", Counting)
    total = sum(p.numel() for p in bridge.original_model.parameters())
    result = export_checkpoint(bridge, tmp_path / "out", [1])
    assert held == [0]  # no weight in the model while the folder is reloaded (the edited W_out held apart)
    assert sum(p.numel() for p in bridge.original_model.parameters()) == total
    assert result.verification["tensors_checked"] == len(Checkpoint.open(tmp_path / "out").weight_map)


def test_after_the_export_the_weights_are_mapped_from_it_copy_on_write(tmp_path, edited_llama):
    _, bridge = edited_llama
    before = {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}
    export_checkpoint(bridge, tmp_path / "out", [1])
    written = Checkpoint.open(tmp_path / "out")
    sizes = {(tmp_path / "out" / rel).stat().st_size for rel in written.weight_files}
    edited = w_out_parameter(bridge, 1)
    mapped = [p for p in bridge.original_model.parameters() if p is not edited]
    assert all(p.untyped_storage().nbytes() in sizes for p in mapped)  # a view of a whole file, not a copy read in
    assert edited.untyped_storage().nbytes() == edited.numel() * edited.element_size()  # held apart, its own copy
    hashes = folder_hashes(tmp_path / "out")
    with torch.no_grad():
        mapped[0].zero_()  # copy-on-write: the file keeps its bytes
        mapped[0].copy_(before[next(name for name, p in bridge.original_model.named_parameters() if p is mapped[0])])
    assert folder_hashes(tmp_path / "out") == hashes
    assert all(torch.equal(p, before[name]) for name, p in bridge.original_model.named_parameters())


def test_a_model_on_a_device_map_is_verified_on_that_map(tmp_path, edited_llama):
    src, edited = edited_llama
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk"}  # accelerate's dispatch, on the CPU
    bridge = load_model(src, device_map=device_map)
    add_to_w_out(bridge, 1, w_out(edited, 1) - w_out(bridge, 1))
    in_memory = {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}
    result = export_checkpoint(bridge, tmp_path / "out", [1])
    assert result.verification["device_map"] and result.verification["max_abs_logit_diff"] <= 1e-4
    assert all(torch.equal(p, in_memory[name]) for name, p in bridge.original_model.named_parameters() if not p.is_meta)
    assert max_logit_diff(bridge.original_model, edited.original_model, bridge.tokenizer) <= 1e-5  # still the edited model


def test_verification_catches_a_hook_left_on_the_model(tmp_path, edited_llama):
    _, bridge = edited_llama
    handle = bridge.original_model.lm_head.register_forward_hook(lambda module, inputs, output: output + 0.5)
    try:
        with pytest.raises(LunarError, match="logits differ"):  # every tensor equal: the reload's logits tell
            export_checkpoint(bridge, tmp_path / "out", [1])
    finally:
        handle.remove()
    assert not (tmp_path / "out").exists()


def test_skips_stale_weights_and_writes_extra_files(tmp_path, edited_llama):
    src, bridge = edited_llama
    (src / "pytorch_model.bin").write_bytes(b"not unpickled")
    (src / "original").mkdir()
    (src / "original" / "consolidated.safetensors").write_bytes(b"stale")
    (src / "original" / "params.json").write_text("{}")
    result = export_checkpoint(bridge, tmp_path / "out", [1], extra_files={"lunar_report.json": {"ok": True}})
    assert result.manifest["source"]["skipped_weight_files"] == ["original/consolidated.safetensors", "pytorch_model.bin"]
    assert (tmp_path / "out" / "original" / "params.json").exists() and not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert json.loads((tmp_path / "out" / "lunar_report.json").read_text()) == {"ok": True}


def test_refuses_sources_it_cannot_read_safely(tmp_path, edited_llama):
    _, bridge = edited_llama
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    SOURCES[bridge] = str(pickled)
    with pytest.raises(LunarError, match="never unpickles"):
        export_checkpoint(bridge, tmp_path / "out", [1])
    SOURCES[bridge] = "lunar-lens-tests/not-a-cached-model"
    with pytest.raises(LunarError, match="Hugging Face cache"):
        export_checkpoint(bridge, tmp_path / "out", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "src"]
