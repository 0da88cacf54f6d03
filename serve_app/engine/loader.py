"""Load a GPT-2-family checkpoint and its tokenizer, safely.

Safety by default: weights come from safetensors only (a pickle can run code when loaded), and
never with `trust_remote_code`. A LoRA adapter in peft format is merged into the base weights at
load, so serving it costs nothing extra per token.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PretrainedConfig, PreTrainedTokenizerBase

from serve_app.engine import linear

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served as asked; the message says what to fix."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for, but no CUDA device is visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
    # Half precision on a CPU is slower than float32 here and loses accuracy: serve float32.
    if device.type == "cpu" and dtype == "float16":
        return torch.float32
    return DTYPES[dtype]


def auto_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype that keeps GPT-2's outputs: bfloat16 where the hardware computes in it,
    float32 elsewhere.

    On a CPU with bf16 units (AVX512-BF16 or AMX) oneDNN runs bfloat16 matmuls at about twice
    float32's rate (the KV cache's dtype is chosen apart: gpt2.py `cache_dtype`); the shipped
    models' held-out bits per byte moved by at most 0.001 in bfloat16 (docs/performance.md,
    "dtype: auto"). Without the units bfloat16 is emulated and slower than float32. On a GPU:
    bfloat16 where supported (float16 overflows more easily), else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and linear.cpu_has_bf16_units() and linear.onednn_works(torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def _local_path(source: str) -> str:
    """`hf://name` becomes a hub id (downloaded by transformers where the hub is reachable)."""
    if source.startswith("hf://"):
        return source[len("hf://"):]
    if "://" in source:
        raise CheckpointError(
            f"source {source!r}: remote URIs other than hf:// must be synced to a local folder first"
        )
    if not Path(source).is_dir():
        raise CheckpointError(f"source {source!r} is not a folder holding a checkpoint")
    return source


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough for GPT-2's BPE


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    path = _local_path(source)
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{source!r} has no tokenizer (neither tokenizer.json nor vocab.json + merges.txt); "
            "save the tokenizer into the checkpoint folder with tokenizer.save_pretrained(folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    # transformers 5 can build a GPT-2 tokenizer that silently encodes everything to []
    # when its files are not where it expects them: refuse that instead of serving nonsense.
    if not tokenizer.encode("Hello world"):
        raise CheckpointError(f"the tokenizer in {source!r} encodes text to nothing")
    return tokenizer


def load_model(
    source: str, adapter: str | None, device: torch.device, dtype: torch.dtype
) -> GPT2LMHeadModel:
    path = _local_path(source)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise CheckpointError(f"{source!r} has no .safetensors weights (pickled weights are refused)")
    _check_architecture(source, path)
    try:
        model, info = GPT2LMHeadModel.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. weights whose shapes config.json contradicts
        why = ("its weights' shapes do not match its config.json" if "mismatch" in str(exc).lower()
               else str(exc).splitlines()[0][:300])
        raise CheckpointError(f"{source!r} cannot be loaded: {why}") from None
    # transformers fills the weights a checkpoint lacks with random values and only logs it: a
    # model that would generate noise is refused instead. (Shapes that contradict config.json
    # raise above.)
    absent = sorted(info["missing_keys"])
    if absent:
        raise CheckpointError(f"{source!r} lacks {len(absent)} of the model's weights "
                              f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}); "
                              "re-save the checkpoint with save_pretrained")
    if adapter:
        model = _merge_adapter(model, adapter)
    return model.to(device=device, dtype=dtype).eval()


def _check_architecture(source: str, path: str) -> None:
    """The engine's runner is GPT-2's forward pass: a checkpoint of another architecture would
    load into it as random weights, so its config.json must say GPT-2."""
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{source!r} has no config.json; save the model with save_pretrained(folder)")
    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source!r}: its config.json cannot be read ({exc})") from None
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source!r} holds a model of type {model_type!r} (config.json model_type); "
                              "Quill's engine serves GPT-2-architecture models (model_type 'gpt2')")


def _merge_adapter(model: GPT2LMHeadModel, adapter: str) -> GPT2LMHeadModel:
    from peft import PeftModel  # imported here: only adapters need it

    if "://" in adapter:
        raise CheckpointError(f"adapter {adapter!r}: remote URIs must be synced to a local folder first")
    if not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        raise CheckpointError(f"adapter {adapter!r} has no adapter_model.safetensors")
    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # trained on another base, or not LoRA
        why = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300] or type(exc).__name__
        raise CheckpointError(f"adapter {adapter!r} does not fit its base model: {why}") from None
