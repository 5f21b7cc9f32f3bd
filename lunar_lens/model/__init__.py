"""Stage 2, load: a Hugging Face folder or hub id as a checked `TransformerBridge`, checkpoint folders (safetensors,
hashes), hook names, W_out access and the ΔW hooks, memory budgets, greedy generation.

May import: core, data.
"""
