"""lunar-lens: LUNAR unlearning (neural activation redirection) on TransformerLens hook points.

The pipeline, as plain functions: `load_model` → `compute_directions` → `localise` → `edit_layers` →
`evaluate_sets` → `export_checkpoint`; `unlearn` runs all of it. Imports are lazy so that the CLI and
the data loaders start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LunarError": "lunar_lens.errors",
    "load_model": "lunar_lens.model",
    "QA": "lunar_lens.data",
    "load_qa": "lunar_lens.data",
    "compute_directions": "lunar_lens.directions",
    "Directions": "lunar_lens.directions",
    "localise": "lunar_lens.localise",
    "choose_layer_and_coeff": "lunar_lens.localise",
    "EditSettings": "lunar_lens.edit",
    "RunSettings": "lunar_lens.settings",
    "edit_layers": "lunar_lens.edit",
    "unlearn": "lunar_lens.pipeline",
    "evaluate_sets": "lunar_lens.evaluate",
    "export_checkpoint": "lunar_lens.export",
    "generate_answers": "lunar_lens.generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lunar_lens' has no attribute {name!r}")
