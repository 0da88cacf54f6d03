"""The YAML recipe: everything that decides a model, in one file per model (training/recipes/).

A recipe is plain YAML merged over DEFAULTS below. Keeping it a dict (not a class tree) means a
recipe file reads exactly like the defaults it overrides. Paths in a recipe are relative to the
repository root, so `quill train --recipe ...` works from any directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from training.data import GENRES, REPO_ROOT

DEFAULTS: dict = {
    "name": None,  # also the export folder (models/<name>) and the registry name
    "seed": 1234,
    "model": {
        # "scratch": a new GPT-2 from `config`; otherwise a checkpoint folder to start from
        "init": "scratch",
        "config": {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512},
    },
    "method": "full",  # full | lora
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["c_attn", "c_proj", "c_fc"],
             # small modules trained in full and saved with the adapter (peft modules_to_save);
             # merge_and_unload swaps them in. ln_f's bias, multiplied by the tied embedding,
             # shifts every logit: the cheapest lever toward a genre's own vocabulary.
             "modules_to_save": []},
    "data": {
        "genres": list(GENRES),
        "genre_weights": None,  # None = each genre equally often, whatever its size
        "block_size": 512,
        "val_fraction": 0.05,
        "chunk_chars": 4000,
        "corpora_dir": "training/corpora",
        "tokenizer": "models/gpt2-tokenizer",
        "cache_dir": "runs/cache",  # tokenised splits (git-ignored)
    },
    "train": {
        "steps": 1000,
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 1.0e-3,
        "min_lr_ratio": 0.1,  # cosine decay ends at lr * this
        "warmup_steps": 50,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "eval_every": 200,
        "eval_tokens": 8192,  # held-out tokens per genre for the quick eval during training
        "save_every": 100,  # resumable checkpoint under runs/<name>/ every this many steps
        "gradient_checkpointing": False,
        "mixed_precision": "auto",  # auto = bf16 (or fp16) on a GPU, fp32 on a CPU; or no|fp16|bf16
        "threads": 1,  # torch CPU threads; the build box is shared, so one by default
    },
    "export": {
        "dir": None,  # default models/<name>
        "dtype": "float32",  # dtype the weights are saved in (float16 halves a base model)
        "eval_tokens": 8192,  # held-out tokens per genre measured for the model card
        "registry": "models/registry.yaml",
        "entry": {},  # registry fields for this model (name/source/adapter are filled in)
    },
    "card": {"summary": "", "notes": ""},
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: str | Path) -> dict:
    """Read a recipe file and fill in defaults; refuse unknown top-level keys and bad values."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    recipe = _merge(DEFAULTS, raw)
    if not recipe["name"]:
        raise ValueError(f"{path}: recipe needs a 'name'")
    if recipe["method"] not in ("full", "lora"):
        raise ValueError(f"{path}: method must be 'full' or 'lora', not {recipe['method']!r}")
    if recipe["method"] == "lora" and recipe["model"]["init"] == "scratch":
        raise ValueError(f"{path}: a LoRA recipe needs model.init = a base checkpoint folder")
    bad = set(recipe["data"]["genres"]) - set(GENRES)
    if bad:
        raise ValueError(f"{path}: unknown genres {sorted(bad)}; known: {list(GENRES)}")
    recipe["export"]["dir"] = recipe["export"]["dir"] or f"models/{recipe['name']}"
    recipe["_path"] = str(path)
    return recipe


def recipe_hash(recipe: dict) -> str:
    """Hash of what decides the trained weights (not where they are exported, not the step count:
    a run may be resumed with more steps)."""
    keep = {k: recipe[k] for k in ("seed", "model", "method", "lora", "data")}
    keep["train"] = {k: v for k, v in recipe["train"].items() if k not in ("steps", "eval_every",
                                                                          "save_every", "threads")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def repo_path(p: str | Path) -> Path:
    """A recipe path: absolute as given, otherwise relative to the repository root."""
    p = Path(p)
    return p if p.is_absolute() else REPO_ROOT / p
