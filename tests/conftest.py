"""Shared fixtures: tiny random HF models of five families, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "TinyStories-656K"
FAMILIES = ("gpt2", "llama", "qwen2", "gemma", "mistral")

# The models here are tiny: one thread is as fast, and avoids thread contention on a shared 2-core box.
torch.set_num_threads(1)


def tiny_config(family: str, vocab_size: int, tie: bool = False) -> transformers.PretrainedConfig:
    """A 3-layer config of `family` small enough for CPU tests."""
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=256, **common)
    decoder = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**decoder)
    if family == "qwen2":
        return transformers.Qwen2Config(**decoder)
    if family == "gemma":
        return transformers.GemmaConfig(head_dim=8, **decoder)
    if family == "mistral":
        return transformers.MistralConfig(**decoder)
    raise ValueError(family)


def tiny_hf_model(family: str, vocab_size: int, tie: bool = False, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, tie))
    return model.eval()


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The embedded toy world's tokenizer (fast, with a chat template)."""
    from lunar_lens.model.load import load_tokenizer
    from lunar_lens.toy.world import checkpoint_path

    return load_tokenizer(checkpoint_path())


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory):
    """The toy tokenizer without its chat template (exercises the `Question: …\\nAnswer:` format)."""
    from lunar_lens.model.load import load_tokenizer
    from lunar_lens.toy.world import checkpoint_path

    tokenizer = load_tokenizer(checkpoint_path())
    tokenizer.chat_template = None
    folder = tmp_path_factory.mktemp("plain_tokenizer")
    tokenizer.save_pretrained(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="session")
def toy_bridge():
    """The shipped toy-world model, loaded once per session (tests must not edit it: use `fresh_toy_bridge`)."""
    from lunar_lens.model.load import load_model
    from lunar_lens.toy.world import checkpoint_path

    return load_model(checkpoint_path())


@pytest.fixture
def fresh_toy_bridge():
    from lunar_lens.model.load import load_model
    from lunar_lens.toy.world import checkpoint_path

    return load_model(checkpoint_path())


@pytest.fixture(scope="session")
def world():
    from lunar_lens.toy.world import build_world

    return build_world(0)


# ---------------------------------------------------------------- saved tiny checkpoints (export, patches)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fast BPE tokenizer (pad 0, bos 1, eos 2, as the conftest configs expect) with a chat template."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    text = "What is the capital of France? Who wrote Hamlet? User: Assistant: Question: Answer: the quick brown fox"
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def make_checkpoint(folder: Path, tokenizer_dir: Path, family: str = "llama", *, dtype: torch.dtype = torch.float32,
                    sharded: bool = True, tie: bool = False, seed: int = 0, **config) -> Path:
    """Save a tiny random `family` model (3 layers, d_model 32, d_mlp 64 unless `config` says) with the tokenizer."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model_config = tiny_config(family, len(tokenizer), tie)
    model_config.update(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config)
    model.to(dtype).save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    tokenizer.save_pretrained(folder)
    return folder


def folder_hashes(folder: Path) -> dict[str, str]:
    from lunar_lens.model.checkpoint import file_sha256

    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
