"""Stage 9, pipeline: `unlearn`, one call from a model and its sets to an edit, a report and an exported folder.

May import: every earlier stage.
"""
