"""Load a GPT-2-family checkpoint and its tokenizer, safely.

Safety by default: weights come from safetensors only (a pickle can run code when loaded), and
never with `trust_remote_code`. A LoRA adapter in peft format is merged into the base weights at
load, so serving it costs nothing extra per token.

The engine reads a checkpoint's tensors straight from its safetensors files (`load_weights`), not
through transformers' `GPT2LMHeadModel`: importing that module pulls in torch._dynamo and
torch.distributed.tensor, 3.3 s of every model replica's start on a 2-core box, where the whole
replica took about 15 s. transformers' model is built from the same tensors where a
`GPT2LMHeadModel` is wanted (`load_model`: training/evaluate.py scores what the server serves)
and for peft to merge an adapter.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2Config, PretrainedConfig, PreTrainedTokenizerBase

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


def _checkpoint_folder(source: str) -> Path:
    """The local folder holding `source`'s files. An `hf://name` is huggingface_hub's snapshot
    (fetched, or found in its cache) and the tokenizer and the weights are read from that
    folder: left to transformers, each `from_pretrained` of a hub id retried an unreachable hub
    for 50 s before a raw OSError."""
    if source.startswith("hf://"):
        return _download(source, source[len("hf://"):])
    if "://" in source:
        raise CheckpointError(
            f"source {source!r}: remote URIs other than hf:// must be synced to a local folder first"
        )
    if not Path(source).is_dir():
        raise CheckpointError(f"source {source!r} is not a folder holding a checkpoint")
    return Path(source)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough for GPT-2's BPE


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    path = _checkpoint_folder(source)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
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


@dataclass
class GPT2Weights:
    """A GPT-2 checkpoint as the engine's runner reads it: its config and its tensors, named as
    in transformers' `GPT2LMHeadModel.state_dict()` ("transformer.h.0.attn.c_attn.weight", ...)."""

    config: GPT2Config
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of_model(cls, model) -> GPT2Weights:
        """The weights of a transformers `GPT2LMHeadModel` in memory (a test's, a bench's)."""
        return cls(model.config, {k: v.detach() for k, v in model.state_dict().items()})


def as_weights(model: GPT2Weights | Any) -> GPT2Weights:
    return model if isinstance(model, GPT2Weights) else GPT2Weights.of_model(model)


def load_weights(source: str, adapter: str | None, device: torch.device, dtype: torch.dtype) -> GPT2Weights:
    """The checkpoint's tensors in `dtype` on `device`, the adapter merged in; refused with
    what to fix where GPT-2's forward pass would not get every weight it reads."""
    folder = _checkpoint_folder(source)
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{source!r} has no .safetensors weights (pickled weights are refused)")
    _check_architecture(source, folder)
    config = GPT2Config.from_pretrained(folder)
    tensors = _gpt2_tensors(source, config, _read_safetensors(source, folder))
    if adapter:  # merged in float32 (its product adds in full precision), then moved
        _check_adapter_base(source, folder, adapter)
        tensors = _merge_adapter(GPT2Weights(config, _converted(tensors, dtype=torch.float32)), adapter).tensors
    return GPT2Weights(config, _converted(tensors, device=device, dtype=dtype))


def _converted(tensors: dict[str, torch.Tensor], **to) -> dict[str, torch.Tensor]:
    """`tensor.to(**to)` for each, converting a tied tensor once (GPT-2's lm_head is its token
    embedding: two copies would be 77 MB more on a GPU for gpt2-small in float16)."""
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in done:
            done[key] = t.to(**to)
        out[name] = done[key]
    return out


def load_model(source: str, adapter: str | None, device: torch.device, dtype: torch.dtype):
    """The same weights as the engine serves, as a transformers `GPT2LMHeadModel` (in eval mode)."""
    return _hf_model(load_weights(source, adapter, device, dtype)).eval()


def _hf_model(weights: GPT2Weights):
    from transformers import GPT2LMHeadModel  # imported here: only adapters and evaluate need it

    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = GPT2LMHeadModel(weights.config)
    model.load_state_dict(weights.tensors, strict=True, assign=True)
    return model


def _download(source: str, repo_id: str) -> Path:
    """An `hf://` checkpoint: its config and safetensors from the hub (or its local cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # *.txt: merges.txt, half of a GPT-2 tokenizer saved without tokenizer.json
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source!r} cannot be fetched: the Hugging Face hub cannot be reached from here and the model "
            "is not in this machine's hub cache (HF_HOME); fetch it where the hub is reachable, or save it "
            "with save_pretrained to a folder and name that folder as source") from None
    except HFValidationError:
        raise CheckpointError(f"{source!r}: {repo_id!r} is not a hub model id (hf://name or hf://owner/name)") from None
    except Exception as exc:  # noqa: BLE001 - unknown repo, no access: the hub's first line says which
        raise CheckpointError(f"{source!r} cannot be fetched from the hub: {str(exc).splitlines()[0][:300]}") from None


def _read_safetensors(source: str, folder: Path, files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `files` in `folder` (by default a checkpoint's: model.safetensors or its
    shards); a file that cannot be read is refused naming `source` and the file."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for name in files if files is not None else _checkpoint_files(source, folder):
        try:
            tensors.update(load_file(folder / name))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise CheckpointError(f"{source!r} cannot be loaded: {name}: {str(exc).splitlines()[0][:300]}") from None
    return tensors


def _checkpoint_files(source: str, folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names each tensor's file
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise CheckpointError(f"{source!r} has no model.safetensors (nor a model.safetensors.index.json); "
                          "save the model with save_pretrained(folder)")


def _gpt2_tensors(source: str, config: GPT2Config, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors GPT-2's forward pass reads, by their transformers names. As transformers
    loads them: the hub's own GPT-2 names its tensors without the "transformer." prefix, stores
    no lm_head (tied to the token embedding) and old attention-mask buffers, which are ignored."""
    named = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in stored.items()}
    shapes = _expected_shapes(config)
    if getattr(config, "tie_word_embeddings", True) and "transformer.wte.weight" in named:
        named["lm_head.weight"] = named["transformer.wte.weight"]
    absent = sorted(k for k in shapes if k not in named)
    if absent:
        # Served, a missing weight would be noise (transformers fills it randomly and only logs it).
        raise CheckpointError(f"{source!r} lacks {len(absent)} of the model's weights "
                              f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}); "
                              "re-save the checkpoint with save_pretrained")
    wrong = [k for k, shape in shapes.items() if tuple(named[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"{source!r} cannot be loaded: its weights' shapes do not match its config.json "
                              f"({wrong[0]} is {list(named[wrong[0]].shape)}, config.json implies {list(shapes[wrong[0]])})")
    return {k: named[k] for k in shapes}


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    e, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    shapes = {"transformer.wte.weight": (config.vocab_size, e), "transformer.wpe.weight": (config.n_positions, e),
              "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({  # transformers' Conv1D stores its weight [in, out]
            h + "ln_1.weight": (e,), h + "ln_1.bias": (e,), h + "ln_2.weight": (e,), h + "ln_2.bias": (e,),
            h + "attn.c_attn.weight": (e, 3 * e), h + "attn.c_attn.bias": (3 * e,),
            h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
            h + "mlp.c_fc.weight": (e, inner), h + "mlp.c_fc.bias": (inner,),
            h + "mlp.c_proj.weight": (inner, e), h + "mlp.c_proj.bias": (e,),
        })
    shapes["lm_head.weight"] = (config.vocab_size, e)
    return shapes


def _check_architecture(source: str, path: Path) -> None:
    """The engine's runner is GPT-2's forward pass: a checkpoint of another architecture would
    load into it as random weights, so its config.json must say GPT-2."""
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise CheckpointError(f"{source!r} is a LoRA adapter, not a model: name it as `adapter` and set "
                                  "`source` to the base it was trained on")
        raise CheckpointError(f"{source!r} has no config.json; save the model with save_pretrained(folder)")
    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source!r}: its config.json cannot be read ({exc})") from None
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source!r} holds a model of type {model_type!r} (config.json model_type); "
                              "Quill's engine serves GPT-2-architecture models (model_type 'gpt2')")


# Written by training/ beside an adapter: the fingerprint of the base weights it was trained on.
ADAPTER_BASE_FILE = "quill_base.json"


def weights_sha256(folder: str | os.PathLike) -> str:
    """SHA-256 over a checkpoint's safetensors files, in name order: the same weights saved the
    same way hash the same (30 ms for quill-base's 33 MB here, on every load of an adapter)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _check_adapter_base(source: str, folder: Path, adapter: str) -> None:
    """An adapter on a base of another shape fails to merge; on another base of the same shape it
    would merge and serve noise. Where training/ recorded the base's fingerprint, compare it
    (an adapter from elsewhere has none: only the shapes are checked)."""
    recorded = Path(adapter) / ADAPTER_BASE_FILE
    if "://" in adapter or not recorded.is_file():
        return
    expected = json.loads(recorded.read_text()).get("base_weights_sha256")
    if expected and weights_sha256(folder) != expected:
        raise CheckpointError(f"adapter {adapter!r} was trained on other weights than {source!r} holds "
                              f"({ADAPTER_BASE_FILE}: base_weights_sha256 {expected[:12]}…); set `source` to "
                              "the base it was trained on, or retrain the adapter on this one")


def _merge_adapter(weights: GPT2Weights, adapter: str) -> GPT2Weights:
    from peft import PeftModel  # imported here: only adapters need it

    if "://" in adapter:
        raise CheckpointError(f"adapter {adapter!r}: remote URIs must be synced to a local folder first")
    if not os.path.exists(os.path.join(adapter, "adapter_model.safetensors")):
        raise CheckpointError(f"adapter {adapter!r} has no adapter_model.safetensors")
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise CheckpointError(f"adapter {adapter!r} has no adapter_config.json (peft's save_pretrained writes it "
                              "beside adapter_model.safetensors)")
    _read_safetensors(adapter, Path(adapter), ["adapter_model.safetensors"])  # a truncated file, named
    # Untied while merging: GPT-2's lm_head is its token embedding, and a merge writes into the
    # weight in place, so a LoRA on lm_head would also move the input embedding (or one on wte the
    # output), serving another model than the one trained (greedy tokens all different, logits
    # 5.7 apart, on a tiny GPT-2). Tied again below where the merge left them equal.
    config = copy.deepcopy(weights.config)
    config.tie_word_embeddings = False
    tensors = {**weights.tensors, "lm_head.weight": weights.tensors["lm_head.weight"].clone()}
    try:
        model = PeftModel.from_pretrained(_hf_model(GPT2Weights(config, tensors)), adapter, is_trainable=False)
        merged = GPT2Weights.of_model(model.merge_and_unload())
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # trained on another base, or not LoRA
        why = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300] or type(exc).__name__
        raise CheckpointError(f"adapter {adapter!r} does not fit its base model: {why}") from None
    wte, head = merged.tensors["transformer.wte.weight"], merged.tensors["lm_head.weight"]
    if weights.config.tie_word_embeddings and torch.equal(wte, head):
        return GPT2Weights(weights.config, {**merged.tensors, "lm_head.weight": wte})
    return merged
