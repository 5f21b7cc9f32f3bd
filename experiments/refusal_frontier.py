"""What makes the whole response a refusal while retain and general knowledge stay: every edit setting
tried on a realistic model (varied refusals, reference as questions only), scored by greedy generation on
forget, retain and factual (never edited on) questions. Writes results/refusal_frontier_NAME.json and
../figures/refusal_frontier_NAME.png (forget refusal against retain and factual ROUGE-1).

    .venv/bin/python experiments/refusal_frontier.py --run experiments/runs/pistol --name pistol
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lunar_lens.data.qa import QA, load_qa, spread
from lunar_lens.directions.mean_difference import directions_for
from lunar_lens.directions.refusals import model_refusal
from lunar_lens.edit.layers import EditSettings, unit_solutions
from lunar_lens.edit.refine import RefineSettings, refine_edits
from lunar_lens.metrics.text import is_refusal, rouge_recall
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.load import load_model
from lunar_lens.model.names import n_layers
from lunar_lens.model.weights import delta_hooks

HERE = Path(__file__).resolve().parent


def scores(bridge, sets: dict[str, list[QA]], edits: dict, max_new_tokens: int) -> dict:
    out = {}
    with bridge.hooks(fwd_hooks=delta_hooks(edits)):
        for name, items in sets.items():
            answers = generate_answers(bridge, [qa.question for qa in items], max_new_tokens, batch_size=64)
            recall = rouge_recall(answers, [qa.answer for qa in items])["rouge1"]
            out[name] = {"rouge1": sum(recall) / len(recall), "refusal": sum(map(is_refusal, answers)) / len(answers), "sample": answers[:3]}
    forget, retain = out["forget"]["rouge1"], out["retain"]["rouge1"]
    out["ds"] = 100 * (forget**2 + (1 - retain) ** 2) ** 0.5
    return out


def markdown(rows: list[dict]) -> str:
    """One line per setting: forget refusal against retain and factual ROUGE-1 (the frontier), and DS."""
    lines = ["| edit | layers | c / start | steps | retain weight | forget ROUGE-1 ↓ | forget refusal ↑ | retain ROUGE-1 ↑ | factual ROUGE-1 ↑ | DS ↓ "
             "| a forget answer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        start = row.get("coeff") if row["setting"] != "refined" else row.get("init", "")
        lines.append(
            f"| {row['setting']} | {','.join(map(str, row.get('layers', []))) or '–'} | {start or '–'} | {row.get('steps', '–')} | "
            f"{row.get('retain_weight', '–')} | "
            f"{row['forget']['rouge1']:.3f} | {row['forget']['refusal']:.2f} | {row['retain']['rouge1']:.3f} | {row['factual']['rouge1']:.3f} | "
            f"{row['ds']:.1f} | {row['forget']['sample'][0][:48]!r} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finetune.py run folder (model/, sets/)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--forget", default="forget.json")
    parser.add_argument("--retain", default="retain.json")
    parser.add_argument("--layers", default=None, help="layer sets to try, e.g. '0;1;0,1,2' (default: each layer)")
    parser.add_argument("--coeffs", default="2,4,8")
    parser.add_argument("--n-eval", type=int, default=48, help="retain and factual questions scored")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--refine-steps", default="150")
    parser.add_argument("--retain-weights", default="4")
    parser.add_argument("--lr", type=float, default=RefineSettings.lr)
    parser.add_argument("--inits", default="zero,closed4",
                        help="refinement starts: zero, or closedC (the closed form at c = C); closedC-out trains only the output factor")
    parser.add_argument("--table-only", action="store_true", help="print the markdown table of results/refusal_frontier_NAME.json and stop")
    args = parser.parse_args()
    out = HERE / "results" / f"refusal_frontier_{args.name}.json"
    if args.table_only:
        print(markdown(json.loads(out.read_text())["rows"]))
        return
    torch.set_num_threads(1)
    run = Path(args.run)
    bridge = load_model(run / "model")
    forget = load_qa(run / "sets" / args.forget)
    retain = load_qa(run / "sets" / args.retain)
    reference = load_qa(run / "sets" / "reference.json")
    factual = load_qa(run / "sets" / "factual.json")
    evaluation = {"forget": spread(forget, args.n_eval), "retain": spread(retain, args.n_eval), "factual": spread(factual, args.n_eval)}
    started = time.perf_counter()
    target = model_refusal(bridge, reference)
    print("model refusal:", target.summary(), flush=True)
    settings = EditSettings(refusal=target.target)
    directions = directions_for(bridge, forget, reference, settings)
    layer_sets = [[int(x) for x in s.split(",")] for s in args.layers.split(";")] if args.layers else [[l] for l in range(n_layers(bridge))]
    rows = [{"setting": "base", **scores(bridge, evaluation, {}, args.max_new_tokens)}]
    print(json.dumps(rows[-1])[:300])
    for layers in layer_sets:
        solutions = dict(zip(layers, unit_solutions(bridge, layers, forget, retain, target.target, directions, settings)))
        units = {layer: solution.delta for layer, solution in solutions.items()}
        for coeff in [float(c) for c in args.coeffs.split(",")]:
            closed = {layer: coeff * delta for layer, delta in units.items()}
            rows.append({"setting": "closed", "layers": layers, "coeff": coeff, **scores(bridge, evaluation, closed, args.max_new_tokens)})
            print(json.dumps({k: v for k, v in rows[-1].items()})[:400], flush=True)
        for steps in [int(s) for s in args.refine_steps.split(",")]:
            for weight in [float(w) for w in args.retain_weights.split(",")]:
                for init in args.inits.split(","):
                    outputs_only = init.endswith("-out")  # train V of ΔW = u·Vᵀ only (the closed form's detectors u kept)
                    scale = float(init.removesuffix("-out").removeprefix("closed")) if init.startswith("closed") else 0.0
                    start = {layer: scale * delta for layer, delta in units.items()}
                    inputs = {layer: solution.u for layer, solution in solutions.items()} if outputs_only else None
                    t0 = time.perf_counter()
                    refined = refine_edits(
                        bridge, start, [qa.question for qa in forget], [target.target] * len(forget),
                        [qa.question for qa in retain], [qa.answer for qa in retain],
                        RefineSettings(steps=steps, retain_weight=weight, lr=args.lr, check_every=0),
                        inputs=inputs,
                    ).edits
                    rows.append({"setting": "refined", "init": init, "layers": layers, "steps": steps, "retain_weight": weight,
                                 "seconds": time.perf_counter() - t0, **scores(bridge, evaluation, refined, args.max_new_tokens)})
                    print(json.dumps(rows[-1])[:400], flush=True)
    out.write_text(json.dumps({"refusal": target.summary(), "seconds": time.perf_counter() - started, "rows": rows}, indent=1))
    print(markdown(rows))
    print("wrote", out)


if __name__ == "__main__":
    main()
