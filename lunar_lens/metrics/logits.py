"""Model-based metrics of answer tokens (ranks, MRR, hit-rate, extraction strength, perplexity, probability),
TOFU's truth ratio, normalised probability, forget quality and model utility (open-unlearning's definitions),
and KL to the base model; batched, one value per example."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from transformers import PreTrainedTokenizerBase

from lunar_lens.core.errors import LunarError
from lunar_lens.data.prompts import TokenBatch, tokenize


@runtime_checkable
class LogitModel(Protocol):
    """Anything called like a TransformerBridge: `model(input_ids, attention_mask=...)` returns
    logits [batch, seq, vocab], and `model.tokenizer` is its (fast) tokenizer."""

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


# ---------------------------------------------------------------- model-based metrics

def _device(model: LogitModel) -> torch.device:
    parameters = getattr(model, "parameters", None)
    return next(parameters()).device if parameters is not None else torch.device("cpu")


@torch.no_grad()
def _per_answer_token(
    model: LogitModel,
    questions: list[str],
    answers: list[str],
    batch_size: int,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """`score(logits [n, vocab], gold [n]) -> [n]` on every answer token (eos included) under
    teacher forcing, split into one CPU tensor per example."""
    if len(questions) != len(answers):
        raise LunarError(f"{len(questions)} questions for {len(answers)} answers: pass one answer per question")
    device = _device(model)
    values: list[torch.Tensor] = []
    for start in range(0, len(questions), batch_size):
        end = start + batch_size
        batch = tokenize(model.tokenizer, questions[start:end], answers[start:end]).to(device)
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, :-1]  # position t predicts t+1
        mask = batch.answer_mask[:, 1:]
        scored = score(logits[mask].float(), batch.input_ids[:, 1:][mask]).cpu()
        values += scored.split(mask.sum(dim=1).tolist())
    return values


def _rank(logits: Float[torch.Tensor, "n vocab"], gold: Int[torch.Tensor, " n"]) -> Int[torch.Tensor, " n"]:
    gold_logit = logits.gather(1, gold[:, None])
    return 1 + (logits > gold_logit).sum(dim=1)


def _nll(logits: Float[torch.Tensor, "n vocab"], gold: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, " n"]:
    return F.cross_entropy(logits, gold, reduction="none")


def _rank_and_nll(logits: Float[torch.Tensor, "n vocab"], gold: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, "n 2"]:
    return torch.stack([_rank(logits, gold).double(), _nll(logits, gold).double()], dim=1)


def answer_token_scores(
    model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32
) -> tuple[list[Int[torch.Tensor, " _answer"]], list[float]]:
    """Per example, from one teacher-forced pass: the answer-token ranks (`answer_token_ranks`) and the
    answer perplexity (`answer_perplexity`)."""
    scores = _per_answer_token(model, questions, answers, batch_size, _rank_and_nll)
    return [s[:, 0].long() for s in scores], [s[:, 1].mean().exp().item() for s in scores]


def answer_token_ranks(
    model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32
) -> list[Int[torch.Tensor, " _answer"]]:
    """Rank of each gold answer token (eos included) under teacher forcing: 1 + the number of
    vocabulary tokens with a strictly higher logit (1 = top; ties count in the gold's favour)."""
    return _per_answer_token(model, questions, answers, batch_size, _rank)


def rank_metrics(ranks: Sequence[Int[torch.Tensor, " _answer"]], k: int = 1) -> dict[str, list[float]]:
    """Per example, from answer-token ranks: MRR (mean 1/rank), hit rate (fraction ranked ≤ k) and
    extraction strength (Carlini et al. 2021; the unlearning literature).

    With answer tokens a_1..a_n (eos included), k_min is the shortest answer prefix a_1..a_k
    after which every remaining token a_{k+1}..a_n is the model's argmax given the gold prefix
    (teacher forcing); greedy decoding from prompt + a_1..a_k then reproduces the rest exactly.
    ES = 1 − k_min / n: 1 when the prompt alone yields the whole answer, 0 when even a_n is
    missed; k_min is the index just after the last token whose rank is not 1.
    """
    result: dict[str, list[float]] = {"mrr": [], "hit_rate": [], "extraction_strength": []}
    for example in ranks:
        wrong = (example != 1).nonzero()
        k_min = int(wrong[-1]) + 1 if len(wrong) else 0
        result["mrr"].append(example.float().reciprocal().mean().item())
        result["hit_rate"].append((example <= k).float().mean().item())
        result["extraction_strength"].append(1.0 - k_min / len(example))
    return result


def mean_reciprocal_rank(model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Per example: mean over answer tokens of 1 / rank."""
    return rank_metrics(answer_token_ranks(model, questions, answers, batch_size))["mrr"]


def hit_rate(model: LogitModel, questions: list[str], answers: list[str], k: int = 1, batch_size: int = 32) -> list[float]:
    """Per example: fraction of answer tokens ranked ≤ k."""
    return rank_metrics(answer_token_ranks(model, questions, answers, batch_size), k)["hit_rate"]


def extraction_strength(model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Extraction strength per example (definition: `rank_metrics`)."""
    return rank_metrics(answer_token_ranks(model, questions, answers, batch_size))["extraction_strength"]


def answer_perplexity(model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Per example: exp of the mean negative log-likelihood of the answer tokens (eos included)."""
    return [nll.mean().exp().item() for nll in _per_answer_token(model, questions, answers, batch_size, _nll)]


def answer_probability(model: LogitModel, questions: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Per example: TOFU's length-normalised probability P(answer | prompt)^(1/|answer|), i.e.
    exp(−mean NLL of the answer tokens, eos included) = 1 / `answer_perplexity`."""
    return [nll.double().mean().neg().exp().item() for nll in _per_answer_token(model, questions, answers, batch_size, _nll)]


def option_probabilities(
    model: LogitModel, questions: list[str], options: Sequence[Sequence[str]], batch_size: int = 32
) -> list[Float[torch.Tensor, " _options"]]:
    """Per question, `answer_probability` of each of its answer options (float64); every
    (question, option) pair goes through the same batched passes."""
    if len(questions) != len(options):
        raise LunarError(f"{len(questions)} questions for {len(options)} option lists: pass one list of answers per question")
    flat_questions = [question for question, answers in zip(questions, options) for _ in answers]
    probabilities = answer_probability(model, flat_questions, [answer for answers in options for answer in answers], batch_size)
    return list(torch.tensor(probabilities, dtype=torch.float64).split([len(answers) for answers in options]))


def truth_ratios(options: Sequence[Float[torch.Tensor, " _options"]]) -> Float[torch.Tensor, " n"]:
    """TOFU's truth ratio per question, from the probabilities of [true answer, false answers…]: the
    false answers' geometric mean over the true answer's, R = (Π_k p_false_k)^(1/K) / p_true
    (open-unlearning: exp(−mean_k loss_k) / exp(−loss_true)). Below 1 when the model prefers the truth."""
    padded = _padded(options)
    return padded[:, 1:].log().nanmean(dim=1).exp() / padded[:, 0]


def truth_ratio_score(ratios: Float[torch.Tensor, " n"], forget: bool) -> float:
    """open-unlearning's aggregation of truth ratios (higher is better). On a forget set, mean of
    min(R, 1/R) (`closer_to_1_better`: 1 when true and false answers are equally likely); on any other
    set, mean of max(0, 1 − R) (`true_better`: 1 when the false answers are improbable)."""
    return (torch.minimum(ratios, 1 / ratios) if forget else (1 - ratios).clamp(min=0)).mean().item()


def normalised_probability(options: Sequence[Float[torch.Tensor, " _options"]]) -> Float[torch.Tensor, " n"]:
    """Per question, p_true / (p_true + Σ_k p_false_k) over its [true, false…] option probabilities
    (open-unlearning's `probability_w_options`: TOFU's probability on real authors and world facts)."""
    padded = _padded(options)
    return padded[:, 0] / padded.nansum(dim=1)


def _padded(options: Sequence[Float[torch.Tensor, " _options"]]) -> Float[torch.Tensor, "n max_options"]:
    """Ragged option probabilities as one matrix, NaN where a question has fewer options."""
    return torch.nn.utils.rnn.pad_sequence(list(options), batch_first=True, padding_value=float("nan"))


def forget_quality(ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov–Smirnov test between the forget
    set's truth ratios under the evaluated model and under a retain model (never trained on the forget
    set). Near 1 when the two are indistinguishable; tiny when the model still knows the forget set."""
    from scipy.stats import ks_2samp

    if not len(ratios) or not len(retain_model_ratios):
        raise LunarError("forget_quality needs truth ratios from both models: pass at least one of each")
    return float(ks_2samp(ratios, retain_model_ratios).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """TOFU's model utility: the harmonic mean of the probability, ROUGE and truth-ratio scores of the
    retain and general-knowledge sets (open-unlearning's `hm_aggregate`); 0 when any of them is 0."""
    if not values:
        raise LunarError("model_utility got no values: pass the retain and factual sets' scores")
    return float(statistics.harmonic_mean(values))


def _last_prompt_log_probs(model: LogitModel, batch: TokenBatch) -> Float[torch.Tensor, "batch vocab"]:
    """Log-softmax of the logits at each row's last prompt token, on the CPU."""
    last = batch.last_prompt_index  # computed before moving: `last_prompt_index` builds its positions on the CPU
    on_device = batch.to(_device(model))
    logits = model(on_device.input_ids, attention_mask=on_device.attention_mask)
    return logits[torch.arange(len(last)), last].float().log_softmax(dim=-1).cpu()


def kl_divergence(log_p: Float[torch.Tensor, "n vocab"], log_q: Float[torch.Tensor, "n vocab"]) -> Float[torch.Tensor, " n"]:
    """KL(p ‖ q) per row, from log-probabilities."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(dim=-1)


@torch.no_grad()
def kl_to_base(model: LogitModel, base: LogitModel, questions: list[str], batch_size: int = 32) -> list[float]:
    """Per example: KL(base ‖ model) of the next-token distributions at the last prompt token
    (where the answer's first token is predicted). Both models must share the tokenizer."""
    kls: list[float] = []
    for start in range(0, len(questions), batch_size):
        batch = tokenize(model.tokenizer, questions[start : start + batch_size])
        log_p, log_q = _last_prompt_log_probs(base, batch), _last_prompt_log_probs(model, batch)
        kls += kl_divergence(log_p, log_q).tolist()
    return kls
