"""Stage 3, the measures every later stage scores with: text metrics (ROUGE, refusal, Deviation Score, intervals) and
model-based ones (answer-token ranks and probabilities, TOFU's truth ratio, KL).

May import: core, data, model.
"""
