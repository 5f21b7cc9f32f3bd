"""Stage 6, choose: the automatic choice of layer set and c (`choice`), how it judges candidates (`judge`), the
packaged knowledge it protects (`unlisted`), and the probes (steering, ablation, patching) as its diagnostics
(`probes`), with their figures.

May import: core, data, model, metrics, directions, edit.
"""
