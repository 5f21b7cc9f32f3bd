"""Load a Hugging Face causal LM through TransformerLens's TransformerBridge and reach the
parts LUNAR needs: hook names per layer and the MLP down-projection W_out."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lunar_lens.core.errors import LunarError, first_line
from lunar_lens.core.progress import Stages, library_bars
from lunar_lens.model.names import check_layer
from lunar_lens.model.weights import check_dense_mlp

# The transformers versions the bridge is verified with (pyproject.toml declares the same range; both ends
# pass tests/test_model.py's bridge-vs-HF generation tests). 5.24 renamed the attention argument
# `past_key_values` to `cache`, which TransformerLens 4.3's AttentionBridge does not read: its KV cache is
# skipped and generation silently diverges from HF.
SUPPORTED_TRANSFORMERS = ">=5.9,<5.24"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Max |Δ logit| between the export's reload and the in-memory model: the same code on the same weights.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Max |Δ logit| / max(1, max |logit|) between the bridge (eager attention) and the HF model as loaded by
# default (sdpa). Measured on correct mappings: ≤ 3e-7 in float32; in bfloat16 up to 0.012
# (TinyStories-656K), in float16 8e-4: the two attention kernels round differently.
LOAD_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CHECK_PROMPT = "The capital of France is"
# Where each loaded bridge was read from (`loaded_from`); kept beside the bridge, which forwards unknown
# attributes to the HF model, rather than set on it.
SOURCES: weakref.WeakKeyDictionary[TransformerBridge, str | None] = weakref.WeakKeyDictionary()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LunarError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def check_transformers(installed: str | None = None) -> None:
    """Refuse a transformers outside `SUPPORTED_TRANSFORMERS` before any model is built."""
    installed = installed or transformers.__version__
    if not SpecifierSet(SUPPORTED_TRANSFORMERS).contains(installed, prereleases=True):
        raise LunarError(
            f"transformers {installed} is installed, but lunar-lens supports transformers{SUPPORTED_TRANSFORMERS} "
            "(with 5.24 and later, TransformerLens 4.3's bridge generates wrongly): "
            f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        )


def load_tokenizer(path_or_id: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer with bos/eos/pad defined and left padding (for batched prompts)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise LunarError(f"the tokenizer of {path_or_id} cannot be loaded ({first_line(error)}): save a working tokenizer into the folder") from None
    if tokenizer.eos_token is None:
        raise LunarError(f"the tokenizer of {path_or_id} defines no eos token: set eos_token in tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def model_folder(path_or_id: str | Path) -> Path:
    """The local folder of a model (a hub id: its cached snapshot, downloaded when missing and online),
    checked before any weight is read: config.json, tokenizer files, intact safetensors weights."""
    from lunar_lens.model.checkpoint import Checkpoint, local_folder

    root = local_folder(path_or_id, download=True)
    if not (root / "config.json").is_file():
        raise LunarError(f"{root} is not a Hugging Face model folder (no config.json): pass the folder that holds config.json")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise LunarError(f"{root} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …): save the model's tokenizer into it")
    return Checkpoint.open(root).root


def read_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (no weights read); it must declare its number of layers."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        int(config.num_hidden_layers)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
        raise LunarError(f"{folder / 'config.json'} cannot be read ({first_line(error)}): fix it or re-download the checkpoint") from None
    return config


def check_folder_layers(folder: Path, layers: Sequence[int]) -> None:
    """Refuse a layer the model in `folder` does not have (read from config.json, before it loads)."""
    total = int(read_config(folder).num_hidden_layers)
    for layer in layers:
        check_layer(total, layer)


def load_model(
    path_or_id: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    progress: bool = False,
) -> TransformerBridge:
    """Load a causal LM (local folder, offline; or a hub id, from the cache) as a TransformerBridge.

    Weights are the raw HF weights (no folding), so an edit of W_out maps 1:1 onto the checkpoint.
    `device_map` ("auto", "balanced" or a dict of module → device) spreads the layers over devices
    through accelerate; `max_memory` ({gpu index: bytes}) limits which devices it may use. The folder is
    checked before any weight is read, and the bridge's logits are compared with the HF model's. With
    `progress`, one line on stderr says what was loaded and how long it took.
    """
    check_transformers()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LunarError("{device} cuda was asked for but no CUDA device is available: use {device} cpu", ("device",))
    torch_dtype = parse_dtype(dtype)
    folder = model_folder(path_or_id)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    read_config(folder, trust_remote_code)  # refused here when config.json is unreadable
    tokenizer = load_tokenizer(folder)
    with Stages(progress)("load", f"loaded {path_or_id} ({dtype})"), library_bars():
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, use_safetensors=True, device_map=device_map,
                max_memory=max_memory, trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise LunarError(f"transformers cannot load {folder} ({first_line(error)}): check that its weights match config.json") from None
        if device_map is None:
            hf_model.to(device)
        bridge = _bridge(hf_model, tokenizer, str(folder), None if device_map else device)
    SOURCES[bridge] = str(path_or_id)
    if torch_dtype in (torch.bfloat16, torch.float16):  # float32 takes a strided input without the copy
        bridge.add_hook("unembed.hook_in", _contiguous_input, is_permanent=True)
    return bridge


def wrap_hf_model(hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, source_path: str | None = None) -> TransformerBridge:
    """Bridge an already-built HF model (tests build tiny random ones from configs)."""
    check_transformers()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    bridge = _bridge(hf_model, tokenizer, hf_model.config.name_or_path or hf_model.config.model_type, "cpu")
    SOURCES[bridge] = source_path
    return bridge


def loaded_from(bridge: TransformerBridge) -> str | None:
    """The folder or hub id `load_model` read `bridge` from (None: a model built in memory): what export
    copies, and what patches and reports name."""
    return SOURCES.get(bridge)


def _contiguous_input(activation: torch.Tensor, hook=None) -> torch.Tensor:
    """The unembedding's input made contiguous: HF slices it (`logits_to_keep`), and the bridge's linear with a
    bias then copies the whole weight once per row in half precision on the CPU (experiments/bf16_pass.py: a 45M
    bf16 model's refinement step 2.1× the memory and 7× the time). A permanent hook, so `reset_hooks` keeps it."""
    return activation.contiguous()


@torch.no_grad()
def _bridge(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str | None) -> TransformerBridge:
    """Wrap `hf_model` in a TransformerBridge (eager attention, which its hooks need), refused when the
    bridge's logits on a short prompt differ from the HF model's as loaded (its default attention): the
    edit would be solved on another forward pass than the one the checkpoint runs. Also refused: a
    model with no dense W_out."""
    hf_model.eval()
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids.to(hf_model.device)
    expected = hf_model(input_ids=ids).logits.float()
    architecture = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    try:
        hf_model.set_attn_implementation("eager")
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=hf_model.dtype)
        bridge.eval()
        found = bridge(ids).float()
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError, NotImplementedError) as error:
        raise LunarError(
            f"TransformerLens {version('transformer-lens')} cannot run {architecture} ({type(error).__name__}: {first_line(error)}): "
            "use a model of an architecture it supports"
        ) from None
    diff = float((found.to(expected.device) - expected).abs().max())
    tolerance = LOAD_TOLERANCE[hf_model.dtype] * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:
        raise LunarError(
            f"TransformerLens {version('transformer-lens')} runs {architecture} differently from transformers (logits differ by "
            f"{diff:.3g}, tolerance {tolerance:.2g}): its edits would be solved on a wrong forward pass; use an architecture "
            "whose bridge matches (e.g. Llama, Qwen2, Gemma, Mistral, GPT-2)"
        )
    check_dense_mlp(bridge)
    return bridge


