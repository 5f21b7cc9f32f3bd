"""The embedded toy world, small QA models trained from scratch, and the demo (the pipeline on the toy world).

May import: every stage (it runs the pipeline).
"""
