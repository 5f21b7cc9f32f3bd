"""The tree is the pipeline: a module imports only its own stage and earlier ones (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import lunar_lens

STAGES = ["core", "data", "model", "metrics", "directions", "edit", "choose", "evaluate", "artefacts", "pipeline", "toy", "cli"]
PACKAGE = Path(lunar_lens.__file__).parent


def imported(path: Path) -> set[str]:
    """Every lunar_lens module `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lunar_lens"):
            names |= {node.module} if node.module != "lunar_lens" else {f"lunar_lens.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("lunar_lens.")}
    return names


def stage_of(module: str) -> int:
    return STAGES.index(module.split(".")[1])


def test_every_module_sits_in_a_stage() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the stage packages: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(STAGES)


def test_no_module_imports_a_later_stage() -> None:
    offences = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            continue  # lunar_lens/__init__ (lazy top-level names) and __main__
        own = STAGES.index(parts[0])
        offences += [f"{'/'.join(parts)} imports {name}" for name in imported(path) if stage_of(name) > own]
    assert offences == []


def test_the_rule_catches_a_later_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lunar_lens.artefacts.export import export_checkpoint\n")
    assert {stage_of(name) for name in imported(module)} == {STAGES.index("artefacts")}
