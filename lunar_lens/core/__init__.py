"""Shared helpers every stage may use: errors (`LunarError`), the settings mixin, progress bars, the allocator's
habits, atomic outputs, forward hooks, data parallelism and the figure helpers.

May import: nothing else of lunar_lens.
"""
