"""Progress fits the place: bars on a terminal; with TQDM_DISABLE, --quiet or a log file, no carriage
return, and one line per stage with its time."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

from lunar_lens.cli import main
from lunar_lens.toy.world import checkpoint_path

STAGE_LINE = re.compile(r"^(.+): \d+\.\d s$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def write_set(path, items) -> str:
    path.write_text(json.dumps([{"question": qa.question} | ({"answer": qa.answer} if qa.answer else {}) for qa in items]))
    return str(path)


def run(monkeypatch, argv: list[str], stream: io.StringIO, **env: str) -> str:
    """`lunar-lens ARGV` with stderr (where progress goes) sent to `stream`; returns what it received."""
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 0
    return stream.getvalue()


@pytest.fixture
def evaluate_args(tmp_path, world):
    questions = write_set(tmp_path / "q.json", world.facts_about(world.entities[0])[:3])
    return ["evaluate", "--model", str(checkpoint_path()), "--forget", questions, "--retain", questions,
            "--out", str(tmp_path / "report.json"), "--no-model-metrics", "--force"]  # each run replaces the last one's report


def test_bars_only_on_a_terminal_without_tqdm_disable_or_quiet(monkeypatch, evaluate_args):
    assert "\r" in run(monkeypatch, evaluate_args, Terminal())  # a terminal gets bars
    for log in (
        run(monkeypatch, evaluate_args, Terminal(), TQDM_DISABLE="1"),
        run(monkeypatch, evaluate_args + ["--quiet"], Terminal()),
        run(monkeypatch, evaluate_args, io.StringIO()),  # not a terminal
    ):
        assert "\r" not in log
        stages = [STAGE_LINE.match(line).group(1) for line in log.splitlines() if STAGE_LINE.match(line)]
        assert stages[0].startswith(f"loaded {checkpoint_path()}")
        assert stages[1:] == ["answered the forget set (3 questions)", "answered the retain set (3 questions)"]


def test_an_unlearn_run_with_tqdm_disable_logs_one_line_per_stage(monkeypatch, tmp_path, world):
    forget, retain, reference = world.split(world.entities[:1])
    files = [write_set(tmp_path / f"{name}.json", items) for name, items in
             (("forget", forget[::4]), ("retain", retain[::40]), ("reference", reference[::40]))]
    args = ["unlearn", "--model", str(checkpoint_path()), "--forget", files[0], "--retain", files[1], "--reference", files[2],
            "--out", str(tmp_path / "out"), "--layer", "0", "--coeff", "6"]
    log = run(monkeypatch, args, Terminal(), TQDM_DISABLE="1")
    assert "\r" not in log
    stages = [STAGE_LINE.match(line).group(1) for line in log.splitlines() if STAGE_LINE.match(line)]
    assert stages == [
        "loaded the model and the sets", "the model's own refusal (its answers to the reference questions)",
        "the model's own answers to general-knowledge questions (knowledge nobody listed)",
        f"directions from {len(forget[::4])} forget and {len(reference[::40])} reference prompts",
        "edit of W_out, layer(s) 0, c = 6", f"export to {tmp_path / 'out'}, verified by reloading",
    ]
