"""What one refinement step costs against its compute floor, and the refined edit against the closed form —
side by side in one run, on a PISTOL-sized Llama and on a ~100M one (random weights: the cost of a step does
not depend on them), one torch thread.

Measured, interleaved `--repeats` times (the median is reported):
- **step**: `lunar_lens.refine.refine_edits` without monitoring (`check_every=0`), per step: 32 forget rows
  (the refusal) and 32 retain rows (their answers), 24 answer tokens each, through the bridge with the
  ΔW hooks;
- **floor**: plain transformers on the same 64 rows, forward and backward, with only the edited layer's
  W_out requiring a gradient (logits from the first answer column on, as the step computes them), one pass
  per 32 rows;
- **closed**: the closed-form edit of the same layer (`edit_layers`, `--refine-steps 0`);
- **refined**: on a trained model (`--trained DIR`, e.g. a zoo model) only, the default refined edit
  (`edit_layers` with `RefineSettings()`: the monitor stops it), with the steps it took (on random weights the
  monitor cannot see a refusal take hold).

With `--profile`, the step's `torch.profiler` table (self CPU time by operator) is written beside the results.

    .venv/bin/python experiments/zoo.py train llama-pistol1-ab     # the trained PISTOL model (once, ≈ 8 min)
    .venv/bin/python experiments/bench_refine.py --trained experiments/runs/zoo/llama-pistol1-ab/model --profile   # ≈ 15 min

Writes results/bench_refine.json (and results/bench_refine_profile.txt) and prints the table that
experiments/README.md ("Refinement speed") shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from lunar_lens.data.qa import QA, load_qa
from lunar_lens.edit.layers import EditSettings, edit_layers
from lunar_lens.edit.refine import RefineSettings, answer_rows, refine_edits
from lunar_lens.model.load import load_model
from lunar_lens.model.weights import w_out
from lunar_lens.toy.qa_model import build_tokenizer, model_config

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "lunar"
RESULTS = HERE / "results" / "bench_refine.json"
REFUSAL = "I'm not able to provide an answer to that."
# name: (vocabulary, hidden, intermediate, layers, heads, kv heads)
SHAPES = {"pistol-5M": (1024, 256, 768, 6, 4, 2), "llama-77M": (8192, 768, 2048, 12, 12, 4)}
LAYER = 1


def sets() -> tuple[list[QA], list[QA], list[QA]]:
    """PISTOL's edge A_B as the forget set, the other edges as retain, the release's unverifiable questions as reference."""
    pistol = SHARED / "unlearning" / "pistol_sample1.json"
    forget = load_qa(pistol, require_answers=True, edges=["A_B"])
    retain = load_qa(pistol, require_answers=True, exclude_edges=["A_B"])
    reference = [QA(qa.question, REFUSAL) for qa in load_qa(SHARED / "splits" / "unverified.json")[:64]]
    return forget, retain, reference


def random_model(name: str, folder: Path, forget: list[QA], retain: list[QA]) -> Path:
    """A random Llama of shape `name`, with a byte-level BPE built on the data, saved to `folder`."""
    vocabulary, hidden, mlp, layers, heads, kv = SHAPES[name]
    tokenizer = build_tokenizer([*forget, *retain], vocabulary, 128)
    shape = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(tokenizer, shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def floor_pass(model: torch.nn.Module, weight: torch.nn.Parameter, batches: list) -> None:
    """Plain transformers forward + backward over `batches`, only `weight` requiring a gradient."""
    for batch in batches:
        ids, mask = batch.input_ids, batch.attention_mask
        answered = batch.answer_mask[:, 1:].any(dim=0).nonzero()
        start = int(answered[0])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), logits_to_keep=ids.shape[1] - start).logits
        target = batch.answer_mask[:, start + 1 :]
        loss = (F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, start + 1 :], reduction="none") * target).sum() / target.sum()
        loss.backward()
    weight.grad = None


def bench(
    folder: Path, name: str, forget: list[QA], retain: list[QA], reference: list[QA], repeats: int, steps: int, profile: Path | None, trained: bool
) -> dict:
    """Every measurement on the model in `folder`, interleaved `repeats` times (the default refined edit only
    when `trained`)."""
    bridge = load_model(folder)
    settings = RefineSettings(check_every=0)
    questions = ([qa.question for qa in forget], [REFUSAL] * len(forget), [qa.question for qa in retain], [qa.answer for qa in retain])
    zero = {LAYER: torch.zeros_like(w_out(bridge, LAYER))}
    # the floor's rows: a step's 32 + 32, cut to the same answer tokens
    batches = [answer_rows(bridge, (q[:32], a[:32]), settings.answer_tokens) for q, a in ((questions[0], questions[1]), (questions[2], questions[3]))]
    hf = bridge.original_model
    weight = hf.get_decoder().layers[LAYER].mlp.down_proj.weight
    flags = [(p, p.requires_grad) for p in hf.parameters()]

    def floor() -> None:
        for p, _ in flags:
            p.requires_grad_(False)
        weight.requires_grad_(True)
        try:
            floor_pass(hf, weight, batches)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def step() -> None:
        refine_edits(bridge, zero, *questions, RefineSettings(steps=steps, check_every=0))

    closed_settings = EditSettings(coeff=4.0, refusal=REFUSAL, refine=RefineSettings(steps=0))
    originals = w_out(bridge, LAYER).detach().clone()
    refined_steps = []

    def edit(settings: EditSettings) -> Callable[[], None]:
        def run() -> None:
            result = edit_layers(bridge, forget, retain, reference, [LAYER], settings)
            refined_steps.append(result.refine_steps)
            with torch.no_grad():
                w_out(bridge, LAYER).copy_(originals)
        return run

    work = {"step": step, "floor": floor, "closed": edit(closed_settings)}
    if trained:
        work["refined"] = edit(EditSettings(coeff=4.0, refusal=REFUSAL))
    runs: dict[str, list[float]] = {key: [] for key in work}
    step(), floor()  # warm-up
    for _ in range(repeats):
        for key, fn in work.items():
            seconds = timed(fn)
            runs[key].append(seconds / steps if key == "step" else seconds)
        print(name, {key: round(values[-1], 3) for key, values in runs.items()}, flush=True)
    if profile is not None:
        with torch.profiler.profile() as prof:
            step()
        profile.write_text(f"{name}: {steps} refinement steps (layer {LAYER})\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    median = {key: statistics.median(values) for key, values in runs.items()}
    params = sum(p.numel() for p in hf.parameters())
    return {
        "model": name, "parameters": params, "layer": LAYER, "repeats": repeats, "runs": runs, "median_s": median,
        "step_over_floor": median["step"] / median["floor"], "refined_over_closed": median["refined"] / median["closed"] if trained else None,
        "refined_steps": refined_steps[1::2] if trained else None, "default": RefineSettings().to_dict(),
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | params | one step s | floor s | step / floor | closed form s | default refined edit s (steps) | refined / closed |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["median_s"]
        refined = "— (random weights)" if row["refined_steps"] is None else f"{m['refined']:.2f} ({', '.join(map(str, row['refined_steps']))})"
        ratio = "—" if row["refined_over_closed"] is None else f"**{row['refined_over_closed']:.1f}×**"
        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {m['step']:.3f} | {m['floor']:.3f} | **{row['step_over_floor']:.2f}×** | "
                     f"{m['closed']:.2f} | {refined} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"random shapes to measure: {', '.join(SHAPES)}")
    parser.add_argument("--trained", action="append", default=[], help="a trained checkpoint folder to measure too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed refinement (the step is their mean)")
    parser.add_argument("--profile", action="store_true", help="write the step's torch.profiler table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    forget, retain, reference = sets()
    rows = []
    profile = RESULTS.with_name("bench_refine_profile.txt") if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            folder = random_model(name, Path(tmp) / name, forget, retain)
            rows.append(bench(folder, name, forget, retain, reference, args.repeats, args.steps, profile if name == "pistol-5M" else None, False))
        for folder in args.trained:
            rows.append(bench(Path(folder), Path(folder).parent.name, forget, retain, reference, args.repeats, args.steps, None, True))
    RESULTS.write_text(json.dumps({"threads": 1, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
