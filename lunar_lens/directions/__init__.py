"""Stage 4, directions: residuals at hook points, the model's own refusal, and the unanswerability directions
r_l = mean(reference) − mean(forget).

May import: core, data, model, metrics.
"""
