"""Layer localisation (`settings`, `passes`, `probes`, `check`, `rule`, `run`): which layer to edit and how hard to redirect (the coefficient c), measured with
hook points on the unedited model, then checked on the edit itself, simulated by hooks.

Probes, each batched (one pass per layer, or per layer × c, over an evenly spread subsample of each set;
the columns before the first steered position run once, and every layer × c steering continues from their
keys and values):

- **steering** (sufficiency): add to `blocks.l.hook_resid_post` of forget prompts what the edit adds to
  the MLP output — c·r_l at the last prompt token and, for `+answer` rules, c·r_l(k) at answer token k —
  teacher-forced or while generating; score the log-odds of the refusal's first tokens against the
  original answer's, and the refusal rate and answer ROUGE-1 recall of short greedy generations;
- **directional ablation** (necessity): project r_l out of the residual stream leaving block l on
  reference prompts; score how much the refusal's log-probability drops;
- **activation patching**: patch the reference run's `hook_resid_post` into the paired forget run at
  each layer × position (the last prompt positions, counted from the end) and score the recovered
  refusal logit difference at the last prompt token;
- **side effects**: KL(clean ‖ intervened) of next-token distributions on retain prompts (at the last
  prompt token and, teacher-forced, every answer token) under each intervention;
- **edit check**: for the best-ranked layers, the closed-form edit (`edit.unit_solutions`)
  at c = 1, simulated at every c of the grid by hooks (its ΔW is linear in c):
  forget ROUGE-1 recall and refusal rate of greedy answers, retain KL. No weight changes.

The selection rule (`rule.rank_layers`, then `rule.choose_checked_edit`) is written out in `RULE` and in localisation.json.
"""

from lunar_lens.choose.probes.run import check_coeffs, localise
from lunar_lens.choose.probes.settings import DEFAULT_COEFFS, RULE, Localisation, LocaliseSettings

__all__ = ["DEFAULT_COEFFS", "RULE", "Localisation", "LocaliseSettings", "check_coeffs", "localise"]
