"""Data parallelism (two gloo processes on CPU make the same edit as one process) and device maps."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_hf_model
from safetensors.torch import load_file

from lunar_lens.cli import build_parser
from lunar_lens.cli.arguments import parse_device_map
from lunar_lens.core.distributed import SINGLE, DataParallel, init_from_env
from lunar_lens.core.errors import LunarError
from lunar_lens.core.settings import RunSettings
from lunar_lens.data.prompts import tokenize
from lunar_lens.directions.mean_difference import compute_directions
from lunar_lens.edit.layers import EditSettings, collect_statistics, edit_layers
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.model.load import load_model, load_tokenizer, wrap_hf_model
from lunar_lens.model.names import mlp_post, resid_post
from lunar_lens.model.weights import add_to_w_out, w_out
from lunar_lens.pipeline.unlearn import unlearn
from lunar_lens.toy.world import build_world, checkpoint_path

WORLD_SIZE = 2
LAYERS = [1, 2]


def qa_sets():
    """Odd-sized sets, so the two shards differ in size."""
    world = build_world(0)
    forget, retain, reference = world.split(world.entities[:2])
    return forget[:9], retain[::60], reference[:11]


def edit_once(parallel: DataParallel) -> dict:
    """Directions and ΔW of LAYERS on a tiny random Llama, each rank running its shard."""
    tokenizer = load_tokenizer(checkpoint_path())
    bridge = wrap_hf_model(tiny_hf_model("llama", len(tokenizer)), tokenizer)
    forget, retain, reference = qa_sets()
    settings = EditSettings(coeff=4.0, batch_size=4, refusal="I don't know.", refine=RefineSettings(steps=0))  # a random model declines nothing
    result = edit_layers(bridge, forget, retain, reference, LAYERS, settings, parallel=parallel)
    # one forget prompt: the second rank's shard is empty
    lonely = compute_directions(bridge, [forget[0].question], [qa.question for qa in reference], refusal="I don't know.", parallel=parallel)
    rows = collect_statistics(bridge, [1], forget, retain, EditSettings(), "I don't know.", keep_rows=True, parallel=parallel)[0]
    return {
        "directions": result.directions.vectors,
        "answer_directions": result.directions.answer_vectors,
        "deltas": [edit.delta for edit in result.edits],
        "lonely": lonely.answer_vectors,
        "gram": rows.gram,
        "rows": torch.cat(rows.rows),
        "n_rows": rows.n_rows,
    }


def _rank(rank: int, port: int, out_dir: Path) -> None:
    """One process of the launch, with the environment torchrun would give it."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    parallel = init_from_env()
    try:
        out = edit_once(parallel)
        forget, retain, reference = qa_sets()
        # the pipeline finds the process group itself; only rank 0 exports
        outcome = unlearn(checkpoint_path(), forget, retain, reference, out_dir / "model", [2],
                          EditSettings(coeff=4.0, batch_size=8, refine=RefineSettings(steps=0)), RunSettings(progress=False))
        out.update(out_dir=outcome.out_dir and str(outcome.out_dir), w_out=w_out(outcome.bridge, 2).detach().clone(), processes=outcome.report["processes"])
        torch.save(out, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(out_dir: Path, timeout: float = 120.0) -> list[dict]:
    context = mp.start_processes(_rank, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} processes did not finish in {timeout:.0f} s (a collective is waiting)")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One launch of WORLD_SIZE processes (forked: they inherit the imports) for the tests below."""
    out_dir = tmp_path_factory.mktemp("ranks")
    return out_dir, run_ranks(out_dir)


def test_two_gloo_processes_make_the_edit_of_one(launch):
    _, ranks = launch
    single = edit_once(SINGLE)
    for out in ranks:
        assert relative(out["directions"], single["directions"]) <= 1e-6
        assert relative(out["answer_directions"], single["answer_directions"]) <= 1e-6
        assert relative(out["lonely"], single["lonely"]) <= 1e-6
        for delta, expected in zip(out["deltas"], single["deltas"]):
            assert relative(delta, expected) <= 1e-6
        assert relative(out["gram"], single["gram"]) <= 1e-6
        # kept rows (AdamW solver) are gathered: the same rows, in another order
        assert out["n_rows"] == single["n_rows"] == len(out["rows"])
        assert relative(out["rows"].double().T @ out["rows"].double(), single["gram"]) <= 1e-6
    # every rank holds the same edited model: bitwise equal edits
    for delta0, delta1 in zip(ranks[0]["deltas"], ranks[1]["deltas"]):
        assert torch.equal(delta0, delta1)
    assert all(delta.norm() > 0 for delta in single["deltas"])


def test_unlearn_under_two_processes_exports_once(launch):
    tmp_path, ranks = launch
    assert ranks[0]["out_dir"] == str(tmp_path / "model") and ranks[1]["out_dir"] is None
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))["model.layers.2.mlp.down_proj.weight"]
    source = load_file(str(checkpoint_path() / "model.safetensors"))["model.layers.2.mlp.down_proj.weight"]
    assert not torch.equal(exported, source)
    for out in ranks:
        assert torch.equal(out["w_out"], exported.T) and out["processes"] == WORLD_SIZE
    report = json.loads((tmp_path / "model" / "lunar_report.json").read_text())
    assert report["processes"] == WORLD_SIZE and report["sizes"]["forget"] == 9


def test_single_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == SINGLE
    items = list(range(7))
    assert SINGLE.shard(items) == items and SINGLE.is_main
    tensor = torch.arange(3.0)
    assert SINGLE.sum(tensor) is tensor and SINGLE.gather("x") == ["x"]
    assert SINGLE.device("cuda") == "cuda" and SINGLE.max_memory("auto") is None
    shards = [DataParallel(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert not DataParallel(1, 3).is_main


def test_device_map_cli_values():
    args = build_parser("unlearn").parse_args(
        ["unlearn", "--model", "m", "--forget", "f", "--retain", "r", "--reference", "x", "--out", "o", "--device-map", "auto", "--batch-size", "4"]
    )
    assert args.device_map == "auto" and args.batch_size == 4
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    with pytest.raises(LunarError, match="--device-map is not valid JSON"):
        parse_device_map("{model.layers.0: 0}")


def test_device_map_keeps_hooks_and_refuses_to_edit_offloaded_layers():
    """accelerate dispatch on CPU: layers 3-5 offloaded to disk (weights on the meta device)."""
    plain = load_model(checkpoint_path())
    names = [resid_post(5), mlp_post(4), mlp_post(1)]
    batch = tokenize(plain.tokenizer, ["Where does Mivi Mibek live?", "What pet does Saul Veith have?"])
    _, expected = plain.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names)
    layers = {f"model.layers.{i}": "cpu" if i < 3 else "disk" for i in range(6)}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", **layers}
    for bridge in (load_model(checkpoint_path(), device_map="auto"), load_model(checkpoint_path(), device_map=device_map)):
        _, cache = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=names)
        for name in names:
            assert torch.equal(cache[name], expected[name]), name
    assert bridge.cfg.n_devices == 2 and w_out(bridge, 4).is_meta
    add_to_w_out(bridge, 1, torch.ones_like(w_out(plain, 1)))
    assert torch.equal(w_out(bridge, 1), w_out(plain, 1) + 1)
    with pytest.raises(LunarError, match="layer 4 is offloaded to disk"):
        add_to_w_out(bridge, 4, torch.ones_like(w_out(plain, 4)))
