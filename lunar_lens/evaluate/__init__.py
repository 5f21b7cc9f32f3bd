"""Stage 7, evaluate: every metric on named sets of a model (`sets`), before/after figures, and attacks that try to
recover forgotten answers.

May import: core, data, model, metrics, directions, edit, choose.
"""
