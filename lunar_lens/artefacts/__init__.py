"""Stage 8, artefacts: patch files, patched checkpoint folders, the verified export with its model card, and the
reload check.

May import: every earlier stage (core … evaluate).
"""
