"""Localisation probes against slow per-prompt references, patching against TransformerLens's own
utilities, the edit simulation against the real edit, and the selection rule on planted cases."""

import json
import math
from collections import Counter

import pytest
import torch
import transformers
from conftest import tiny_config
from transformer_lens import patching as tl_patching

from lunar_lens.choose.probes import LocaliseSettings, localise
from lunar_lens.choose.probes.check import edit_scores
from lunar_lens.choose.probes.measures import (
    ablation_scores,
    forget_answers_with,
    logit_difference,
    pair_by_suffix,
    patching_map,
    prepare_sets,
    real_ids,
    steering_generation_hook,
    steering_scores,
)
from lunar_lens.choose.probes.passes import in_chunks, no_hooks, top_next_token
from lunar_lens.choose.probes.rule import choose_checked_edit, rank_layers
from lunar_lens.data.prompts import tokenize
from lunar_lens.data.qa import QA
from lunar_lens.directions.mean_difference import compute_directions
from lunar_lens.edit.layers import EditSettings, edit_layers, unit_solutions
from lunar_lens.edit.refine import RefineSettings
from lunar_lens.metrics.text import mean_rouge1, refusal_rate
from lunar_lens.model.load import wrap_hf_model
from lunar_lens.model.names import resid_post
from lunar_lens.model.weights import delta_hooks

LAYER = 1


@pytest.fixture(scope="module")
def bridge(toy_tokenizer):
    config = tiny_config("llama", len(toy_tokenizer))
    config.initializer_range = 0.2  # logits large enough for the scores to differ between interventions
    torch.manual_seed(0)
    return wrap_hf_model(transformers.AutoModelForCausalLM.from_config(config).eval(), toy_tokenizer)


@pytest.fixture(scope="module")
def qa_sets(world):
    forget, retain, reference = world.split(world.entities[:1])
    return forget[::5], retain[::97], reference[::60]  # 5 / 10 / 11 items of mixed lengths


REFUSAL = "I don't know."


def settings_for(positions: str = "last+answer", **overrides) -> LocaliseSettings:
    base = dict(max_prompts=12, generate_tokens=6, batch_size=4, patch_pairs=4, patch_positions=5, figure_probes=True)
    # a random model declines nothing: the refusal is given
    return LocaliseSettings(edit=EditSettings(positions=positions, refusal=REFUSAL), **(base | overrides))


# ---------------------------------------------------------------- slow references: one prompt at a time, no padding

def run_single(bridge, ids, hook=None, name=None):
    hooks = [] if hook is None else [(name, hook)]
    with torch.no_grad():
        return bridge.run_with_hooks(ids[None], fwd_hooks=hooks)[0].float()


def add_at(shifts: dict[int, torch.Tensor]):
    """A hook adding shifts[position] at each listed position of a single sequence."""

    def hook(activation, hook=None):
        activation = activation.clone()
        for position, shift in shifts.items():
            activation[0, position] += shift
        return activation

    return hook


def slow_shifts(single, table, positions: str) -> dict[int, torch.Tensor]:
    """The edit's shifts for one unpadded sequence, written out position by position."""
    prompt_positions = (
        single.question_mask[0].nonzero()[:, 0].tolist() if positions.startswith("question") else [int(single.prompt_mask[0].sum()) - 1]
    )
    shifts = {p: table[0] for p in prompt_positions}
    if positions.endswith("+answer"):
        for k, p in enumerate(single.answer_mask[0].nonzero()[:, 0].tolist()[: len(table) - 1]):
            shifts[p] = table[1 + k]
    return shifts


def slow_answer_logprob(logits, single, k):
    answer = single.answer_mask[0].nonzero()[:, 0].tolist()[:k]
    ids = single.input_ids[0]
    return sum(logits[p - 1].log_softmax(-1)[ids[p]] for p in answer) / len(answer)


def slow_kl(clean, other, single):
    """Mean KL over the last prompt token and every answer-predicting position."""
    start, end = int(single.prompt_mask[0].sum()) - 1, len(single.input_ids[0]) - 1
    positions = range(start, max(end, start + 1))
    p, q = clean.log_softmax(-1), other.log_softmax(-1)
    return sum(float((p[i].exp() * (p[i] - q[i])).sum()) for i in positions) / len(positions)


def slow_greedy(bridge, question, table, positions, steps, layer):
    """Greedy decoding by full forwards (no KV cache), the steering written out per position."""
    tokenizer = bridge.tokenizer
    prompt = tokenize(tokenizer, [question])
    ids = prompt.input_ids[0]
    generated = []
    for _ in range(steps):
        shifts = slow_shifts(prompt, table, positions.partition("+")[0])
        if positions.endswith("+answer"):
            shifts |= {len(ids) + j: table[1 + j] for j in range(min(len(generated), len(table) - 1))}
        sequence = torch.cat([ids, torch.tensor(generated, dtype=ids.dtype)])
        token = int(run_single(bridge, sequence, add_at(shifts), resid_post(layer))[-1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


@pytest.mark.parametrize("positions", ["last+answer", "question"])
def test_steering_scores_equal_slow_references(bridge, qa_sets, positions):
    forget, retain, reference = qa_sets
    settings = settings_for(positions)
    sets = prepare_sets(bridge, forget, retain, reference, settings)
    directions = compute_directions(
        bridge, [q.question for q in forget], [q.question for q in reference], refusal=sets.refusal if positions.endswith("+answer") else None
    )
    coeffs = [0.5, 3.0]
    fast = {key: values[1] for key, values in steering_scores(bridge, sets, settings, [0, LAYER], directions, coeffs).items()}
    tokenizer, name = bridge.tokenizer, resid_post(LAYER)
    for i, coeff in enumerate(coeffs):
        table = directions.shift_table(LAYER, coeff)
        logodds = []
        for qa in forget:
            scores = []
            for continuation in (sets.refusal, qa.answer):
                single = tokenize(tokenizer, [qa.question], [continuation])
                logits = run_single(bridge, single.input_ids[0], add_at(slow_shifts(single, table, positions)), name)
                scores.append(slow_answer_logprob(logits, single, settings.score_tokens))
            logodds.append(float(scores[0] - scores[1]))
        kls = []
        for qa in retain:
            single = tokenize(tokenizer, [qa.question], [qa.answer])
            clean = run_single(bridge, single.input_ids[0])
            steered = run_single(bridge, single.input_ids[0], add_at(slow_shifts(single, table, positions)), name)
            kls.append(slow_kl(clean, steered, single))
        answers = [slow_greedy(bridge, qa.question, table, positions, settings.generate_tokens, LAYER) for qa in forget]
        assert fast["logodds"][i] == pytest.approx(sum(logodds) / len(logodds), abs=1e-4)
        assert fast["retain_kl"][i] == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-6)
        assert forget_answers_with(bridge, sets, settings, [(name, steering_generation_hook(sets, settings, [table]))]) == answers
        assert fast["refusal_rate"][i] == refusal_rate(answers, references=[sets.refusal])
    assert len({round(x, 3) for x in fast["logodds"].tolist()}) == 2  # the coefficient matters


def test_ablation_scores_equal_a_slow_reference(bridge, qa_sets):
    forget, retain, reference = qa_sets
    settings = settings_for()
    sets = prepare_sets(bridge, forget, retain, reference, settings)
    direction = compute_directions(bridge, [q.question for q in forget], [q.question for q in reference])[LAYER]
    drop, kl = ablation_scores(bridge, sets, settings, LAYER, direction)
    unit = direction / direction.norm()

    def ablate(activation, hook=None):
        return activation - (activation @ unit)[..., None] * unit

    drops = []
    for question in sets.reference_questions:  # the evenly spread subsample the probe uses
        single = tokenize(bridge.tokenizer, [question], [sets.refusal])
        clean = slow_answer_logprob(run_single(bridge, single.input_ids[0]), single, settings.score_tokens)
        ablated = slow_answer_logprob(run_single(bridge, single.input_ids[0], ablate, resid_post(LAYER)), single, settings.score_tokens)
        drops.append(float(clean - ablated))
    kls = []
    for qa in retain:
        single = tokenize(bridge.tokenizer, [qa.question], [qa.answer])
        kls.append(slow_kl(run_single(bridge, single.input_ids[0]), run_single(bridge, single.input_ids[0], ablate, resid_post(LAYER)), single))
    assert drop == pytest.approx(sum(drops) / len(drops), abs=1e-4)
    assert kl == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-6)
    assert abs(drop) > 1e-3 and kl > 1e-5


# ---------------------------------------------------------------- activation patching

def equal_length_questions(world, tokenizer, n: int) -> tuple[list[str], list[str]]:
    """2n unknown-person questions whose prompts tokenise to the same length (so no padding)."""
    questions = [qa.question for qa in world.unknown_train_qa + world.unknown_heldout_qa]
    lengths = {q: len(tokenize(tokenizer, [q]).input_ids[0]) for q in questions}
    common = Counter(lengths.values()).most_common(1)[0][0]
    same = [q for q in questions if lengths[q] == common]
    return same[:n], same[n : 2 * n]


def test_patching_map_equals_transformer_lens_patching(bridge, world):
    forget_questions, reference_questions = equal_length_questions(world, bridge.tokenizer, 4)
    settings = settings_for(patch_pairs=4, patch_positions=100)
    sets = prepare_sets(bridge, [QA(q) for q in forget_questions], [QA(q) for q in reference_questions], [QA(q) for q in reference_questions], settings)
    layers = [0, 1, 2]
    fast, labels = patching_map(bridge, sets, settings, layers)

    corrupted = tokenize(bridge.tokenizer, forget_questions)
    partners = pair_by_suffix(real_ids(corrupted), real_ids(tokenize(bridge.tokenizer, reference_questions)))
    clean = tokenize(bridge.tokenizer, [reference_questions[j] for j in partners])
    assert corrupted.attention_mask.all() and clean.attention_mask.all()
    refusal_token = in_chunks(bridge, clean, no_hooks, top_next_token, 8)
    answer_token = in_chunks(bridge, corrupted, no_hooks, top_next_token, 8)
    with torch.no_grad():
        clean_ld = logit_difference(bridge(clean.input_ids), refusal_token, answer_token).mean()
        corrupted_ld = logit_difference(bridge(corrupted.input_ids), refusal_token, answer_token).mean()
        _, clean_cache = bridge.run_with_cache(clean.input_ids)

        def metric(logits):
            return (logit_difference(logits, refusal_token, answer_token).mean() - corrupted_ld) / (clean_ld - corrupted_ld)

        reference = tl_patching.generic_activation_patch(
            bridge, corrupted.input_ids, clean_cache, metric, tl_patching.layer_pos_patch_setter, "resid_post",
            index_axis_names=("layer", "pos"),
        )
    assert fast.shape == (3, corrupted.input_ids.shape[1]) and len(labels) == fast.shape[1]
    assert torch.allclose(fast, reference[layers].cpu(), atol=1e-4)
    assert fast[-1, -1] == pytest.approx(1.0, abs=1e-5)  # the last block's output at the last token is the answer
    assert fast[:, :-1].abs().max() > 0.01  # earlier positions carry signal too: not a trivial map


def test_patching_map_with_padding_equals_a_slow_loop(bridge, qa_sets):
    forget, retain, reference = qa_sets
    settings = settings_for(patch_pairs=3, patch_positions=4)
    sets = prepare_sets(bridge, forget, retain, reference, settings)
    fast, _ = patching_map(bridge, sets, settings, [0, 2])
    picked = [sets.forget[i].question for i in (0, 1, 3)]  # spread(range(5), 3)
    prompts = [tokenize(bridge.tokenizer, [q]).input_ids[0] for q in picked]
    candidates = [tokenize(bridge.tokenizer, [q]).input_ids[0] for q in sets.reference_questions]
    partners = [max(range(len(candidates)), key=lambda j: (common_suffix(p, candidates[j]), -j)) for p in prompts]
    cleans = [candidates[j] for j in partners]
    tokens = [(int(run_single(bridge, c)[-1].argmax()), int(run_single(bridge, p)[-1].argmax())) for p, c in zip(prompts, cleans)]

    def ld(logits, pair):
        return float(logits[-1, tokens[pair][0]] - logits[-1, tokens[pair][1]])

    corrupted = sum(ld(run_single(bridge, p), i) for i, p in enumerate(prompts)) / 3
    clean = sum(ld(run_single(bridge, c), i) for i, c in enumerate(cleans)) / 3
    for row, layer in enumerate([0, 2]):
        name = resid_post(layer)
        for offset in range(4):
            total = 0.0
            for i, (p, c) in enumerate(zip(prompts, cleans)):
                _, cache = bridge.run_with_cache(c[None], names_filter=[name])
                total += ld(run_single(bridge, p, set_at(len(p) - 4 + offset, cache[name][0, len(c) - 4 + offset]), name), i)
            assert fast[row, offset] == pytest.approx((total / 3 - corrupted) / (clean - corrupted), abs=1e-4)


def common_suffix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def set_at(position, value):
    def hook(activation, hook=None):
        activation = activation.clone()
        activation[0, position] = value
        return activation

    return hook


# ---------------------------------------------------------------- the edit check

def test_delta_hooks_act_as_the_edit(toy_tokenizer, qa_sets):
    forget, retain, reference = qa_sets
    torch.manual_seed(1)
    model = wrap_hf_model(transformers.AutoModelForCausalLM.from_config(tiny_config("llama", len(toy_tokenizer))).eval(), toy_tokenizer)
    settings = EditSettings(coeff=3.0, refusal=REFUSAL, refine=RefineSettings(steps=0))  # the closed form, as simulated
    refusal = REFUSAL
    directions = compute_directions(model, [q.question for q in forget], [q.question for q in reference], refusal=refusal)
    delta, other = (unit.delta for unit in unit_solutions(model, [LAYER, 0], forget, retain, refusal, directions, settings))
    assert torch.equal(other, next(unit_solutions(model, [0], forget, retain, refusal, directions, settings)).delta)  # one pass, two layers
    batch = tokenize(toy_tokenizer, [q.question for q in forget + retain], [q.answer for q in forget + retain])
    with torch.no_grad():
        before = model(batch.input_ids, attention_mask=batch.attention_mask)
        with model.hooks(fwd_hooks=delta_hooks({LAYER: 3.0 * delta})):
            simulated = model(batch.input_ids, attention_mask=batch.attention_mask)
        edit_layers(model, forget, retain, reference, [LAYER], settings, directions=directions)
        edited = model(batch.input_ids, attention_mask=batch.attention_mask)
    assert (edited - before).abs().max() > 1e-3
    assert torch.allclose(simulated, edited, atol=1e-4)


def test_edit_scores_decode_several_coefficients_in_one_batch(toy_bridge, qa_sets):
    forget, retain, reference = qa_sets
    coeffs = [0.05, 1.0, 32.0]
    settings = settings_for(generate_rows=2 * len(forget))  # two c per batch: batches of 2 and 1
    sets = prepare_sets(toy_bridge, forget, retain, reference, settings)
    directions = compute_directions(toy_bridge, [q.question for q in forget], [q.question for q in reference], refusal=sets.refusal)
    (delta,) = (unit.delta for unit in unit_solutions(toy_bridge, [LAYER], forget, retain, sets.refusal, directions, settings.edit))
    scores = edit_scores(toy_bridge, sets, settings, LAYER, delta, coeffs)
    for i, coeff in enumerate(coeffs):  # one c at a time
        answers = forget_answers_with(toy_bridge, sets, settings, delta_hooks({LAYER: coeff * delta}))
        assert scores["refusal_rate"][i] == refusal_rate(answers, references=[sets.refusal])
        assert scores["forget_rouge1"][i] == pytest.approx(mean_rouge1(answers, sets.forget_answers))
    # c matters, so rows of different c were told apart: answers at 0.05, refusals at 1, broken text at 32
    assert scores["forget_rouge1"][0] > 0.5 > scores["forget_rouge1"][1] and scores["refusal_rate"][1] > scores["refusal_rate"][2]


# ---------------------------------------------------------------- the rule

def test_rule_ranks_the_planted_layer_first():
    layers = [0, 1, 2, 3, 4]
    logodds = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 1.0], [2.5, 3.5], [5.0, 6.0]])
    retain_kl = torch.tensor([0.5, 0.6, 0.5, 0.7, 1.5])  # layer 4 steers best but costs 3× the cheapest
    ablation_drop = torch.tensor([0.4, 0.3, 0.2, 0.5, 0.6])
    patching_last = torch.tensor([0.9, 0.2, 0.9, 0.95, 0.99])  # layer 1: reference activations do not restore refusal
    ranking, why = rank_layers(layers, logodds, retain_kl, ablation_drop, patching_last)
    assert ranking == [3, 0, 2, 1, 4]
    assert why["side_effect_filtered"] == [4] and why["probes_disagree"] == [1]


def test_rule_picks_the_planted_cell_within_the_kl_budget():
    coeffs = [1.0, 2.0, 4.0, 8.0]
    rouge = torch.tensor([[0.9, 0.5, 0.2, 0.0], [0.8, 0.3, 0.0, 0.0]])
    refusal = 1 - rouge
    kl = torch.tensor([[0.0, 0.01, 0.02, 0.03], [0.0, 0.01, 0.03, 0.2]])
    layer, coeff, order, _ = choose_checked_edit([5, 2], coeffs, rouge, refusal, kl, kl_budget=0.05)
    assert (layer, coeff, order) == (2, 4.0, [2, 5])  # layer 5 reaches 0 only at c = 8; layer 2 at c = 4
    layer, coeff, order, _ = choose_checked_edit([5, 2], coeffs, rouge, refusal, kl, kl_budget=0.025)
    assert (layer, coeff, order) == (5, 4.0, [5, 2])  # tighter budget: layer 2 stops at c = 2 (ROUGE 0.3)
    layer, coeff, _, why = choose_checked_edit([5, 2], coeffs, rouge, refusal, kl + 1.0, kl_budget=0.05)
    assert (layer, coeff, why["cells_within_kl_budget"]) == (5, 1.0, 0)  # nothing affordable: the cheapest cell


# ---------------------------------------------------------------- end to end

def test_localise_command_writes_scores_and_figures(bridge, qa_sets, tmp_path):
    from lunar_lens.cli import main

    forget, retain, reference = qa_sets
    model_dir = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(tiny_config("llama", len(bridge.tokenizer))).save_pretrained(model_dir)
    bridge.tokenizer.save_pretrained(model_dir)
    files = {}
    for name, items in (("forget", forget), ("retain", retain), ("reference", reference)):
        files[name] = tmp_path / f"{name}.json"
        # a random model declines nothing: the reference records carry the refusal
        records = [{"question": qa.question} if name == "forget" else {"question": qa.question, "answer": qa.answer or REFUSAL} for qa in items]
        files[name].write_text(json.dumps(records))
    out = tmp_path / "out"
    args = ["localise", "--model", str(model_dir), "--out", str(out), "--coeffs", "4", "--layers", "0,2", "--max-prompts", "4"]
    args += [arg for name, path in files.items() for arg in (f"--{name}", str(path))]
    assert main(args) == 0
    result = json.loads((out / "localisation.json").read_text())
    assert result["layers"] == [0, 2] and sorted(result["ranking"]) == [0, 2]
    assert result["best_layer"] in (0, 2) and result["best_coeff"] == 4.0
    assert len(result["steer_logodds"]) == 2 and len(result["patching"]) == 2
    assert "Edit check" in result["decision"]["rule"]
    for figure in ("localisation_layers.png", "localisation_patching.png"):
        assert (out / figure).stat().st_size > 20_000


def test_without_figure_probes_the_decision_is_the_same(bridge, qa_sets):
    forget, retain, reference = qa_sets
    coeffs = (2.0, 8.0)
    full = localise(bridge, forget, retain, reference, coeffs, settings=settings_for())
    lean = localise(bridge, forget, retain, reference, coeffs, settings=settings_for(figure_probes=False))
    assert (lean.best_layer, lean.best_coeff, lean.ranking) == (full.best_layer, full.best_coeff, full.ranking)
    assert torch.equal(lean.steer_logodds, full.steer_logodds) and torch.equal(lean.steer_retain_kl[:, 0], full.steer_retain_kl[:, 0])
    assert lean.steer_retain_kl[:, 1:].isnan().all() and lean.steer_refusal_rate.isnan().all()
    assert not full.steer_refusal_rate.isnan().any()
    assert torch.equal(lean.ablation_drop, full.ablation_drop) and lean.ablation_retain_kl.isnan().all()
    assert torch.allclose(lean.patching[:, -1], full.patching[:, -1], atol=1e-5) and lean.patching[:, :-1].isnan().all()
    assert math.isnan(lean.baseline_logodds) and math.isnan(lean.baseline_refusal_rate) and not math.isnan(full.baseline_logodds)
