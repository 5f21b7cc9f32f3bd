"""Host memory of `lunar-lens unlearn`, phase by phase, against a plain Hugging Face load of the same
checkpoint — on randomly initialised Llamas of growing size (built from configs, saved as 4 safetensors
shards), fp32 and bf16, in one run.

Each measured command runs in its own process: its peak RSS is the kernel's (`wait4`'s ru_maxrss); its
phases are the stage lines `unlearn` prints (load, refusal, directions, edit or choice, export with its
verification), each phase's peak the highest RSS sampled (every 10 ms) while it ran. The reference is a
plain Hugging Face user of the checkpoint: `AutoModelForCausalLM.from_pretrained(folder, dtype=...)` and one
forward pass, in a fresh Python (torch and transformers imported, as lunar-lens imports them). The load alone
is recorded too, but it is no reference: transformers maps safetensors lazily, so before a forward pass most
weights are not resident (170M fp32: 392 MB after the load, 920 MB after one forward). Prompts: the toy world's (16 forget, 48 retain, 32 reference), the
refusal given (`--refusal`), `--refine-steps 2` (refinement's memory does not grow with steps).
With `--device cuda` the model runs on the GPU (the reference moves it there too) and each process also
reports its peak device memory (`torch.cuda.max_memory_allocated`, MB: `device_peak_mb`).
Writes results/bench_memory.json and figures/bench_memory.png and prints a markdown table.

    .venv/bin/python experiments/bench_memory.py                          # every size, fixed layer and auto
    .venv/bin/python experiments/bench_memory.py --sizes 45M --dtypes float32
    .venv/bin/python experiments/bench_memory.py --from-results            # the table and figure again, from the JSON
    python experiments/bench_memory.py --device cuda --sizes 1.1B --dtypes bfloat16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
# name: (hidden, intermediate, layers, heads, kv heads); vocabulary 32,000, untied embeddings
SIZES = {
    "45M": (512, 1376, 4, 8, 8),
    "170M": (1024, 2816, 8, 16, 16),
    "1.1B": (2048, 5632, 22, 32, 4),
}
AUTO_UP_TO = 200e6  # `--layer auto` screens every layer set: on a 2-core CPU only the smaller models
PHASES = {  # the stage line's start → phase
    "loaded the model": "load", "the model's own refusal": "refusal", "directions from": "directions",
    "edit of W_out": "edit", "choosing the layer": "choice", "export to": "export",
}
DEVICE_PEAK = "peak device memory (bytes):"  # the last line of a measured process (`--device cuda`)
REPORT_DEVICE_PEAK = f"import torch; print({DEVICE_PEAK!r}, torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)"
UNLEARN = "import sys; from lunar_lens.cli.main import main; code = main(sys.argv[1:]); " + REPORT_DEVICE_PEAK + "; sys.exit(code)"


def build(name: str, dtype: str, folder: Path) -> dict:
    """A random Llama of size `name` saved in `dtype` as 4 shards with the toy world's tokenizer (once)."""
    if not (folder / "config.json").exists():
        code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from lunar_lens.toy.world import checkpoint_path
hidden, mlp, layers, heads, kv = {SIZES[name]!r}
config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(getattr(torch, {dtype!r}))
size = sum(p.numel() * p.element_size() for p in model.parameters())
model.save_pretrained({str(folder)!r}, max_shard_size=size // 4 + 1)
AutoTokenizer.from_pretrained(checkpoint_path()).save_pretrained({str(folder)!r})
"""
        subprocess.run([sys.executable, "-c", code], check=True)
    files = list(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    hidden, mlp, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return {"bytes": sum(f.stat().st_size for f in files), "shards": len(files), "layers": layers, "d_model": hidden, "d_mlp": mlp}


def measure(command: list[str], log: Path) -> dict:
    """Run `command`; its peak RSS (MB), each phase's sampled peak (MB), seconds, and the peak device memory it
    printed (MB; None when it printed none)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    phases: dict[str, float] = {}
    current = {"peak": 0.0}
    lines: list[str] = []

    def sample() -> None:
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                break
            current["peak"] = max(current["peak"], rss / 1024)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        lines.append(line)
        phase = next((key for start, key in PHASES.items() if line.startswith(start)), None)
        if phase:
            phases[phase] = max(phases.get(phase, 0.0), current["peak"])
            current["peak"] = 0.0
    _, status, usage = os.wait4(process.pid, 0)
    log.write_text("".join(lines))
    if status != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed; see {log}:\n{''.join(lines[-20:])}")
    device = next((int(line.split(":")[1]) / 2**20 for line in lines if line.startswith(DEVICE_PEAK)), None)
    return {"peak_mb": usage.ru_maxrss / 1024, "phases_mb": phases, "seconds": time.perf_counter() - started, "device_peak_mb": device}


def write_sets(folder: Path, scale: int = 1) -> dict[str, Path]:
    """The toy world's prompts: 16 forget, 48 retain (with answers), 32 reference (questions only), × `scale`."""
    from lunar_lens.toy.world import build_world

    world = build_world(0)
    forget, retain, reference = world.split(world.entities[: 1 + (scale > 1) * (16 * scale // 24)])
    sets = {"forget": forget[: 16 * scale], "retain": retain[:: max(1, len(retain) // (48 * scale))][: 48 * scale], "reference": reference[: 32 * scale]}
    paths = {}
    for name, items in sets.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps([{"question": qa.question} | ({"answer": qa.answer} if name == "retain" else {}) for qa in items]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"of {', '.join(SIZES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--work", default="/tmp/lunar-bench-memory", help="where the random checkpoints and outputs go")
    parser.add_argument("--auto-up-to", type=float, default=AUTO_UP_TO, help="largest model (parameters) also run with --layer auto")
    parser.add_argument("--skip", default="", help="size:dtype pairs to leave out, e.g. 1.1B:float32")
    parser.add_argument("--name", default="bench_memory")
    parser.add_argument("--scale", type=int, default=1, help="prompts × this (memory should not grow with them)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: also the peak device memory of each process")
    parser.add_argument("--from-results", action="store_true", help="only the table and the figure, from results/NAME.json")
    args = parser.parse_args()
    if args.from_results:
        rows = json.loads((HERE / "results" / f"{args.name}.json").read_text())
        print(table(rows))
        plot(rows, HERE.parent / "figures" / f"{args.name}.png")
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = write_sets(work, args.scale)
    data = ["--forget", str(sets["forget"]), "--retain", str(sets["retain"]), "--reference", str(sets["reference"])]
    rows = []
    for name in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            if f"{name}:{dtype}" in args.skip.split(","):
                continue
            folder = work / f"llama-{name}-{dtype}"
            row = {"size": name, "dtype": dtype, "device": args.device, "prompt_scale": args.scale,
                   "prompts": {k: len(json.loads(v.read_text())) for k, v in sets.items()}, **build(name, dtype, folder)}
            row["parameters"] = row["bytes"] // (4 if dtype == "float32" else 2)
            load = (f"import torch, transformers; model = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, "
                    f"dtype=torch.{dtype}).to({args.device!r})")
            row["hf_load_only"] = measure([sys.executable, "-c", f"{load}; {REPORT_DEVICE_PEAK}"], work / f"{folder.name}-hf-load.log")
            use = f"{load}; torch.set_grad_enabled(False); model(torch.tensor([[1, 2, 3, 4]], device={args.device!r})); {REPORT_DEVICE_PEAK}"
            row["hf_load"] = measure([sys.executable, "-c", use], work / f"{folder.name}-hf.log")
            runs = {"fixed": ["--layer", str(row["layers"] // 2), "--coeff", "4"]}
            if row["parameters"] <= args.auto_up_to:
                runs["auto"] = ["--layer", "auto", "--coeff", "auto"]
            for run, flags in runs.items():
                command = [sys.executable, "-c", UNLEARN, "unlearn", "--model", str(folder), *data, "--out", str(work / f"{folder.name}-{run}"),
                           *flags, "--refusal", "I don't know.", "--refine-steps", "2", "--dtype", dtype, "--device", args.device, "--force"]
                row[run] = measure(command, work / f"{folder.name}-{run}.log")
                row[run]["ratio"] = row[run]["peak_mb"] / row["hf_load"]["peak_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    plot(rows, HERE.parent / "figures" / f"{args.name}.png")


def table(rows: list[dict]) -> str:
    phases = ("load", "directions", "edit", "export")
    lines = ["| model | weights MB | HF load (+ forward) MB | " + " | ".join(f"{p} MB" for p in phases)
             + " | unlearn --out MB (× HF) | --layer auto MB (× HF) |", "|---" * (5 + len(phases)) + "|"]
    for row in rows:
        fixed, auto = row["fixed"], row.get("auto")
        cells = [f"{row['size']} {row['dtype']} ({row['shards']} shards)", f"{row['bytes'] / 2**20:.0f}",
                 f"{row['hf_load_only']['peak_mb']:.0f} ({row['hf_load']['peak_mb']:.0f})",
                 *(f"{fixed['phases_mb'].get(p, float('nan')):.0f}" for p in phases), f"{fixed['peak_mb']:.0f} ({fixed['ratio']:.2f}×)",
                 f"{auto['peak_mb']:.0f} ({auto['ratio']:.2f}×)" if auto else "–"]
        if fixed.get("device_peak_mb"):  # a --device cuda run: the GPU's peak beside the host's
            cells[-2] += f"; GPU {fixed['device_peak_mb']:.0f} MB against {row['hf_load']['device_peak_mb']:.0f}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory against size (left) and its ratio to the plain use, with the targets (right)."""
    figure, (axis, ratios) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype, marker in (("float32", "o"), ("bfloat16", "s")):
        mine = sorted((row for row in rows if row["dtype"] == dtype), key=lambda row: row["parameters"])
        if not mine:
            continue
        x = [row["parameters"] / 1e6 for row in mine]
        auto = [row for row in mine if "auto" in row]
        x_auto = [row["parameters"] / 1e6 for row in auto]
        axis.plot(x, [row["hf_load"]["peak_mb"] for row in mine], f"k{marker}--", label=f"plain HF load + forward ({dtype})")
        axis.plot(x, [row["fixed"]["peak_mb"] for row in mine], f"C0{marker}-", label=f"unlearn --layer L --out ({dtype})")
        axis.plot(x_auto, [row["auto"]["peak_mb"] for row in auto], f"C1{marker}-", label=f"--layer auto ({dtype})")
        ratios.plot(x, [row["fixed"]["ratio"] for row in mine], f"C0{marker}-", label=f"--layer L ({dtype})")
        ratios.plot(x_auto, [row["auto"]["ratio"] for row in auto], f"C1{marker}-", label=f"--layer auto ({dtype})")
    for target, colour in ((1.5, "C0"), (2.0, "C1")):
        ratios.axhline(target, color=colour, linestyle=":", linewidth=1)
    axis.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="peak host RSS (MB)", title="Host memory of unlearn vs a plain load")
    ratios.set(xscale="log", xlabel="parameters (M)", ylabel="× the plain load's peak", ylim=(1.0, 2.2),
               title="Ratio to the plain load (dotted: the 1.5× and 2× targets)")
    axis.legend(fontsize=7)
    ratios.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
