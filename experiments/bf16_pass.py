"""One refinement step's host memory and time on a half-precision model on the CPU: the rise of peak RSS over
the model at rest, and the seconds of `--steps` steps (32 rows, 24 answer tokens), with or without oneDNN and
with or without lunar-lens's contiguous unembedding input (`model._contiguous_input`). Prints one JSON line.

    .venv/bin/python experiments/bench_memory.py --sizes 45M --dtypes bfloat16 --auto-up-to 0   # builds the model
    .venv/bin/python experiments/bf16_pass.py --model /tmp/lunar-bench-memory/llama-45M-bfloat16
    .venv/bin/python experiments/bf16_pass.py --model /tmp/lunar-bench-memory/llama-45M-bfloat16 --strided-unembedding
    .venv/bin/python experiments/bf16_pass.py --model /tmp/lunar-bench-memory/llama-45M-bfloat16 --no-onednn
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lunar_lens.data.prompts import first_answer_tokens, tokenize
from lunar_lens.edit.refine import backward_answer_loss, frozen
from lunar_lens.model.load import load_model
from lunar_lens.model.weights import delta_hooks, w_out
from lunar_lens.toy.world import build_world


def status(field: str) -> int:
    """A /proc/self/status field in MB."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field)) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a half-precision checkpoint (bench_memory.py builds them)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-onednn", action="store_true", help="torch.backends.mkldnn off")
    parser.add_argument("--strided-unembedding", action="store_true", help="without lunar-lens's contiguous unembedding input")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = not args.no_onednn
    bridge = load_model(args.model, dtype=args.dtype)
    if args.strided_unembedding:
        bridge.reset_hooks(including_permanent=True)
    world = build_world(0)
    _, retain, _ = world.split(world.entities[:1])
    rows = first_answer_tokens(tokenize(bridge.tokenizer, [qa.question for qa in retain[:32]], [qa.answer for qa in retain[:32]]), 24,
                               bridge.tokenizer.pad_token_id)
    delta = torch.nn.Parameter(torch.zeros_like(w_out(bridge, 1)).float())
    with torch.no_grad():
        bridge.original_model(rows.input_ids[:1])  # kernels warmed, the weights paged in
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    rest, started = status("VmRSS"), time.perf_counter()
    with frozen(bridge.original_model), torch.enable_grad():
        for _ in range(args.steps):
            backward_answer_loss(bridge, rows, lambda: delta_hooks({1: delta}))
    print(json.dumps({"model": args.model, "dtype": args.dtype, "onednn": not args.no_onednn, "contiguous_unembedding": not args.strided_unembedding,
                      "rest_mb": rest, "peak_rise_mb": status("VmHWM") - rest, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
