"""Each attack changes the model the way it claims, and leaves it untouched afterwards."""

import json

import pytest
import torch
from conftest import tiny_hf_model
from transformers.pytorch_utils import Conv1D

from lunar_lens.cli import main
from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import tokenize
from lunar_lens.data.qa import QA
from lunar_lens.directions.mean_difference import Directions
from lunar_lens.evaluate import attacks
from lunar_lens.evaluate.sets import evaluate_sets
from lunar_lens.model.generation import generate_answers
from lunar_lens.model.load import wrap_hf_model
from lunar_lens.model.names import n_layers, resid_post, resid_pre
from lunar_lens.toy.world import checkpoint_path

FORGET = [QA("Where does Zorvan Kelt live?", "Zorvan Kelt lives in Dramoor."), QA("What pet does Mira own?", "Mira has a pet owl.")]
RETAIN = [QA("Who wrote Hamlet?", "William Shakespeare")]
REFERENCE = [QA("Where does Velqui Mar live?", "I don't know."), QA("What does Ulsa Ro do?", "I don't know.")]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bridge(request, toy_tokenizer):
    return wrap_hf_model(tiny_hf_model(request.param, len(toy_tokenizer)), toy_tokenizer)


@pytest.fixture(scope="module")
def batch(toy_tokenizer):
    return tokenize(toy_tokenizer, [qa.question for qa in FORGET + RETAIN])


def run(bridge, batch):
    """Logits and the residual stream at every hook point, for one batch."""
    with torch.no_grad():
        return bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, return_cache_object=False)


def snapshot(bridge):
    return {name: p.detach().clone() for name, p in bridge.original_model.named_parameters()}


def assert_untouched(bridge, batch, weights, logits):
    assert all(torch.equal(p, weights[name]) for name, p in bridge.original_model.named_parameters())
    assert torch.equal(run(bridge, batch)[0], logits)  # and no hook left behind


def test_layer_skip_makes_the_block_output_its_input(bridge, batch):
    weights, (logits, clean) = snapshot(bridge), run(bridge, batch)
    with attacks.layer_skip(bridge, [1]) as attacked:
        skipped_logits, cache = run(attacked, batch)
    assert torch.equal(cache[resid_post(1)], cache[resid_pre(1)])
    assert torch.equal(cache[resid_pre(1)], clean[resid_pre(1)])  # block 0 is as before
    assert torch.equal(cache[resid_pre(2)], clean[resid_pre(1)])  # block 1 adds nothing
    assert not torch.allclose(clean[resid_post(1)], clean[resid_pre(1)])
    assert not torch.allclose(skipped_logits, logits)
    assert_untouched(bridge, batch, weights, logits)


def test_reverse_direction_subtracts_the_shift_everywhere(bridge, batch):
    weights, (logits, clean) = snapshot(bridge), run(bridge, batch)
    shift = torch.randn(bridge.cfg.d_model)
    with attacks.reverse_direction(bridge, {1: 3.0 * shift}):
        _, cache = run(bridge, batch)
    assert torch.allclose(cache[resid_post(1)], clean[resid_post(1)] - 3.0 * shift, atol=1e-6)
    assert torch.equal(cache[resid_post(0)], clean[resid_post(0)])  # earlier layers untouched
    assert_untouched(bridge, batch, weights, logits)


def test_abliteration_leaves_no_component_along_the_directions(bridge, batch):
    weights, (logits, clean) = snapshot(bridge), run(bridge, batch)
    torch.manual_seed(0)
    directions = torch.randn(2, bridge.cfg.d_model)
    basis = torch.linalg.qr(directions.T).Q
    with attacks.directional_ablation(bridge, directions):
        _, cache = run(bridge, batch)
    for layer in range(n_layers(bridge)):
        for name in (resid_pre(layer), f"blocks.{layer}.hook_resid_mid", resid_post(layer)):
            assert (clean[name] @ basis).abs().max() > 1e-2, name
            assert (cache[name] @ basis).abs().max() < 1e-5, name
    assert_untouched(bridge, batch, weights, logits)
    with pytest.raises(LunarError, match="zero"):
        with attacks.directional_ablation(bridge, torch.zeros(1, bridge.cfg.d_model)):
            pass


def test_fake_quantise_hand_computed():
    w = torch.tensor([[1.0, 0.45, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # 4 bits: qmax 7, scale 1/7: 3.15 → 3, -2.1 → -2; 8 bits: 57.15 → 57, -38.1 → -38; a zero row stays zero
    assert torch.allclose(attacks.fake_quantise(w, 4), torch.tensor([[1.0, 3 / 7, -2 / 7, 0.0], [0.0] * 4]))
    assert torch.allclose(attacks.fake_quantise(w, 8), torch.tensor([[1.0, 57 / 127, -38 / 127, 0.0], [0.0] * 4]))
    # one scale per column when the input dimension is 0
    assert torch.allclose(attacks.fake_quantise(w.T, 4, dim=0), attacks.fake_quantise(w, 4).T)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_inside_and_bit_identical_after(bridge, batch, bits):
    weights, (logits, _) = snapshot(bridge), run(bridge, batch)
    levels = 2 ** bits - 1
    conv1d_weights = {id(m.weight) for m in bridge.original_model.modules() if isinstance(m, Conv1D)}
    with attacks.quantised(bridge, bits):
        quantised_logits, _ = run(bridge, batch)
        for name, p in bridge.original_model.named_parameters():
            if p.ndim != 2:
                assert torch.equal(p, weights[name]), name
                continue
            assert not torch.equal(p, weights[name]), name
            conv1d = id(p) in conv1d_weights  # GPT-2 stores [in, out]
            channels = p.T if conv1d else p
            assert max(len(row.unique()) for row in channels) <= levels, name
            peak = weights[name].T if conv1d else weights[name]
            assert torch.allclose(channels.abs().amax(dim=1), peak.abs().amax(dim=1)), name  # the peak is on the grid
    assert not torch.equal(quantised_logits, logits)
    assert_untouched(bridge, batch, weights, logits)


def test_question_attacks_rewrite_the_prompts(tmp_path):
    assert [qa.question for qa in attacks.paraphrased(FORGET[:1], ["Tell me: {question}", "{question} Briefly."])] == [
        "Tell me: Where does Zorvan Kelt live?",
        "Where does Zorvan Kelt live? Briefly.",
    ]
    assert {qa.answer for qa in attacks.paraphrased(FORGET)} == {qa.answer for qa in FORGET}
    assert len(attacks.paraphrased(FORGET)) == len(FORGET) * len(attacks.PARAPHRASE_TEMPLATES)
    injected = attacks.prefix_injected(FORGET)
    assert injected[1] == QA(attacks.INJECTION_PREFIX + "What pet does Mira own?", "Mira has a pet owl.")
    tofu = tmp_path / "forget_perturbed.json"  # TOFU's perturbed format: JSON lines saved as .json
    records = [{"question": "Q?", "answer": "A.", "paraphrased_question": "Q, rephrased?", "perturbed_answer": ["B."]}]
    tofu.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert attacks.load_paraphrases(tofu) == [QA("Q, rephrased?", "A.")]
    plain = tmp_path / "paraphrases.json"
    plain.write_text(json.dumps([{"question": "Q, again?", "answer": "A."}]))
    assert attacks.load_paraphrases(plain) == [QA("Q, again?", "A.")]
    tofu.write_text(json.dumps({"paraphrased_question": "Q?"}) + "\n")
    with pytest.raises(LunarError, match="line 1"):
        attacks.load_paraphrases(tofu)


@pytest.fixture(scope="module")
def folders(toy_tokenizer, tmp_path_factory):
    """A 'base' tiny Llama and an 'edited' copy (W_out of layer 1 changed) saved as HF folders."""
    paths = {}
    for name in ("base", "edited"):
        paths[name] = tmp_path_factory.mktemp(name)
        model = tiny_hf_model("llama", len(toy_tokenizer), seed=1)
        if name == "edited":
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight.add_(0.1 * torch.randn_like(model.model.layers[1].mlp.down_proj.weight))
        model.save_pretrained(paths[name])
        toy_tokenizer.save_pretrained(paths[name])
    return paths


def test_run_attacks_reports_every_attack_and_restores(bridge, batch):
    weights, (logits, _) = snapshot(bridge), run(bridge, batch)
    directions = Directions(torch.randn(n_layers(bridge), bridge.cfg.d_model))
    results = attacks.run_attacks(bridge, FORGET, [1], directions, 4.0, retain=RETAIN, base=bridge, max_new_tokens=4)
    assert list(results) == [
        "base", "none", "layer_skip", "reverse_direction", "abliteration", "quantise_int8", "quantise_int4", "paraphrase", "prefix_injection",
    ]
    assert results["none"]["recovered"] == 0.0 and results["base"] == results["none"]  # the "base" here is the model itself
    for name in ("paraphrase", "prefix_injection"):
        assert results[name]["base_forget_rouge1"] == results[name]["forget_rouge1"]  # same model: same answers
    for name, result in results.items():
        assert 0 <= result["forget_rouge1"] <= 1 and 0 <= result["forget_refusal_rate"] <= 1
        assert ("retain_rouge1" in result) == (name not in {"paraphrase", "prefix_injection"})
        assert result["recovered"] == pytest.approx(result["forget_rouge1"] - results["none"]["forget_rouge1"])
    assert_untouched(bridge, batch, weights, logits)
    table = attacks.attacks_markdown(results).splitlines()
    assert table[0] == "| attack | forget ROUGE-1 | recovered | forget refusal | retain ROUGE-1 |"
    assert table[-1].startswith("| prefix_injection |") and table[-1].endswith("| – |")


def test_attacks_change_greedy_generation(bridge):
    """Hooks are live while decoding: skipping or ablating a block changes the answers."""
    questions = [qa.question for qa in FORGET]
    clean = generate_answers(bridge, questions, max_new_tokens=6)
    with attacks.layer_skip(bridge, [0, 1]):
        assert generate_answers(bridge, questions, max_new_tokens=6) != clean
    assert generate_answers(bridge, questions, max_new_tokens=6) == clean


def test_attack_command(folders, tmp_path, capsys):
    sets = {}
    for name, items in (("forget", FORGET), ("retain", RETAIN), ("reference", REFERENCE)):
        sets[name] = tmp_path / f"{name}.json"
        sets[name].write_text(json.dumps([{"question": qa.question} | ({"answer": qa.answer} if qa.answer else {}) for qa in items]))
    argv = ["attack", "--model", str(folders["edited"]), "--base", str(folders["base"]), "--forget", str(sets["forget"])]
    argv += ["--reference", str(sets["reference"]), "--out", str(tmp_path / "attacks.json"), "--max-new-tokens", "3"]
    assert main(argv) == 2
    assert "pass --layer N and --coeff C" in capsys.readouterr().err
    (folders["edited"] / "lunar_report.json").write_text(json.dumps({"layers": [1], "coeff": 2.5, "settings": {"direction_rule": "question"}}))
    assert main(argv + ["--retain", str(sets["retain"])]) == 0
    report = json.loads((tmp_path / "attacks.json").read_text())
    assert (report["layers"], report["coeff"], report["direction_rule"]) == ([1], 2.5, "question")
    assert {"base", "none", "layer_skip", "quantise_int4", "prefix_injection"} <= set(report["attacks"])
    assert "| layer_skip |" in capsys.readouterr().out
    assert main(argv + ["--layer", "7", "--coeff", "1", "--force"]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err


@pytest.mark.skipif(not (checkpoint_path() / "model.safetensors").exists(), reason="toy-world checkpoint not built")
def test_toy_world_edit_is_undone_by_layer_skip_and_abliteration(fresh_toy_bridge, world):
    """Measured: the closed-form edit lives in block 2 and along r_2, so bypassing either brings the answers back
    (the refined edit is not along r_2 alone: abliteration gives back 0.15 of it, experiments/README.md)."""
    from lunar_lens.edit.layers import EditSettings, edit_layers
    from lunar_lens.edit.refine import RefineSettings

    forget, retain, reference = world.split(world.entities[:2])
    settings = EditSettings(coeff=8.0, refine=RefineSettings(steps=0))
    result = edit_layers(fresh_toy_bridge, forget, retain, reference, layers=[2], settings=settings)

    def forget_rouge1() -> float:
        evaluation = evaluate_sets(fresh_toy_bridge, {"forget": forget}, max_new_tokens=24, model_metrics=False)
        return evaluation.scores["forget"]["rouge1"]

    assert forget_rouge1() < 0.2
    with attacks.layer_skip(fresh_toy_bridge, [2]):
        assert forget_rouge1() > 0.9
    with attacks.directional_ablation(fresh_toy_bridge, result.directions.vectors[[2]]):
        assert forget_rouge1() > 0.9
    assert forget_rouge1() < 0.2
