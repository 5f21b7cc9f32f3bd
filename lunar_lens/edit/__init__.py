"""Stage 5, edit: the settings, the streamed statistics, the solvers (closed form, AdamW, LoRA), the refinement on
behaviour; only W_out changes.

May import: core, data, model, metrics, directions.
"""
