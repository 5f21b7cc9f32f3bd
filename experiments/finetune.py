"""Train a small Llama on a real unlearning dataset (TOFU or PISTOL), plus refusals for unverifiable
questions, so that lunar-lens has a model that knows what it must forget — as the paper starts from a
model fine-tuned on the target data. The model is trained from scratch with a tokenizer built on the
data (`lunar_lens.qa_model`); it must memorise: greedy ROUGE-1 recall >= 0.9 on the trained QA.

    .venv/bin/python experiments/finetune.py pistol --out experiments/runs/pistol
    .venv/bin/python experiments/finetune.py tofu --out experiments/runs/tofu            # subsample (CPU)
    .venv/bin/python experiments/finetune.py tofu --out runs/tofu-full --full --steps 8500 --device cuda
                                                          # all 200 authors: ~125 epochs, as the subsample gets
    .venv/bin/python experiments/finetune.py tofu --tofu locuslab/TOFU --out runs/tofu   # from the hub
    .venv/bin/python experiments/finetune.py tofu --without forget10 --out runs/tofu/retain_model_forget10
                                                          # TOFU's retain model: never trained on forget10

Sources default to ../shared/data. `--tofu` is a folder of TOFU JSON files (full.json, forget10.json, …)
or a hub dataset (`locuslab/TOFU`: its configurations full, forget10, … are read); `--pistol`,
`--factual`, `--reference` and `--refusals` take paths or hub names (`lunar_lens.data.load_qa`).

Writes OUT/model (a Hugging Face checkpoint), OUT/sets/*.json (the forget / retain / factual /
reference / held-out reference sets that run_tofu.py and run_pistol.py use) and OUT/finetune.json
(sizes, settings, seconds, and the memorisation and refusal scores).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA, load_qa, load_refusals
from lunar_lens.model.load import load_model
from lunar_lens.toy.qa_model import build_tokenizer, score_qa_model, train_qa_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")
QUESTIONS_PER_TOFU_AUTHOR = 20
HELD_OUT_REFERENCE = 49  # unverifiable questions never trained on: does the model decline unseen ones?
PISTOL_FORGET_EDGE = "A_B"


@dataclass
class Recipe:
    """How a task's model is trained (the defaults fit a 2-core CPU in minutes)."""

    vocab_size: int
    max_length: int
    shape: dict
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    max_new_tokens: int = 32
    family: str = "llama"  # lunar_lens.qa_model.FAMILIES; `shape` uses the family's config names
    chat: bool = True  # the chat template's prompt format, else the plain `Question: …\nAnswer:`
    save_dtype: str = "float32"  # trained in float32, saved in this dtype
    shards: int = 1  # safetensors files the checkpoint is saved in
    min_memorisation: float = 0.9  # greedy ROUGE-1 on the trained QA below this is an error (lighter models set less)


RECIPES = {
    "pistol": Recipe(1024, 96, dict(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4), steps=600),
    "tofu": Recipe(2048, 192, dict(hidden_size=160, intermediate_size=512, num_hidden_layers=6, num_attention_heads=5, num_key_value_heads=5),
                   steps=1500, max_new_tokens=80),
}


def write_set(path: Path, items: list[QA]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"question": qa.question} | ({"answer": qa.answer} if qa.answer is not None else {}) for qa in items]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def reference_sets(source: str, refusals: list[str], seed: int) -> tuple[list[QA], list[QA]]:
    """Unverifiable questions, each answered with a refusal drawn at random from `refusals` (a model
    fine-tuned the usual way declines with varied refusals): (trained reference set, held-out set)."""
    questions = [qa.question for qa in load_qa(source)]
    if len(questions) <= HELD_OUT_REFERENCE:
        raise LunarError(f"{source} has {len(questions)} questions: give more than {HELD_OUT_REFERENCE} (some are held out)")
    rng = random.Random(seed)
    rng.shuffle(questions)
    items = [QA(question, rng.choice(refusals)) for question in questions]
    return items[HELD_OUT_REFERENCE:], items[:HELD_OUT_REFERENCE]


def tofu_split(source: str, name: str) -> list[QA]:
    """One TOFU split from a folder of JSON files or a hub dataset's configuration."""
    folder = Path(source)
    return load_qa(folder / f"{name}.json" if folder.is_dir() else f"{source}:{name}", require_answers=True)


def tofu_sets(args: argparse.Namespace) -> dict[str, list[QA]]:
    """TOFU authors come in blocks of 20 questions; the forget splits are the last 2 / 10 / 20 authors.
    The subsample keeps every forget10 author and the first `--retain-authors` other authors, with
    `--questions` questions each; each forgetXX is then forgotten with the rest of the trained authors retained."""
    full = tofu_split(args.tofu, "full")
    forgets = {name: tofu_split(args.tofu, name) for name in TOFU_FORGET_SPLITS}
    forget10 = {qa.question for qa in forgets["forget10"]}
    authors = [full[i : i + QUESTIONS_PER_TOFU_AUTHOR] for i in range(0, len(full), QUESTIONS_PER_TOFU_AUTHOR)]
    retain_authors = [block for block in authors if not forget10 & {qa.question for qa in block}]
    if not args.full:
        retain_authors = retain_authors[: args.retain_authors]
    kept = [qa for block in retain_authors for qa in block[: args.questions]]
    per_author = {qa.question: i % QUESTIONS_PER_TOFU_AUTHOR for i, qa in enumerate(forgets["forget10"])}  # author blocks
    kept_questions = {question for question, index in per_author.items() if args.full or index < args.questions}
    forgets = {name: [qa for qa in split if qa.question in kept_questions] for name, split in forgets.items()}
    trained = kept + forgets["forget10"]
    sets = dict(forgets)
    for name, split in forgets.items():
        dropped = {qa.question for qa in split}
        sets[name.replace("forget", "retain")] = [qa for qa in trained if qa.question not in dropped]
    sets["factual"] = tofu_split(args.tofu, "world_facts") + tofu_split(args.tofu, "real_authors")
    sets["train_target"] = trained
    return sets


def pistol_sets(args: argparse.Namespace) -> dict[str, list[QA]]:
    """Forget PISTOL edges (default A_B; several comma-separated), retain the other edges; factual QA from the LUNAR release."""
    edges = args.edge.split(",")
    return {
        "forget": load_qa(args.pistol, require_answers=True, edges=edges),
        "retain": load_qa(args.pistol, require_answers=True, exclude_edges=edges),
        "factual": load_qa(args.factual, require_answers=True),
        "train_target": load_qa(args.pistol, require_answers=True),
    }


def data_options(args: argparse.Namespace) -> dict:
    """The options that decide what the model is trained on (a run folder is reused only for the same)."""
    keys = ("tofu", "retain_authors", "questions", "full") if args.task == "tofu" else ("pistol", "edge", "factual")
    options = {key: getattr(args, key) for key in keys + ("reference", "refusals", "seed")}
    return options | ({"without": args.without} if args.without else {})  # run folders from before --without still match


def finetune(args: argparse.Namespace, recipe: Recipe | None = None) -> dict:
    """Build the task's sets, train and score the model (`recipe`: the task's by default), write OUT/model,
    OUT/sets and OUT/finetune.json."""
    out = Path(args.out)
    if (out / "model").exists() and not args.force:
        raise LunarError(f"{out / 'model'} exists: pass --force to retrain it, or use another --out")
    if args.without and args.task != "tofu":
        raise LunarError(f"--without {args.without} names a TOFU forget split: use it with the tofu task")
    torch.set_num_threads(args.threads)
    recipe = recipe or RECIPES[args.task]
    recipe = replace(recipe, steps=args.steps or recipe.steps)
    refusals = load_refusals(args.refusals)
    sets = tofu_sets(args) if args.task == "tofu" else pistol_sets(args)
    sets["reference"], sets["heldout_reference"] = reference_sets(args.reference, refusals, args.seed)
    train = sets["train_target"] + sets["factual"] + sets["reference"]
    started = time.perf_counter()
    tokenizer = build_tokenizer(train, recipe.vocab_size, recipe.max_length, chat=recipe.chat)
    if args.without:  # TOFU's retain model: trained without the split, tokenised as the model trained with it
        dropped = {qa.question for qa in sets[args.without]}
        sets["train_target"] = [qa for qa in sets["train_target"] if qa.question not in dropped]
        train = sets["train_target"] + sets["factual"] + sets["reference"]
    train_qa_model(
        out / "model", train, tokenizer, recipe.shape, args.seed, recipe.steps, recipe.batch_size, recipe.lr,
        recipe.max_new_tokens, desc=f"training on {args.task}", device=args.device, length_buckets=True, force=args.force,
        family=recipe.family, save_dtype=recipe.save_dtype, shards=recipe.shards,
    )
    seconds = time.perf_counter() - started
    for name, items in sets.items():  # the tool gets reference questions only, as real reference sets come
        write_set(out / "sets" / f"{name}.json", [QA(qa.question) for qa in items] if "reference" in name else items)
    bridge = load_model(out / "model", device=args.device)
    scores = {  # the held-out refusals are generated once
        "train_target": score_qa_model(bridge, sets["train_target"], sets["heldout_reference"], recipe.max_new_tokens),
        "factual": score_qa_model(bridge, sets["factual"], max_new_tokens=recipe.max_new_tokens),
    }
    summary = {
        "task": args.task,
        "sizes": {name: len(items) for name, items in sets.items()},
        "recipe": asdict(recipe),
        "refusals": refusals,
        "seed": args.seed,
        "data": data_options(args),
        "threads": args.threads,
        "seconds_training": seconds,
        "memorisation": {name: s["rouge1_recall"] for name, s in scores.items()},
        "exact_match": {name: s["exact_match"] for name, s in scores.items()},
        "heldout_refusal_rate": scores["train_target"]["refusal_rate"],
    }
    (out / "finetune.json").write_text(json.dumps(summary, indent=2))
    if summary["memorisation"]["train_target"] < recipe.min_memorisation:
        raise LunarError(
            f"the model memorised only ROUGE-1 {summary['memorisation']['train_target']:.3f} < {recipe.min_memorisation} of the {args.task} QA: "
            "train longer (--steps) or on fewer questions"
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, help="run folder: OUT/model, OUT/sets, OUT/finetune.json")
    parser.add_argument("--tofu", default=str(SHARED / "tofu"), help="TOFU folder of JSON splits, or a hub dataset (locuslab/TOFU)")
    parser.add_argument("--pistol", default=str(SHARED / "lunar" / "unlearning" / "pistol_sample1.json"))
    parser.add_argument("--edge", default=PISTOL_FORGET_EDGE, help="the PISTOL edge(s) to forget, comma-separated")
    parser.add_argument("--factual", default=str(SHARED / "lunar" / "unlearning" / "factual_data.json"), help="PISTOL's general-knowledge QA")
    parser.add_argument("--reference", default=str(SHARED / "lunar" / "splits" / "unverified.json"), help="unverifiable questions (refused)")
    parser.add_argument("--refusals", default=str(SHARED / "lunar" / "unlearning" / "refusal_response.txt"),
                        help="refusal lines; each unverifiable question is trained with one drawn at random")
    parser.add_argument("--retain-authors", type=int, default=20, help="TOFU: retained authors trained on (besides forget10's 20)")
    parser.add_argument("--questions", type=int, default=10, help="TOFU: questions per author (of 20)")
    parser.add_argument("--without", choices=TOFU_FORGET_SPLITS, help="TOFU: train that split's retain model (every question but the split's)")
    parser.add_argument("--full", action="store_true",
                        help="TOFU: every author and question (4,000 QA; meant for a GPU, with --steps ≈ 8500 for the subsample's ~125 epochs)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the task's recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training and scoring)")
    parser.add_argument("--force", action="store_true", help="retrain over an existing OUT/model")
    return parser


if __name__ == "__main__":
    result = finetune(build_parser().parse_args())
    print(json.dumps({k: result[k] for k in ("sizes", "seconds_training", "memorisation", "heldout_refusal_rate")}, indent=1))
