"""GPU timing of lunar-lens's edit at Llama-3-8B layer shapes (d_model 4096, d_mlp 14336, 32 heads of 128,
8 KV heads), random weights, a few layers, the toy world's prompts (forget + retain, ×`--repeat`).

    python experiments/bench_gpu.py                                                    # cuda, 4 layers, bf16 + fp32
    python experiments/bench_gpu.py --device cpu --layers 1 --d-model 256 --d-mlp 896   # smoke test on a CPU

The last layer is edited. Per model dtype it times, after one warm-up batch:
- **collect**: `edit.collect_statistics` as shipped (batched passes truncated at the layer on the device,
  float64 statistics accumulated on the CPU);
- **forward** and **stats on device**: the same passes (`activations.capture`) with the same statistics
  (`EditStatistics.add`) kept on the device, timed apart;
- **solve**: `solvers.solve_closed` as shipped (CPU, float64), and the same ridge solve with
  `torch.linalg.solve` on the device's statistics in float64 and float32 (its agreement with the CPU solve
  is printed as the largest relative difference of u);
- **release passes**: the released recipe's batch-size-1 gathering (`release_recipe.one_pass`, three full-depth
  passes per prompt) on `--release-prompts` prompts, scaled to all prompts, and lunar-lens's speed-up on
  collection (forward + statistics on device) against it.
Prints a markdown table and writes experiments/results/bench_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from release_recipe import decoder_layers, one_pass
from transformers import LlamaConfig, LlamaForCausalLM

from lunar_lens.directions.activations import capture, shift_index, token_batches
from lunar_lens.edit.layers import EditSettings, collect_statistics
from lunar_lens.edit.solvers import EditStatistics, solve_closed
from lunar_lens.model.load import load_tokenizer, parse_dtype, wrap_hf_model
from lunar_lens.model.names import mlp_post
from lunar_lens.toy.world import build_world, checkpoint_path

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "bench_gpu.json"
HEAD_DIM = 128
COLUMNS = (  # header, key of a result row, format
    ("dtype", "dtype", "{}"), ("rows", "rows", "{}"), ("collect s (shipped)", "seconds_collect", "{:.3f}"),
    ("forward s", "seconds_forward", "{:.3f}"), ("stats on device s", "seconds_stats_on_device", "{:.3f}"),
    ("release passes s (est.)", "seconds_release_passes_estimate", "{:.2f}"),
    ("collect speed-up", "collect_speedup_vs_release", "{:.0f}x"), ("solve CPU f64 s", "seconds_solve_cpu_f64", "{:.3f}"),
    ("solve device f64 s", "seconds_solve_device_float64", "{:.3f}"),
    ("solve device f32 s", "seconds_solve_device_float32", "{:.3f}"), ("u rel. diff f32", "u_difference_float32", "{:.1e}"),
    ("forward tokens/s", "tokens_per_second_forward", "{:.0f}"), ("peak device GB", "peak_device_gb", "{:.1f}"),
)


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable) -> tuple[object, float]:
    synchronise(device)
    started = time.perf_counter()
    result = fn()
    synchronise(device)
    return result, time.perf_counter() - started


def build_model(args: argparse.Namespace, tokenizer, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random Llama with Llama-3-8B's layer shapes (the embedding uses the toy tokenizer's vocabulary)."""
    heads = max(1, args.d_model // HEAD_DIM)
    config = LlamaConfig(
        hidden_size=args.d_model, intermediate_size=args.d_mlp, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=HEAD_DIM,
        vocab_size=len(tokenizer), max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def device_pass(bridge, layer: int, batches: list, shift_rule: str, device: str) -> tuple[EditStatistics, float, float]:
    """The truncated passes with the statistics kept on `device`: (statistics, forward s, statistics s)."""
    d_mlp = bridge.cfg.d_mlp
    stats = EditStatistics(
        torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=device),
        torch.zeros(1, d_mlp, dtype=torch.float64, device=device),
        torch.zeros(1, dtype=torch.long, device=device),
    )
    forward = accumulate = 0.0
    for batch, shifted in batches:
        x, seconds = timed(device, lambda: capture(bridge, batch, [mlp_post(layer)], stop_at_layer=layer + 1)[mlp_post(layer)])
        forward += seconds
        real = batch.attention_mask.bool().to(device)
        ids = shift_index(batch, shift_rule).to(device) if shifted else torch.full(real.shape, -1, device=device)
        _, seconds = timed(device, lambda: stats.add(x[real], ids[real]))
        accumulate += seconds
    return stats, forward, accumulate


def device_solve(stats: EditStatistics, ridge: float, dtype: torch.dtype) -> torch.Tensor:
    """u = (G + λI)⁻¹ Sᵀ on the statistics' device in `dtype` (what `solve_closed` does on the CPU in float64)."""
    gram = stats.gram.to(dtype)
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(len(gram), dtype=dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, stats.shifted_sums.to(dtype).T)


def bench_dtype(args: argparse.Namespace, tokenizer, forget: list, retain: list, dtype_name: str) -> dict:
    dtype = parse_dtype(dtype_name)
    bridge = wrap_hf_model(build_model(args, tokenizer, dtype), tokenizer)
    layer = args.layers - 1
    settings = EditSettings(positions="all", coeff=2.0, retain_answers=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    collect_statistics(bridge, [layer], forget[:2], retain[:2], settings, "")  # warm-up
    stats, seconds_collect = timed(args.device, lambda: collect_statistics(bridge, [layer], forget, retain, settings, "")[0])  # noqa: F821 (called before the del below)
    batches = [(b, True) for b in token_batches(tokenizer, [qa.question for qa in forget], batch_size=settings.batch_size)]
    batches += [(b, False) for b in token_batches(tokenizer, [qa.question for qa in retain], batch_size=settings.batch_size)]
    device_stats, seconds_forward, seconds_stats = device_pass(bridge, layer, batches, settings.positions, args.device)
    unit_shift = torch.ones(1, bridge.cfg.d_model)  # u does not depend on the shift
    solution, seconds_solve_cpu = timed("cpu", lambda: solve_closed(stats, unit_shift, settings.ridge))
    row = {
        "dtype": dtype_name, "rows": stats.n_rows, "layers_run": layer + 1,
        "seconds_collect": seconds_collect, "seconds_forward": seconds_forward, "seconds_stats_on_device": seconds_stats,
        "seconds_solve_cpu_f64": seconds_solve_cpu,
        "tokens_per_second_forward": stats.n_rows / seconds_forward,
        "gram_difference": float((device_stats.gram.cpu() - stats.gram).abs().max() / stats.gram.abs().max()),
    }
    for solve_dtype in (torch.float64, torch.float32):
        u, seconds = timed(args.device, lambda: device_solve(device_stats, settings.ridge, solve_dtype))
        name = str(solve_dtype).removeprefix("torch.")
        row[f"seconds_solve_device_{name}"] = seconds
        exact = solution.u.double()
        row[f"u_difference_{name}"] = float((u.double().cpu() - exact).abs().max() / exact.abs().max())
    del bridge
    row["seconds_release_passes_estimate"] = release_passes(args, tokenizer, dtype, forget, retain)
    row["collect_speedup_vs_release"] = row["seconds_release_passes_estimate"] / (seconds_forward + seconds_stats)
    row["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return row


def release_passes(args: argparse.Namespace, tokenizer, dtype: torch.dtype, forget: list, retain: list) -> float:
    """The released recipe's activation gathering (`release_recipe.one_pass`: batch size 1, full depth, three
    passes per prompt) on a plain HF copy of the model, timed on `--release-prompts` prompts spread over both
    sets and scaled to all of them (seconds)."""
    model = build_model(args, tokenizer, dtype)
    block = decoder_layers(model)[args.layers - 1]
    passes = ((block, False), (block.post_attention_layernorm, True), (block.mlp.down_proj, True))
    questions = [qa.question for qa in forget + retain]
    sample = questions[:: max(1, len(questions) // args.release_prompts)][: args.release_prompts]
    one_pass(model, tokenizer, sample[:2], block.mlp.down_proj, True)  # warm-up
    _, seconds = timed(args.device, lambda: [one_pass(model, tokenizer, sample, module, on_input) for module, on_input in passes])
    return seconds * len(questions) / len(sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the last one is edited)")
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-mlp", type=int, default=14336)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the toy world's prompts N times")
    parser.add_argument("--release-prompts", type=int, default=64, help="prompts timed with the release's passes")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(checkpoint_path())
    world = build_world(0)
    forget, retain, _ = world.split(world.entities[:2])
    forget, retain = forget * args.repeat, retain * args.repeat
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{machine}; d_model {args.d_model}, d_mlp {args.d_mlp}, {args.layers} layers; "
          f"{len(forget)} forget + {len(retain)} retain prompts")
    rows = [bench_dtype(args, tokenizer, forget, retain, name) for name in args.dtypes.split(",")]
    print("\n| " + " | ".join(header for header, _, _ in COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join("-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
