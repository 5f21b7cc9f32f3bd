"""Load forget / retain / reference / factual sets as lists of `QA`.

Sources (`load_qa`): `.json` (an array of records, an object holding one such array, or JSON lines
saved as `.json`, which is what TOFU ships), `.jsonl`, `.csv`, `.txt` (one question per line), a folder
written by `datasets.Dataset.save_to_disk`, any other folder (a `datasets` data folder), or else a
Hugging Face hub name (`owner/name:config` picks a configuration, e.g. `locuslab/TOFU:forget10`).
Fields: the question is `question`, else `instruction`, else `prompt`; the answer is `answer`, else
`response`, else `output`; PISTOL records also carry an `edge`, and TOFU's
perturbed splits a `paraphrased_answer` and a list `perturbed_answer` (kept for the truth ratio).

Policies:
- Duplicate questions inside one set are dropped with a warning (the first is kept), not refused:
  TOFU's own full/retain splits repeat "What is the full name of the author?" with two answers.
- forget ∩ retain (`check_disjoint`): the overlap is dropped from retain with a warning (the forget
  request wins); a retain set left empty is an error.
- Errors name the source and the record: "line N" (1-based) for line formats, "item [i]" (0-based
  index) for JSON arrays and datasets. Text is stripped of surrounding whitespace.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lunar_lens.core.errors import LunarError

QUESTION_FIELDS = ("question", "instruction", "prompt")
ANSWER_FIELDS = ("answer", "response", "output")
JSON_KINDS = {"NoneType": "null", "int": "a number", "float": "a number", "bool": "a boolean", "list": "a list", "dict": "an object"}


@dataclass(frozen=True)
class QA:
    """One question and its answer (None for instruction-only and plain-text sets); TOFU's perturbed
    splits add the answer reworded and wrong answers in the same wording (the truth ratio's options)."""

    question: str
    answer: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()


Row = tuple[str, Any]  # (where in the source, raw record)
Parsed = tuple[str, QA, str | None]  # (where, the record, its PISTOL edge)


def load_qa(
    source: str | Path,
    *,
    require_answers: bool = False,
    edges: Sequence[str] | None = None,
    exclude_edges: Sequence[str] | None = None,
    split: str = "train",
    max_chars: int = 4000,
) -> list[QA]:
    """Load one set; `edges` keeps only those PISTOL edges, `exclude_edges` drops them."""
    label = str(source)
    rows = _read_rows(source, split)
    if not rows:
        raise LunarError(f"{label} holds no records: add at least one question")
    parsed = [(where, *_parse(label, where, record, require_answers, max_chars)) for where, record in rows]
    if edges is not None or exclude_edges is not None:
        parsed = _select_edges(label, parsed, edges, exclude_edges)
        if not parsed:
            raise LunarError(f"{label}: no records left after edges={edges}, exclude_edges={exclude_edges}: keep at least one edge")
    return _dedupe(label, parsed)


def spread(items: Sequence, n: int) -> list:
    """At most `n` items, evenly spaced over `items` (deterministic)."""
    return list(items) if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def check_disjoint(forget: list[QA], retain: list[QA], name: str = "retain") -> list[QA]:
    """`retain` (the set called `name`) without the questions that are also in forget (warned); error if
    nothing is left."""
    forget_questions = {qa.question for qa in forget}
    overlap = [qa.question for qa in retain if qa.question in forget_questions]
    if not overlap:
        return retain
    if len(overlap) == len(retain):
        raise LunarError(
            f"all {len(retain)} {name} questions are also in the forget set (e.g. {overlap[0]!r}): "
            f"give a {name} set that differs from the forget set"
        )
    warnings.warn(f"dropped {len(overlap)} {name} question(s) also in the forget set (the forget request wins), e.g. {overlap[0]!r}", stacklevel=2)
    return [qa for qa in retain if qa.question not in forget_questions]


def load_refusals(path: str | Path, max_chars: int = 4000) -> list[str]:
    """Refusal responses, one per line (refusal_response.txt; TOFU's idontknow.jsonl is plain text too)."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise LunarError(f"{path} holds no refusals: write one refusal response per line")
    for n, line in lines:
        if line.lstrip().startswith(("{", "[")):
            raise LunarError(f"{path}, line {n}: looks like JSON, but refusal files hold one plain response per line: write the text only")
    return [_text(str(path), f"line {n}", "response", line, max_chars) for n, line in lines]


# ---------------------------------------------------------------- reading sources

def _read_rows(source: str | Path, split: str) -> list[Row]:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return _folder_rows(path, split)
    if path.is_file():
        if suffix not in READERS:
            raise LunarError(f"{path}: unknown file type {suffix!r}: use .json, .jsonl, .csv or .txt (one question per line)")
        return READERS[suffix](path, read_text(path))
    if suffix in READERS or str(source).startswith((".", "/", "~")):
        raise LunarError(f"{path} does not exist: check the path")
    return _dataset_rows(_load_dataset(str(source), split))


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); anything else is a one-line error."""
    if not path.is_file():
        raise LunarError(f"{path} does not exist or is not a file: check the path")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise LunarError(f"{path} is not UTF-8 text (byte {error.start}): re-save it as UTF-8") from None


def _json_rows(path: Path, text: str) -> list[Row]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl_rows(path, text)  # JSON lines saved as .json (TOFU)
        raise LunarError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}, column {error.colno}): fix the syntax") from None
    if isinstance(data, dict):
        data = _single_list(path, data)
    if not isinstance(data, list):
        raise LunarError(f"{path}: the top level is {_kind(data)}, not a list of records: write [{{\"question\": ...}}, ...]")
    return [(f"item [{i}]", record) for i, record in enumerate(data)]


def _single_list(path: Path, data: dict) -> list:
    """The one list of records inside a JSON object (or the object itself when it is one record)."""
    lists = [key for key, value in data.items() if isinstance(value, list)]
    if len(lists) == 1:
        return data[lists[0]]
    if not lists and any(field in data for field in QUESTION_FIELDS):
        return [data]
    raise LunarError(
        f"{path}: the top-level object holds {len(lists)} lists ({', '.join(lists) or 'none'}): "
        "put the records in one list, or write the file as a JSON array"
    )


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise LunarError(f"{path}, line {n}: invalid JSON ({error.msg}): write one JSON object per line") from None
    return rows


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    return [(f"line {reader.line_num}", record) for record in reader]


def _txt_rows(path: Path, text: str) -> list[Row]:
    return [(f"line {n}", {"question": line}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


READERS = {".json": _json_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}


def _folder_rows(path: Path, split: str) -> list[Row]:
    """A `save_to_disk` folder (Dataset or DatasetDict), else a `datasets` data folder."""
    import datasets

    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _dataset_rows(_load_dataset(str(path), split))
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise LunarError(f"{path} has splits {', '.join(dataset)}, not {split!r}: pass one of them as split")
        dataset = dataset[split]
    return _dataset_rows(dataset)


def _load_dataset(name: str, split: str) -> Any:
    """A `datasets` folder or hub dataset; `owner/name:config` picks a configuration (locuslab/TOFU:forget10)."""
    import datasets

    path, _, config = name.partition(":") if not Path(name).exists() else (name, "", "")
    try:
        return datasets.load_dataset(path, config or None, split=split)
    except (OSError, ValueError) as error:
        raise LunarError(
            f"{name!r} is not a file and not a reachable dataset on the hub ({type(error).__name__}: {error}): check the path"
        ) from error


def _dataset_rows(dataset: Any) -> list[Row]:
    return [(f"item [{i}]", record) for i, record in enumerate(dataset)]


# ---------------------------------------------------------------- checking records

def _parse(label: str, where: str, record: Any, require_answers: bool, max_chars: int) -> tuple[QA, str | None]:
    """The record as a QA plus its PISTOL edge (None when it has none)."""
    if not isinstance(record, dict):
        raise LunarError(f"{label}, {where}: expected an object with a question field, got {_kind(record)}: write it as {{\"question\": ...}}")
    question_key = next((key for key in QUESTION_FIELDS if key in record), None)
    answer_key = next((key for key in ANSWER_FIELDS if key in record), None)
    fields = ", ".join(map(str, record)) or "none"
    if question_key is None:
        raise LunarError(f"{label}, {where}: no question field (fields present: {fields}): name it 'question', 'instruction' or 'prompt'")
    if answer_key is None and require_answers:
        raise LunarError(f"{label}, {where}: no answer field (fields present: {fields}): this set needs answers; add 'answer' (or 'response'/'output')")
    question = _text(label, where, question_key, record[question_key], max_chars)
    answer = None if answer_key is None else _text(label, where, answer_key, record[answer_key], max_chars)
    paraphrased = record.get("paraphrased_answer")
    paraphrased = None if paraphrased is None else _text(label, where, "paraphrased_answer", paraphrased, max_chars)
    perturbed = record.get("perturbed_answer") or []
    if not isinstance(perturbed, list):
        raise LunarError(f"{label}, {where}: 'perturbed_answer' is {_kind(perturbed)}, not a list: write it as [\"wrong answer\", ...]")
    perturbed = tuple(_text(label, where, f"perturbed_answer[{i}]", text, max_chars) for i, text in enumerate(perturbed))
    edge = record.get("edge")
    return QA(question, answer, paraphrased, perturbed), None if edge is None else str(edge)


def _text(label: str, where: str, field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise LunarError(f"{label}, {where}: {field!r} is {_kind(value)}, not text: write it as a string")
    text = value.strip()
    if not text:
        raise LunarError(f"{label}, {where}: {field!r} is empty: fill it in or drop the record")
    if len(text) > max_chars:
        raise LunarError(f"{label}, {where}: {field!r} is {len(text)} characters long (max_chars={max_chars}): shorten it, or raise max_chars")
    return text


def _kind(value: Any) -> str:
    name = type(value).__name__
    return JSON_KINDS.get(name, name)


def _select_edges(
    label: str, parsed: list[Parsed], edges: Sequence[str] | None, exclude_edges: Sequence[str] | None
) -> list[Parsed]:
    keep, drop = _edge_set(edges), _edge_set(exclude_edges) or set()
    present = list(dict.fromkeys(edge for _, _, edge in parsed if edge is not None))
    if not present:
        raise LunarError(f"{label} has no 'edge' field: edges/exclude_edges select PISTOL edges; leave them out for this data")
    unknown = sorted(((keep or set()) | drop) - set(present))
    if unknown:
        raise LunarError(f"{label}: unknown edge(s) {', '.join(unknown)}: the edges present are {', '.join(present)}")
    return [item for item in parsed if (keep is None or item[2] in keep) and item[2] not in drop]


def _edge_set(edges: Sequence[str] | None) -> set[str] | None:
    """A set of edge names; a lone string is one edge, not its characters."""
    return None if edges is None else {edges} if isinstance(edges, str) else set(edges)


def _dedupe(label: str, parsed: list[Parsed]) -> list[QA]:
    first: dict[str, str] = {}
    kept, repeats = [], []
    for where, qa, _ in parsed:
        if qa.question in first:
            repeats.append(f"{where} repeats {first[qa.question]}: {qa.question!r}")
        else:
            first[qa.question] = where
            kept.append(qa)
    if repeats:
        warnings.warn(
            f"{label}: dropped {len(repeats)} duplicate question(s), keeping the first (e.g. {repeats[0]}): remove them to silence this",
            stacklevel=3,
        )
    return kept
