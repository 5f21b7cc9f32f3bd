"""Patches: apply → revert restores the source bit for bit, patches stack and revert in any order,
the wrong base is refused, the orientation is right even for a square W_out, and `lunar-lens export
--edit` agrees with `patch apply`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import folder_hashes, make_checkpoint
from safetensors import safe_open

from lunar_lens import cli
from lunar_lens.artefacts.patched import BASE_TENSORS, apply_patch, revert_patch
from lunar_lens.artefacts.patches import applied, save_patch, show_patch
from lunar_lens.core.atomic import MANIFEST
from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import tokenize
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.edit.layers import WOutEdit
from lunar_lens.model.checkpoint import Checkpoint, tensor_bytes
from lunar_lens.model.load import load_model
from lunar_lens.model.names import resid_post
from lunar_lens.model.weights import add_to_w_out, w_out, w_out_parameter, w_out_tensor_name


def random_edit(bridge, layer: int, seed: int, factored: bool = True) -> WOutEdit:
    """A rank-one edit (with factors) or a full-rank one (delta only) of W_out of `layer`."""
    generator = torch.Generator().manual_seed(seed)
    d_mlp, d_model = w_out(bridge, layer).shape
    u, v = torch.randn(d_mlp, 1, generator=generator), torch.randn(d_model, 1, generator=generator)
    if factored:
        return WOutEdit(layer, w_out_tensor_name(bridge, layer), u @ v.T, u, v)
    return WOutEdit(layer, w_out_tensor_name(bridge, layer), 0.1 * torch.randn(d_mlp, d_model, generator=generator))


def hf_delta(bridge, edit: WOutEdit) -> torch.Tensor:
    """The edit in the checkpoint tensor's own layout."""
    return edit.delta.T if w_out_parameter(bridge, edit.layer).shape != edit.delta.shape else edit.delta


@pytest.mark.parametrize(("family", "dtype", "sharded"), [("llama", torch.float32, True), ("gpt2", torch.bfloat16, False)])
def test_apply_then_revert_restores_the_source(tmp_path, tokenizer_dir, family, dtype, sharded):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, family, dtype=dtype, sharded=sharded)
    before = folder_hashes(src)
    bridge = load_model(src)
    edits = [random_edit(bridge, 1, seed=1), random_edit(bridge, 0, seed=2, factored=False)]
    patch = save_patch(edits, src, tmp_path / "a.safetensors", info={"coeff": 4.0})

    patched = apply_patch(src, patch, tmp_path / "patched")
    source, result = Checkpoint.open(src), Checkpoint.open(patched)
    keys = {source.key(edit.tensor_name): edit for edit in edits}
    for key in source.weight_map:
        if key in keys:
            expected = (source.read(key).float() + hf_delta(bridge, keys[key])).to(dtype)
            assert torch.equal(result.read(key), expected)
        else:
            assert tensor_bytes(result.read(key)) == tensor_bytes(source.read(key))
    assert folder_hashes(src) == before

    # `lunar-lens export --edit` edits the model in memory and exports it: the same tensors, verified
    assert cli.main(["export", "--model", str(src), "--edit", str(patch), "--out", str(tmp_path / "exported")]) == 0
    exported = Checkpoint.open(tmp_path / "exported")
    assert all(torch.equal(exported.read(key), result.read(key)) for key in source.weight_map)
    assert json.loads((tmp_path / "exported" / MANIFEST).read_text())["run"]["patch"]["info"] == {"coeff": 4.0}

    reverted = revert_patch(patched, patch, tmp_path / "reverted")
    assert folder_hashes(reverted) == before


def test_stacked_patches_revert_in_any_order(tmp_path, tokenizer_dir):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir)
    before = folder_hashes(src)
    first = [random_edit(load_model(src), 1, seed=1)]
    patch_a = save_patch(first, src, tmp_path / "a.safetensors")
    only_a = apply_patch(src, patch_a, tmp_path / "A")
    # a sequential request: solved on the patched model, touching layer 1 again and layer 2
    bridge = load_model(only_a)
    second = [random_edit(bridge, 1, seed=3), random_edit(bridge, 2, seed=4, factored=False)]
    patch_b = save_patch(second, only_a, tmp_path / "b.safetensors")
    both = apply_patch(only_a, patch_b, tmp_path / "AB")
    assert [p["file"] for p in show_patch(both)["patches"]] == [
        f"lunar_patches/{show_patch(p)['sha256'][:16]}.safetensors" for p in (patch_a, patch_b)
    ]
    assert show_patch(patch_b)["base_patches"] == [show_patch(patch_a)["sha256"]]
    source, stacked = Checkpoint.open(src), Checkpoint.open(both)
    layer1 = source.key(first[0].tensor_name)
    expected = source.read(layer1) + hf_delta(bridge, first[0]) + hf_delta(bridge, second[0])
    assert torch.equal(stacked.read(layer1), expected)

    # B was solved on top of A: A cannot be reverted from under it, and B cannot go onto the bare base
    with pytest.raises(LunarError, match="b.safetensors was solved on top of patch"):
        revert_patch(both, patch_a, tmp_path / "AB-A")
    with pytest.raises(LunarError, match="was solved on top of patch"):
        apply_patch(src, save_patch([second[1]], only_a, tmp_path / "b2.safetensors"), tmp_path / "B2")
    assert not (tmp_path / "AB-A").exists() and not (tmp_path / "B2").exists()
    # B then A
    assert folder_hashes(revert_patch(both, patch_b, tmp_path / "AB-B")) == folder_hashes(only_a)
    assert folder_hashes(revert_patch(tmp_path / "AB-B", patch_a, tmp_path / "AB-B-A")) == before

    # C was solved on the base, independently of A: stacked on A, either one reverts first
    third = [random_edit(load_model(src), 1, seed=5), random_edit(load_model(src), 2, seed=6, factored=False)]
    patch_c = save_patch(third, src, tmp_path / "c.safetensors")
    both = apply_patch(only_a, patch_c, tmp_path / "AC")
    only_c = Checkpoint.open(revert_patch(both, patch_a, tmp_path / "AC-A"))
    for edit in third:
        key = source.key(edit.tensor_name)
        assert torch.equal(only_c.read(key), source.read(key) + hf_delta(bridge, edit))
    assert [p["sha256"] for p in show_patch(only_c.root)["patches"]] == [show_patch(patch_c)["sha256"]]
    assert (only_c.root / BASE_TENSORS).exists()
    assert folder_hashes(revert_patch(only_c.root, patch_c, tmp_path / "AC-A-C")) == before
    assert folder_hashes(revert_patch(both, patch_c, tmp_path / "AC-C")) == folder_hashes(only_a)


def test_wrong_base_and_misuse_are_refused(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir)
    patch = save_patch([random_edit(load_model(src), 1, seed=1)], src, tmp_path / "a.safetensors")
    other_seed = make_checkpoint(tmp_path / "seed1", tokenizer_dir, seed=1)
    other_shape = make_checkpoint(tmp_path / "wide", tokenizer_dir, intermediate_size=48)
    with pytest.raises(LunarError, match="made for another base"):
        apply_patch(other_seed, patch, tmp_path / "out")
    with pytest.raises(LunarError, match=r"made for a F32 \[32, 64\]"):
        apply_patch(other_shape, patch, tmp_path / "out")
    with pytest.raises(LunarError, match="is not applied"):
        revert_patch(src, patch, tmp_path / "out")
    patched = apply_patch(src, patch, tmp_path / "patched")
    with pytest.raises(LunarError, match="already applied"):
        apply_patch(patched, patch, tmp_path / "out")
    with pytest.raises(LunarError, match="not a lunar-lens patch"):
        apply_patch(src, next(src.glob("model-*.safetensors")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the CLI reports a refusal in one line, and `export --edit` checks the base too
    assert cli.main(["export", "--model", str(other_seed), "--edit", str(patch), "--out", str(tmp_path / "out")]) == 2
    assert "made for another base" in capsys.readouterr().err
    assert cli.main(["patch", "show", str(patched)]) == 0
    assert json.loads(capsys.readouterr().out)["patches"][0]["layers"] == [1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_square_w_out_keeps_its_orientation(tmp_path, tokenizer_dir, family):  # noqa: F811
    """With d_mlp == d_model the shapes cannot tell W_out from W_outᵀ: the model class decides."""
    width = {"gpt2": {"n_inner": 32}, "llama": {"intermediate_size": 32}}[family]
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, family, sharded=False, **width)
    bridge = load_model(src)
    edit = random_edit(bridge, 1, seed=5, factored=False)
    patched = Checkpoint.open(apply_patch(src, save_patch([edit], src, tmp_path / "p.safetensors"), tmp_path / "out"))
    add_to_w_out(bridge, 1, edit.delta)
    assert torch.equal(patched.read(patched.key(edit.tensor_name)), w_out_parameter(bridge, 1).detach())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rank_one_factors_with_the_strides_of_a_transposed_row_are_saved_dense_and_apply_exactly(tmp_path, tokenizer_dir, family):  # noqa: F811
    """Issue #25: the closed form's factors are columns of transposed rows, (n, 1) with stride (1, n), which
    PyTorch counts as contiguous; the patch stores them dense and `patch apply` gives u·vᵀ bit for bit."""
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, family, sharded=False)
    bridge = load_model(src)
    generator = torch.Generator().manual_seed(3)
    d_mlp, d_model = w_out(bridge, 1).shape
    u, v = torch.randn(1, d_mlp, generator=generator).T, torch.randn(1, d_model, generator=generator).T
    assert u.is_contiguous() and v.is_contiguous() and (u.stride(), v.stride()) == ((1, d_mlp), (1, d_model))
    edit = WOutEdit(1, w_out_tensor_name(bridge, 1), u @ v.T, u, v)
    patch = save_patch([edit], src, tmp_path / "p.safetensors")
    with safe_open(patch, framework="pt") as file:
        stored = {key: file.get_tensor(key) for key in file.keys()}
    a, b = (v, u) if w_out_parameter(bridge, 1).shape != edit.delta.shape else (u, v)
    assert torch.equal(stored["0.a"], a) and torch.equal(stored["0.b"], b)
    assert [t["rank"] for t in show_patch(patch)["tensors"]] == [1]
    patched = Checkpoint.open(apply_patch(src, patch, tmp_path / "out"))
    key = patched.key(edit.tensor_name)
    assert tensor_bytes(patched.read(key)) == tensor_bytes(Checkpoint.open(src).read(key) + hf_delta(bridge, edit))


def test_show_patch_describes_each_tensor(tmp_path, tokenizer_dir):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, "gpt2")
    bridge = load_model(src)
    edits = [random_edit(bridge, 2, seed=1), random_edit(bridge, 0, seed=2, factored=False)]
    shown = show_patch(save_patch(edits, src, tmp_path / "p.safetensors", info={"solver": "closed"}))
    assert [(t["tensor"], t["layer"], t["rank"], t["dtype"], t["shape"]) for t in shown["tensors"]] == [
        ("transformer.h.2.mlp.c_proj.weight", 2, 1, "F32", [128, 32]),
        ("transformer.h.0.mlp.c_proj.weight", 0, None, "F32", [128, 32]),
    ]
    assert [t["delta_norm"] for t in shown["tensors"]] == pytest.approx([float(e.delta.norm()) for e in edits])
    assert shown["info"] == {"solver": "closed"}


def test_apply_scale_goes_from_the_base_to_the_edit_and_reverts_exactly(tmp_path, tokenizer_dir):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, sharded=False)
    before = folder_hashes(src)
    bridge = load_model(src)
    edit = random_edit(bridge, 1, seed=1)
    patch = save_patch([edit], src, tmp_path / "p.safetensors")
    key = Checkpoint.open(src).key(edit.tensor_name)
    base = Checkpoint.open(src).read(key)
    written = {}
    for scale in (0.0, 0.5, 1.0):
        out = tmp_path / f"scale-{scale}"
        assert cli.main(["patch", "apply", str(src), str(patch), "--scale", str(scale), "--out", str(out)]) == 0
        assert [p["scale"] for p in show_patch(out)["patches"]] == [scale]
        written[scale] = Checkpoint.open(out).read(key)
        assert folder_hashes(revert_patch(out, patch, tmp_path / f"reverted-{scale}")) == before  # revert stays exact
    assert tensor_bytes(written[0.0]) == tensor_bytes(base)  # scale 0: the base, bit for bit
    assert folder_hashes(tmp_path / "scale-0.0")["model.safetensors"] == before["model.safetensors"]
    assert torch.equal(written[1.0], Checkpoint.open(apply_patch(src, patch, tmp_path / "plain")).read(key))
    assert torch.equal(written[0.5], base + 0.5 * hf_delta(bridge, edit))  # halfway: ΔW·0.5
    assert (written[0.5] - base).abs().max() == pytest.approx(0.5 * float((written[1.0] - base).abs().max()), rel=1e-5)
    with pytest.raises(LunarError, match="not a finite number"):
        apply_patch(src, patch, tmp_path / "nan", scale=float("nan"))


def test_applied_edits_and_steering_leave_the_live_model_as_it_was(tmp_path, tokenizer_dir):  # noqa: F811
    src = make_checkpoint(tmp_path / "src", tokenizer_dir, sharded=False)
    bridge = load_model(src)
    params = {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}
    ids = tokenize(bridge.tokenizer, ["What is the capital of France?"]).input_ids
    with torch.no_grad():
        clean = bridge(ids)
    edit = random_edit(bridge, 1, seed=1)
    patch = save_patch([edit], src, tmp_path / "p.safetensors")
    with applied(bridge, patch, scale=0.5), torch.no_grad():
        key = Checkpoint.open(src).key(edit.tensor_name)
        assert torch.equal(w_out_parameter(bridge, 1), Checkpoint.open(src).read(key) + 0.5 * hf_delta(bridge, edit))
        assert (bridge(ids) - clean).abs().max() > 1e-3
    with pytest.raises(KeyboardInterrupt), applied(bridge, [edit]):  # restored even when the block fails
        raise KeyboardInterrupt
    directions = Directions(torch.randn(3, 32))
    seen = []
    with applied(bridge, directions, scale=2.0, layers=[1]), torch.no_grad():
        steered = bridge.run_with_hooks(ids, fwd_hooks=[(resid_post(1), lambda act, hook: seen.append(act))])
    with torch.no_grad():
        _, unsteered = bridge.run_with_cache(ids, names_filter=[resid_post(1)])
        assert torch.allclose(seen[0], unsteered[resid_post(1)] + 2.0 * directions[1], atol=1e-5)
        assert (steered - clean).abs().max() > 1e-3
        assert torch.equal(bridge(ids), clean)
    assert all(torch.equal(p, params[name]) for name, p in bridge.original_model.named_parameters())
