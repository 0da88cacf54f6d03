"""Export a trained model so that `quill serve` can load it with no code change.

A base model becomes a folder with config.json, model.safetensors, the tokenizer files and a
README.md model card. A LoRA genre model becomes a peft adapter folder (adapter_config.json,
adapter_model.safetensors) plus the tokenizer and a card; the serving side loads the base named
by the registry entry's `source` and merges the adapter with peft's merge_and_unload.

Only safetensors are written; nothing here pickles.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import torch

from serve_app.engine.loader import ADAPTER_BASE_FILE, weights_sha256
from training.recipe import RecipeError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Registry defaults for the small CPU-friendly models that ship with Quill; a recipe's
# export.entry overrides any of them.
DEFAULT_ENTRY = {
    "device": "auto",
    "dtype": "auto",  # bfloat16 where the CPU or GPU computes in it (serve_app/engine/loader.py)
    "gpus_per_replica": 0,
    "cpus_per_replica": 0.25,
    "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
    "engine": {"max_batch_size": 16, "max_seq_len": 512},
    # frequency_penalty: without it these small models fall into runs of blank lines (5 of 10
    # quill-base samples at 0 had two or more in a row, none of 10 at 0.5; docs/training.md)
    "defaults": {"max_tokens": 48, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                 "frequency_penalty": 0.5},
    "limits": {"max_prompt_tokens": 384, "max_tokens": 128, "max_n": 4},
}

# Registry order: base first, then the genres in the order.
ORDER = ["quill-base", "quill-legal", "quill-copywriting", "quill-lyrics", "quill-fantasy",
         "quill-abstracts"]


def save_tokenizer(tokenizer, out_dir: Path, max_len: int) -> None:
    """Every exported folder carries its tokenizer, so a checkpoint is self-contained."""
    tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(str(out_dir))


def export_full(model, tokenizer, out_dir: Path, dtype: str = "float32") -> None:
    """save_pretrained with safetensors; the weights are cast to `dtype` on the way out
    (float16 halves the shipped size; the engine loads in the registry's dtype)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(DTYPES[dtype])
    model.config.use_cache = True  # training turns it off; serving wants the KV cache
    model.save_pretrained(str(out_dir))  # transformers 5 writes safetensors only
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.generation_config.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir, model.config.n_positions)


def export_adapter(peft_model, tokenizer, out_dir: Path, base_ref: str, max_len: int,
                   dtype: str = "float32", base_dir: Path | None = None) -> None:
    """Save only the adapter's weights (a few MB) and point the adapter config at its base.

    `dtype` float16 halves the file, so twice the LoRA rank fits the same weight budget; the
    trainable weights are rounded in place first, so what the card then measures is what ships
    (the loader merges them into the base in the registry's dtype)."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(p.to(DTYPES[dtype]))
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    if dtype != "float32":
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                   for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # peft records the absolute path it was trained from; the registry's `source` is what the
    # server uses, but keep this portable and readable too.
    cfg["base_model_name_or_path"] = base_ref
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if base_dir is not None:  # the loader refuses the adapter on any other weights
        record = {"base": base_ref, "base_weights_sha256": weights_sha256(base_dir)}
        (out_dir / ADAPTER_BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    save_tokenizer(tokenizer, out_dir, max_len)


def _round_trip(text: str):
    """ruamel.yaml in round-trip mode, indenting lists as `text` does: an update keeps the
    registry's comments, anchors, key order and quoting (PyYAML dropped them all)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.width = 100
    first_item = re.search(r"^( *)- ", text, re.M)
    offset = len(first_item.group(1)) if first_item else 0
    rt.indent(mapping=2, sequence=offset + 2, offset=offset)
    return rt


def read_registry(registry_path: Path):
    """(the registry's round-trip data, its YAML handler); a missing file is an empty registry.
    Raises RecipeError naming the file where it cannot be updated safely: not YAML, not a mapping
    with a `models` list, or a key given twice (which `quill serve` refuses too)."""
    from ruamel.yaml.error import YAMLError

    text = registry_path.read_text(encoding="utf-8") if registry_path.exists() else ""
    rt = _round_trip(text)
    try:
        data = rt.load(text) if text.strip() else None
    except YAMLError as exc:  # DuplicateKeyError is one
        problem = " ".join(str(exc).split())[:300]
        raise RecipeError(str(registry_path), [f"{registry_path} cannot be updated: {problem}"]) from None
    if data is None:
        data = rt.load("models: []\n")
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise RecipeError(str(registry_path), [f"{registry_path} cannot be updated: expected a mapping "
                                               "with a 'models' list"])
    return data, rt


def update_registry(registry_path: Path, entry: dict) -> None:
    """Insert or replace one model's entry in the registry. The file is otherwise kept as it
    is: other models, comments, anchors and order; a new model goes in ORDER's place."""
    data, rt = read_registry(registry_path)
    models = data.setdefault("models", [])
    names = [m.get("name") if isinstance(m, dict) else None for m in models]
    if entry["name"] in names:
        models[names.index(entry["name"])] = entry
    else:
        rank = {name: i for i, name in enumerate(ORDER)}
        mine = rank.get(entry["name"], len(ORDER))
        later = [i for i, name in enumerate(names) if rank.get(name, len(ORDER)) > mine]
        models.insert(later[0] if later else len(models), entry)
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    if not registry_path.exists():
        out.write("# Quill model registry: one entry per served model (see docs/models.md).\n"
                  "# Relative paths resolve against this folder. Written by training/export.py;\n"
                  "# a re-export rewrites its model's entry (from the recipe's export.entry) and\n"
                  "# keeps everything else in this file as it is.\n")
    rt.dump(data, out)
    registry_path.write_text(out.getvalue(), encoding="utf-8")


def registry_entry(name: str, source: str, adapter: str | None, overrides: dict) -> dict:
    """DEFAULT_ENTRY with the recipe's export.entry over it; a section (defaults, limits, ...)
    is merged key by key, so `defaults: {max_tokens: 16}` keeps the other defaults."""
    entry = {"name": name, "source": source}
    if adapter:
        entry["adapter"] = adapter
    for key in {**DEFAULT_ENTRY, **overrides}:
        default, value = DEFAULT_ENTRY.get(key), overrides.get(key, DEFAULT_ENTRY.get(key))
        if isinstance(default, dict) and isinstance(value, dict):
            value = {**default, **value}
        entry[key] = value
    return entry


def write_card(out_dir: Path, text: str) -> None:
    (out_dir / "README.md").write_text(text)


# The training run's summary (steps, minutes, tokens/s, the box) travels with the weights it made:
# runs/ is a scratch folder a fresh checkout lacks, and docs/models.md's training table is
# rendered from this file.
TRAINING_RUN = "training_run.json"


def write_training_run(out_dir: Path, summary: dict) -> None:
    (out_dir / TRAINING_RUN).write_text(json.dumps(summary, indent=1) + "\n")


def read_training_run(model_dir: Path) -> dict | None:
    path = Path(model_dir) / TRAINING_RUN
    return json.loads(path.read_text()) if path.exists() else None


def shipped_bytes(models_dir: Path) -> int:
    """Total size of every .safetensors file under models/ (the 60 MB budget)."""
    return sum(p.stat().st_size for p in Path(models_dir).rglob("*.safetensors"))
