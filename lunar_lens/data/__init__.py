"""Stage 1, data: QA sets from files (JSON, JSONL, TOFU's splits, Hugging Face datasets) and the one prompt format with
its token batches.

May import: core.
"""
