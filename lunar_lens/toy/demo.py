"""`lunar-lens demo`: the whole pipeline on the embedded toy world — forget some entities, keep the
rest — with a before/after table, sample answers, the exported checkpoint and figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lunar_lens.core.atomic import FORMAT, atomic_output, write_manifest
from lunar_lens.core.errors import LunarError
from lunar_lens.evaluate.sets import Evaluation, evaluate_sets, plot_before_after
from lunar_lens.model.load import load_model
from lunar_lens.pipeline.unlearn import export_outcome, unlearn
from lunar_lens.toy.world import build_world, checkpoint_path


def sample_lines(before: Evaluation, after: Evaluation, set_name: str, count: int) -> list[str]:
    lines = []
    for old, new in list(zip(before.samples[set_name], after.samples[set_name]))[:count]:
        lines.append(f"  Q: {old['question']}\n     before: {old['answer']}\n     after:  {new['answer']}")
    return lines


def run_demo(
    out: str | Path = "lunar-demo", entities: list[str] | None = None, n_forget: int = 2, force: bool = False, probes: bool = False
) -> dict:
    """Forget `entities` (default: the first `n_forget`) from the toy-world model; returns the summary. With
    `probes`, the localisation probes' figures (steering, ablation, patching) too. The folder `out` appears
    whole at the end (`force` replaces an earlier demo's)."""
    started = time.perf_counter()
    # The toy model is tiny: intra-op threads only add synchronisation (and stall badly on a busy machine).
    torch.set_num_threads(1)
    out = Path(out)
    world = build_world(0)
    entities = entities or world.entities[:n_forget]
    unknown = sorted(set(entities) - set(world.entities))
    if unknown:
        raise LunarError(f"unknown toy-world entities {unknown}: choose from {', '.join(world.entities[:5])}, …")
    forget, retain, reference = world.split(entities)
    sets = {"forget": forget, "retain": retain, "unknown (held out)": world.unknown_heldout_qa}
    print(f"toy world: forgetting {', '.join(entities)} — {len(forget)} forget, {len(retain)} retain, {len(reference)} reference questions")

    with atomic_output(out, folder=True, force=force) as tmp:
        summary = _run(tmp, out, sets, forget, retain, reference, probes)
        summary |= {"entities": entities, "seconds": time.perf_counter() - started}
        (tmp / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        write_manifest(tmp, {"format": f"{FORMAT} demo 1"})
    print(f"\nwrote {summary['checkpoint']} (Hugging Face checkpoint), {', '.join(summary['figures'])} in {summary['seconds']:.0f} s")
    return summary


def _run(tmp: Path, out: Path, sets: dict, forget: list, retain: list, reference: list, probes: bool) -> dict:
    """The demo, written into `tmp` (which becomes `out`); its summary names the final paths."""
    bridge = load_model(checkpoint_path(), progress=True)
    before = evaluate_sets(bridge, sets, progress=True)
    outcome = unlearn(bridge, forget, retain, reference, figure_probes=probes)
    after = evaluate_sets(outcome.bridge, sets, progress=True)
    after_table = before.markdown_table(after)
    export_outcome(outcome, tmp / "model", results_table=after_table)

    print(f"\nedited W_out of layer(s) {outcome.report['layers']} with c = {outcome.report['coeff']:g}\n")
    print(after_table)
    print("\nforget-set answers:")
    print("\n".join(sample_lines(before, after, "forget", 4)))
    print("retain-set answers:")
    print("\n".join(sample_lines(before, after, "retain", 3)))

    figures = [plot_before_after(before, after, tmp / "before_after.png")]
    from lunar_lens.choose.figures import save_localisation

    written = save_localisation(outcome.localisation, tmp / "localisation", choice=outcome.report["choice"])
    figures += [path for path in written.values() if path.suffix == ".png"]
    return {
        "layers": outcome.report["layers"],
        "coeff": outcome.report["coeff"],
        "before": before.to_json(),
        "after": after.to_json(),
        "table": after_table,
        "checkpoint": str(out / "model"),
        "figures": [str(out / path.relative_to(tmp)) for path in figures],
    }
