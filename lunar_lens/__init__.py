"""lunar-lens: LUNAR unlearning (neural activation redirection) on TransformerLens hook points.

The pipeline, as plain functions: `load_model` → `compute_directions` → `localise` → `edit_layers` →
`evaluate_sets` → `export_checkpoint`; `unlearn` runs all of it. Imports are lazy so that the CLI and
the data loaders start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LunarError": "lunar_lens.core.errors",
    "load_model": "lunar_lens.model.load",
    "QA": "lunar_lens.data.qa",
    "load_qa": "lunar_lens.data.qa",
    "compute_directions": "lunar_lens.directions.mean_difference",
    "Directions": "lunar_lens.directions.mean_difference",
    "localise": "lunar_lens.choose.probes",
    "EditSettings": "lunar_lens.edit.layers",
    "RunSettings": "lunar_lens.core.settings",
    "edit_layers": "lunar_lens.edit.layers",
    "unlearn": "lunar_lens.pipeline.unlearn",
    "evaluate_sets": "lunar_lens.evaluate.sets",
    "export_checkpoint": "lunar_lens.artefacts.export",
    "generate_answers": "lunar_lens.model.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lunar_lens' has no attribute {name!r}")
