"""Benchmark: lunar-lens's edit against the released LUNAR procedure on the toy world, same model, same
forget / retain / reference prompts, same objective; then scaling with the number of prompts, and the
localisation sweep's cost relative to one edit.

    .venv/bin/python experiments/bench_edit.py [--repeats 3] [--scaled-repeats 3] [--scales 1,4,16]
                                               [--release-scales 1,4] [--layer 4] [--threads 1]

- **release**: `experiments/release_recipe.py` — directions in batches of 32 through the full model, then
  six full-depth passes at batch size 1 (three per forget prompt, three per retain prompt), then 20 epochs
  of AdamW (lr 1e-2, ExponentialLR 0.9, batches of 64 rows), c = 2 on every forget position.
- **lens**: `compute_directions` (batched, stopped after the edited layer) and `edit_layers` with the release's objective
  (`positions="all"`, c = 2, retain prompts without answers): batched passes truncated at the edited layer,
  streamed statistics, the exact solver.
- **floor**: the compute floor of the lens passes — the same prompts, pre-tokenised, through the plain HF
  model's blocks 0..layer and nothing else (fastest of batch sizes 32, 128, 512); release / floor bounds the
  speed-up any implementation that reads these activations can reach on this machine.
- **localise**: `localise`'s rule (what `--layer auto --coeff auto` runs: every probe on every layer,
  the edit check) and the `localise` report (plus the figure-only probes) against one edit made with the
  default `EditSettings` at the chosen layer and c (directions included), 1× only.

At scale k every set is repeated k times. Each measurement runs in a fresh subprocess (`--worker`): the
model is loaded and its path runs once on two prompts of each set (one-time initialisation is neither timed
nor counted); then the RSS is the baseline, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`
← 5) and the peak (`VmHWM`) is read after the edit, so "peak memory" is the edit's own memory above the
loaded model. Identical timed runs still differ by up to ~15% in peak RSS, and glibc's heap fragmentation grows
with the number of batches, so the memory target is judged on separate untimed `lens-memory` runs with a 64 KiB
mmap threshold (every large buffer is returned to the kernel when freed: the peak is the live memory).
Writes experiments/results/bench_edit.json and figures/bench_edit.png, and prints markdown tables (medians
over repeats; the speed-up is the median of the ratios of repeats run back to back).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "bench_edit.json"
FIGURE = ROOT / "figures" / "bench_edit.png"
PHASES = ("directions", "collect", "solve")
# A fixed mmap threshold stops glibc from moving it at run time (one source of run-to-run variation in peak
# RSS); 4 MiB leaves the timings unchanged (64 KiB steadied the peak but made edits 2.5x slower).
WORKER_ENV = {"TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
# Memory runs ("lens-memory"): every allocation above 64 KiB gets its own mmap and goes back to the kernel when
# freed, so the peak RSS is the live memory, without the heap fragmentation that grows with the number of
# batches under the 4 MiB threshold; edits run ~2.5x slower, so these runs are not timed.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}
FLOOR_BATCH_SIZES = (32, 128, 512)
RELEASE_OBJECTIVE = dict(positions="all", coeff=2.0, retain_answers=False)  # what the released recipe fits (no refinement)


# ---------------------------------------------------------------- memory (in the worker)

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} is missing from /proc/self/status")


def measured(fn: Callable[[], object]) -> tuple[object, dict]:
    """Run `fn`; return its result and its wall time and peak RSS above the RSS before it (MB)."""
    gc.collect()
    baseline = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        method = "VmHWM after reset"
    except OSError:
        method = "ru_maxrss (includes model loading)"
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result, {"seconds_total": seconds, "baseline_mb": baseline, "peak_mb": peak - baseline, "memory_method": method}


# ---------------------------------------------------------------- workers

def toy_sets(entities: int, scale: int) -> tuple[list, list, list]:
    from lunar_lens.toy.world import build_world

    world = build_world(0)
    forget, retain, reference = world.split(world.entities[:entities])
    return forget * scale, retain * scale, reference * scale


def worker_release(layer: int, forget: list, retain: list, reference: list) -> dict:
    from release_recipe import run_release
    from transformers import AutoModelForCausalLM

    from lunar_lens.edit.solvers import solve_closed
    from lunar_lens.model.load import load_tokenizer
    from lunar_lens.toy.world import checkpoint_path

    tokenizer = load_tokenizer(checkpoint_path())
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(), dtype=torch.float32).eval()
    questions = [[qa.question for qa in items] for items in (forget, retain, reference)]
    run_release(model, tokenizer, layer, *(q[:2] for q in questions))  # warm-up; the model is not changed
    run, info = measured(lambda: run_release(model, tokenizer, layer, *questions, coeff=RELEASE_OBJECTIVE["coeff"]))
    exact = solve_closed(run.statistics, RELEASE_OBJECTIVE["coeff"] * run.direction[None])  # same rows, not timed
    return {**info, "seconds": run.seconds, "objective_before": run.solution.objective_before,
            "objective_after": run.solution.objective_after, "rows": run.statistics.n_rows,
            "shifted_rows": run.statistics.n_shifted, "target_error": run.target_error,
            "exact_objective_on_these_rows": exact.objective_after, "direction": run.direction.tolist()}


def warm_up(bridge, layer: int, settings, forget: list, retain: list, reference: list) -> None:
    """One edit on two prompts of each set, then undone."""
    from lunar_lens.edit.layers import edit_layers
    from lunar_lens.model.weights import w_out

    original = w_out(bridge, layer).detach().clone()
    edit_layers(bridge, forget[:2], retain[:2], reference[:2], [layer], settings)
    with torch.no_grad():
        w_out(bridge, layer).copy_(original)


def worker_lens(layer: int, forget: list, retain: list, reference: list) -> dict:
    from lunar_lens.directions.mean_difference import compute_directions
    from lunar_lens.edit.layers import EditSettings, edit_layers
    from lunar_lens.edit.refine import RefineSettings
    from lunar_lens.model.load import load_model
    from lunar_lens.toy.world import checkpoint_path

    bridge = load_model(checkpoint_path())
    settings = EditSettings(**RELEASE_OBJECTIVE, refine=RefineSettings(steps=0))

    def edit(forget: list, retain: list, reference: list) -> dict:
        started = time.perf_counter()
        directions = compute_directions(
            bridge, [qa.question for qa in forget], [qa.question for qa in reference], batch_size=settings.batch_size,
            deepest_layer=layer,
        )
        seconds_directions = time.perf_counter() - started
        report = edit_layers(bridge, forget, retain, reference, [layer], settings, directions=directions).layers[0]
        return {"seconds": {"directions": seconds_directions, "collect": report.seconds_collect, "solve": report.seconds_solve},
                "objective_before": report.objective_before, "objective_after": report.objective_after,
                "rows": report.rows, "shifted_rows": report.shifted_rows, "direction": directions[layer].tolist()}

    warm_up(bridge, layer, settings, forget, retain, reference)
    result, info = measured(lambda: edit(forget, retain, reference))
    return {**info, **result}


def worker_localise(layer: int, forget: list, retain: list, reference: list) -> dict:
    from lunar_lens.choose.probes import LocaliseSettings, localise
    from lunar_lens.edit.layers import EditSettings, edit_layers
    from lunar_lens.edit.refine import RefineSettings
    from lunar_lens.model.load import load_model
    from lunar_lens.toy.world import checkpoint_path

    bridge = load_model(checkpoint_path())
    warm_up(bridge, layer, EditSettings(coeff=4.0, refine=RefineSettings(steps=0)), forget, retain, reference)
    started = time.perf_counter()
    probed = localise(bridge, forget, retain, reference)  # the probes' rule
    layers, coeff = [probed.best_layer], probed.best_coeff  # (--layer auto runs lunar_lens.choose.choice: bench_choice.py)
    chosen = time.perf_counter()
    # the `localise` report: every probe at every c, for the figures
    loc = localise(bridge, forget, retain, reference, settings=LocaliseSettings(figure_probes=True))
    localised = time.perf_counter()
    edit_layers(bridge, forget, retain, reference, layers, EditSettings(coeff=coeff, refine=RefineSettings(steps=0)))
    edited = time.perf_counter()
    return {"seconds_localise": chosen - started, "seconds_localise_report": localised - chosen, "seconds_edit": edited - localised,
            "best_layer": layers[0], "best_coeff": coeff, "report_agrees": (loc.best_layer, loc.best_coeff) == (layers[0], coeff)}


def worker_floor(layer: int, forget: list, retain: list, reference: list) -> dict:
    """The compute floor of lunar-lens's passes on this machine: the same prompts, tokenised before the clock
    starts into length-sorted batches, through the plain HF model's blocks 0..layer only (no bridge, no hook
    but the one that stops the pass, nothing read or kept); the fastest of three batch sizes. An implementation
    that reads these activations is not faster."""
    from release_recipe import decoder_layers
    from transformers import AutoModelForCausalLM

    from lunar_lens.directions.activations import token_batches
    from lunar_lens.model.load import load_tokenizer
    from lunar_lens.toy.world import checkpoint_path

    tokenizer = load_tokenizer(checkpoint_path())
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(), dtype=torch.float32).eval()

    def batches(items: list, size: int) -> list:
        return list(token_batches(tokenizer, [qa.question for qa in items], batch_size=size, by_length=True))

    class Stop(Exception):
        pass

    def stop(*_) -> None:
        raise Stop

    @torch.no_grad()
    def run(batches: list) -> None:
        for batch in batches:
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            except Stop:
                pass

    decoder_layers(model)[layer].register_forward_hook(stop)
    seconds = {}
    for size in FLOOR_BATCH_SIZES:
        passes = [batch for items in (reference, forget, forget, retain) for batch in batches(items, size)]  # directions, edit rows
        run(passes[:2])  # warm-up
        seconds[size] = measured(lambda: run(passes))[1]["seconds_total"]
    return {"seconds_floor": min(seconds.values()), "seconds_by_batch_size": seconds}


WORKERS = {"release": worker_release, "lens": worker_lens, "lens-memory": worker_lens, "localise": worker_localise, "floor": worker_floor}


def run_worker(variant: str, scale: int, args: argparse.Namespace) -> dict:
    """One measurement in a fresh interpreter (its last stdout line is the JSON result)."""
    command = [sys.executable, __file__, "--worker", variant, "--scale", str(scale), "--layer", str(args.layer),
               "--entities", str(args.entities), "--threads", str(args.threads)]
    env = {**os.environ, **WORKER_ENV, **(MEMORY_ENV if variant.endswith("-memory") else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {variant} ×{scale} failed:\n{done.stderr[-3000:]}")
    return {"variant": variant, "scale": scale, **json.loads(done.stdout.strip().splitlines()[-1])}


# ---------------------------------------------------------------- summary

def median_of(runs: list[dict], get: Callable[[dict], float]) -> float:
    return statistics.median(get(run) for run in runs)


def summarise(runs: list[dict], n_prompts: int) -> dict:
    """Medians per (variant, scale), the 1× comparison, the scaling checks and the localisation ratio."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["scale"]), []).append(run)
    cells = {}
    for (variant, scale), group in sorted(groups.items()):
        if variant in ("localise", "floor"):
            continue
        cells[f"{variant} x{scale}"] = {
            "variant": variant, "scale": scale, "prompts": n_prompts * scale, "repeats": len(group),
            **{f"seconds_{phase}": median_of(group, lambda r, p=phase: r["seconds"][p]) for phase in PHASES},
            "seconds_total": median_of(group, lambda r: r["seconds_total"]),
            "peak_mb": median_of(group, lambda r: r["peak_mb"]),
            "peak_mb_range": [min(r["peak_mb"] for r in group), max(r["peak_mb"] for r in group)],
            "baseline_mb": median_of(group, lambda r: r["baseline_mb"]),
            "objective_before": group[0]["objective_before"],
            "objective_after": median_of(group, lambda r: r["objective_after"]),
            "rows": group[0]["rows"],
        }
    release, lens = groups[("release", 1)], groups[("lens", 1)]
    lens_scales = sorted(scale for variant, scale in groups if variant == "lens")
    memory_scales = sorted(scale for variant, scale in groups if variant == "lens-memory")
    lens_peak = [cells[f"lens-memory x{s}"]["peak_mb"] for s in memory_scales]
    timed_peak = [cells[f"lens x{s}"]["peak_mb"] for s in lens_scales]
    lens_time = [cells[f"lens x{s}"]["seconds_total"] for s in lens_scales]
    localise = groups.get(("localise", 1), [])
    floor = groups.get(("floor", 1), [])
    summary = {
        "speedup_1x": cells["release x1"]["seconds_total"] / cells["lens x1"]["seconds_total"],
        # repeat i of each variant ran back to back, under about the same load
        "speedup_1x_paired": statistics.median(r["seconds_total"] / l["seconds_total"] for r, l in zip(release, lens)),
        "speedup_edit_1x": sum(cells["release x1"][f"seconds_{p}"] for p in PHASES[1:])
        / sum(cells["lens x1"][f"seconds_{p}"] for p in PHASES[1:]),  # collect + solve: the part the directions do not share
        "speedup_per_phase_1x": {p: cells["release x1"][f"seconds_{p}"] / cells["lens x1"][f"seconds_{p}"] for p in PHASES},
        "objective_release": cells["release x1"]["objective_after"],
        "objective_lens": cells["lens x1"]["objective_after"],
        "objective_exact_on_release_rows": median_of(release, lambda r: r["exact_objective_on_these_rows"]),
        "direction_max_abs_difference": max(abs(a - b) for a, b in zip(release[0]["direction"], lens[0]["direction"])),
        "release_target_error": max(r["target_error"] for r in release),
        "lens_peak_spread": (max(lens_peak) - min(lens_peak)) / min(lens_peak) if lens_peak else None,  # live memory
        "lens_peak_spread_timed_runs": (max(timed_peak) - min(timed_peak)) / min(timed_peak),  # RSS with fragmentation
        "lens_seconds_per_prompt": {s: t / (n_prompts * s) for s, t in zip(lens_scales, lens_time)},
    }
    if floor:
        seconds_floor = median_of(floor, lambda r: r["seconds_floor"])
        summary["floor"] = {
            "seconds_floor": seconds_floor, "lens_over_floor": cells["lens x1"]["seconds_total"] / seconds_floor,
            "speedup_ceiling_1x": cells["release x1"]["seconds_total"] / seconds_floor,
        }
    if localise:
        edit = median_of(localise, lambda r: r["seconds_edit"])
        summary["localise"] = {
            "seconds_localise": median_of(localise, lambda r: r["seconds_localise"]), "seconds_default_edit": edit,
            "ratio_to_default_edit": median_of(localise, lambda r: r["seconds_localise"]) / edit,
            "ratio_per_repeat": [r["seconds_localise"] / r["seconds_edit"] for r in localise],
            "ratio_to_release_edit": median_of(localise, lambda r: r["seconds_localise"]) / cells["release x1"]["seconds_total"],
            "seconds_localise_report": median_of(localise, lambda r: r["seconds_localise_report"]),
            "report_ratio_to_default_edit": median_of(localise, lambda r: r["seconds_localise_report"]) / edit,
            "report_agrees": all(r["report_agrees"] for r in localise),
            "choice": [(r["best_layer"], r["best_coeff"]) for r in localise],
        }
    summary["targets"] = {
        "speedup >= 50": summary["speedup_1x_paired"] >= 50,
        "objective lens <= release": summary["objective_lens"] <= summary["objective_release"],
        **({"lens peak memory within 10% over scales": summary["lens_peak_spread"] <= 0.10} if lens_peak else {}),
        **({"localise <= 10x one edit": summary["localise"]["ratio_to_default_edit"] <= 10} if localise else {}),
    }
    return {"cells": cells, "summary": summary}


def print_tables(result: dict) -> None:
    cells, summary = result["cells"], result["summary"]
    print("\n| variant | scale | prompts | repeats | directions s | collect s | solve s | total s | peak MB (min-max) "
          "| objective after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells.values():
        low, high = cell["peak_mb_range"]
        print(f"| {cell['variant']} | {cell['scale']}x | {cell['prompts']} | {cell['repeats']} | "
              f"{cell['seconds_directions']:.3f} | {cell['seconds_collect']:.3f} | {cell['seconds_solve']:.3f} | {cell['seconds_total']:.2f} | "
              f"{cell['peak_mb']:.1f} ({low:.1f}-{high:.1f}) | {cell['objective_after']:.4f} |")
    phases = ", ".join(f"{p} {v:.1f}x" for p, v in summary["speedup_per_phase_1x"].items())
    print(f"\nspeed-up at 1x: {summary['speedup_1x']:.1f}x (median of paired repeats {summary['speedup_1x_paired']:.1f}x); "
          f"collect + solve {summary['speedup_edit_1x']:.1f}x (per phase: {phases})")
    print(f"objective after (MSE per element): release AdamW {summary['objective_release']:.4f}, lens exact "
          f"{summary['objective_lens']:.4f}, exact on the release's rows {summary['objective_exact_on_release_rows']:.4f}")
    live = "–" if summary["lens_peak_spread"] is None else f"{100 * summary['lens_peak_spread']:.1f}%"
    print(f"lens peak memory spread over scales: live {live} (lens-memory runs), RSS of the timed runs "
          f"{100 * summary['lens_peak_spread_timed_runs']:.1f}%; seconds per prompt: "
          + ", ".join(f"{s}x {v * 1000:.2f} ms" for s, v in summary["lens_seconds_per_prompt"].items()))
    if "floor" in summary:
        floor = summary["floor"]
        print(f"compute floor (the same batches through the plain HF blocks, nothing else): {floor['seconds_floor']:.2f} s; lunar-lens "
              f"takes {floor['lens_over_floor']:.2f}x the floor; a path at the floor would be {floor['speedup_ceiling_1x']:.1f}x faster "
              "than the release")
    if "localise" in summary:
        loc = summary["localise"]
        print(f"localisation (--layer auto --coeff auto) {loc['seconds_localise']:.1f} s = {loc['ratio_to_default_edit']:.1f}x one "
              f"default edit ({loc['seconds_default_edit']:.2f} s), {loc['ratio_to_release_edit']:.2f}x one release edit; the "
              f"`localise` report with every figure probe {loc['seconds_localise_report']:.1f} s = {loc['report_ratio_to_default_edit']:.1f}x "
              f"(same choice: {loc['report_agrees']})")
    print("targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in summary["targets"].items()))


def plot(result: dict) -> Path:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from lunar_lens.core.figures import new_figure, save

    cells, summary = result["cells"], result["summary"]
    figure, axes = new_figure(1, 3, panel=(4.6, 3.6))
    colours = {"release": "tab:red", "lens": "tab:blue", "lens-memory": "tab:green"}
    names = {"release": "released recipe", "lens": "lunar-lens", "lens-memory": "lunar-lens, live memory (64 KiB mmap threshold)"}
    ax = axes[0, 0]
    labels = [*PHASES, "total"]
    for offset, variant in ((-0.2, "release"), (0.2, "lens")):
        cell = cells[f"{variant} x1"]
        values = [cell[f"seconds_{p}"] for p in labels]
        ax.bar([i + offset for i in range(len(labels))], values, width=0.4, color=colours[variant], label=names[variant])
    if "floor" in summary:
        ax.bar([len(labels)], [summary["floor"]["seconds_floor"]], width=0.4, color="tab:olive", label="compute floor of the lens passes")
        labels.append("floor")
    if "localise" in summary:
        loc = summary["localise"]
        ax.bar([len(labels) - 0.2], [loc["seconds_default_edit"]], width=0.4, color="tab:cyan", label="lunar-lens, default edit")
        ax.bar([len(labels) + 0.2], [loc["seconds_localise"]], width=0.4, color="tab:grey", label="localisation sweep")
        labels.append("localise\nvs edit")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"One edit, 1x: {summary['speedup_1x_paired']:.0f}x faster "
                 f"({summary['speedup_edit_1x']:.0f}x without directions)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    panels = ((axes[0, 1], "seconds_total", "seconds (median)", "Time vs number of prompts", "log"),
              (axes[0, 2], "peak_mb", "MB above the loaded model", "Peak memory vs number of prompts", "linear"))
    for ax, key, ylabel, title, yscale in panels:
        for variant in ("release", "lens") + (("lens-memory",) if key == "peak_mb" else ()):
            if not any(c["variant"] == variant for c in cells.values()):
                continue
            points = sorted((c["prompts"], c[key], c["peak_mb_range"]) for c in cells.values() if c["variant"] == variant)
            x, y, ranges = zip(*points)
            ax.plot(x, y, marker="o", color=colours[variant], label=names[variant])
            if key == "peak_mb":  # min-max over repeats
                ax.vlines(x, [lo for lo, _ in ranges], [hi for _, hi in ranges], color=colours[variant], alpha=0.5)
        ax.set_xscale("log")
        ax.set_yscale(yscale)
        prompts = sorted({c["prompts"] for c in cells.values()})
        ax.set_xticks(prompts, [str(p) for p in prompts], minor=False)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("prompts (forget + retain + reference)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("lunar-lens vs the released LUNAR recipe (same rows, same objective; CPU)")
    return save(figure, FIGURE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every 1x measurement")
    parser.add_argument("--scaled-repeats", type=int, default=3, help="repeats of lunar-lens above 1x (the release: once)")
    parser.add_argument("--scales", default="1,4,16", help="prompt multipliers for lunar-lens")
    parser.add_argument("--release-scales", default="1,4", help="prompt multipliers for the released recipe (slow)")
    parser.add_argument("--no-localise", action="store_true", help="skip the localisation sweep")
    parser.add_argument("--memory-repeats", type=int, default=1, help="untimed live-memory runs of lunar-lens per scale")
    parser.add_argument("--layer", type=int, default=4, help="edited layer (4: the deepest the release can edit)")
    parser.add_argument("--entities", type=int, default=2, help="forget the first N entities")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the results go (the figure is drawn only for the default)")
    parser.add_argument("--plot-only", action="store_true", help=f"redraw the figure from {RESULTS.name}, measuring nothing")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = WORKERS[args.worker](args.layer, *toy_sets(args.entities, args.scale))
        print(json.dumps(result))
        return
    if args.plot_only:
        print(f"wrote {plot(json.loads(RESULTS.read_text()))}")
        return

    scales = [int(s) for s in args.scales.split(",")]
    release_scales = [int(s) for s in args.release_scales.split(",")]
    jobs = []
    for repeat in range(max(args.repeats, args.scaled_repeats)):  # interleaved: load changes hit every variant alike
        for scale in sorted(set(scales) | set(release_scales)):
            if repeat >= (args.repeats if scale == 1 else args.scaled_repeats):
                continue
            if scale in release_scales and (scale == 1 or repeat == 0):  # the release above 1x once: it is slow
                jobs.append(("release", scale))
            if scale in scales:
                jobs.append(("lens", scale))
            if scale == 1 and not args.no_localise:
                jobs.append(("localise", 1))
            if scale == 1:
                jobs.append(("floor", 1))
    jobs += [("lens-memory", scale) for scale in scales for _ in range(args.memory_repeats)]
    started = time.perf_counter()
    runs = []
    for number, (variant, scale) in enumerate(jobs, 1):
        run = run_worker(variant, scale, args)
        runs.append(run)
        took = run.get("seconds_total", run.get("seconds_floor", run.get("seconds_localise", 0.0) + run.get("seconds_edit", 0.0)))
        print(f"[{number}/{len(jobs)}] {variant} x{scale}: {took:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    n_prompts = sum(len(s) for s in toy_sets(args.entities, 1))
    result = summarise(runs, n_prompts)
    result["machine"] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads": args.threads, "load_average_end": os.getloadavg(),
        "seconds_benchmark": time.perf_counter() - started,
    }
    result["settings"] = vars(args)
    result["runs"] = [{k: v for k, v in run.items() if k != "direction"} for run in runs]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=str))
    print_tables(result)
    figure = f" and {plot(result)}" if args.results == RESULTS else ""
    print(f"wrote {args.results}{figure} ({result['machine']['seconds_benchmark']:.0f} s)")


if __name__ == "__main__":
    main()
