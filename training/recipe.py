"""The YAML recipe: everything that decides a model, in one file per model (training/recipes/).

A recipe file overrides the defaults of the schema below (`Recipe`; the same values as a plain
dict in DEFAULTS). Every section forbids unknown keys, as the registry does
(serve_app/config.py): a typo that is silently ignored (`train.lr_rate`) would train a model
with a default nobody asked for. A bad file is refused with one line per problem naming the file
and the field:

    training/recipes/quill-legal.yaml: train.lr_rate: unknown field (did you mean 'lr'?)

`load_recipe` still hands back a plain dict (the file merged over DEFAULTS, values exactly as
written), so the rest of training indexes it like `recipe["train"]["steps"]` and `recipe_hash`
sees the same content it always did. Paths in a recipe are relative to the repository root, so
`quill train --recipe ...` works from any directory.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.data import GENRES, REPO_ROOT


class RecipeError(ValueError):
    """The recipe file cannot be trained. `problems` holds one message per fault."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # strict: a value is taken as written, never converted ("100" is not a step count), so the
    # dict handed back (the file's own values) is exactly what was validated.
    model_config = ConfigDict(extra="forbid", strict=True)


def _known_genres(genres: list[str]) -> list[str]:
    for g in genres:
        if g not in GENRES:
            close = difflib.get_close_matches(g, GENRES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(GENRES)}"
            raise ValueError(f"unknown genre {g!r} ({hint})")
    return genres


class ModelSection(_Section):
    # "scratch": a new GPT-2 from `config`; otherwise a checkpoint folder (or hf://name) to start from
    init: str = Field("scratch", min_length=1)
    # GPT2Config keyword arguments, passed through as they are (a recipe's `config` replaces
    # this one whole, it is not merged into it).
    config: dict[str, Any] = Field(
        default_factory=lambda: {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 512})


class LoraSection(_Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
                                      min_length=1)
    # small modules trained in full and saved with the adapter (peft modules_to_save);
    # merge_and_unload swaps them in. ln_f's bias, multiplied by the tied embedding,
    # shifts every logit: the cheapest lever toward a genre's own vocabulary.
    modules_to_save: list[str] | None = Field(default_factory=list)


class DataSection(_Section):
    genres: list[str] = Field(default_factory=lambda: list(GENRES), min_length=1)
    # None = each genre equally often, whatever its size
    genre_weights: dict[str, float] | None = None
    block_size: int = Field(512, ge=2)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    chunk_chars: int = Field(4000, ge=1)
    corpora_dir: str = "training/corpora"
    tokenizer: str = "models/gpt2-tokenizer"  # a folder with the tokenizer's files
    cache_dir: str = "runs/cache"  # tokenised splits (git-ignored)

    check_genres = field_validator("genres")(_known_genres)

    @field_validator("genre_weights")
    @classmethod
    def _weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None:
            _known_genres(list(weights))
            if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
                raise ValueError("weights must be >= 0, and one of them > 0")
        return weights


class TrainSection(_Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1.0e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the decay ends at lr * this
    warmup_steps: int = Field(50, ge=0)
    # cosine: warm up, then decay to lr * min_lr_ratio at `steps` (raising `steps` later bends
    # the whole curve). wsd (warm-up, stable, decay): warm up, hold lr, decay over the last
    # `decay_steps`; raising `steps` extends the run, which goes on from the checkpoint kept
    # where its decay began (runs/<name>/checkpoint-stable). To cool a run down early, set
    # steps = its current step + decay_steps.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_steps: int = Field(0, ge=0)  # wsd only
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping
    eval_every: int = Field(200, ge=0)  # 0 = no held-out evals during training
    eval_tokens: int = Field(8192, ge=0)  # held-out tokens per genre for the quick eval (0 = all)
    save_every: int = Field(100, ge=0)  # resumable checkpoint under runs/<name>/ every this many steps
    gradient_checkpointing: bool = False
    # auto = bf16 (or fp16) on a GPU; bf16 on a CPU with oneDNN bf16 kernels, else fp32; or no|fp16|bf16
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    threads: int = Field(1, ge=1)  # torch CPU threads (build_all.sh passes --threads $(nproc))

    @model_validator(mode="after")
    def _decay_fits(self):
        if self.schedule == "wsd" and not 0 < self.decay_steps <= self.steps - self.warmup_steps:
            raise ValueError(f"schedule wsd needs decay_steps between 1 and steps - warmup_steps "
                             f"({self.steps - self.warmup_steps}), got {self.decay_steps}")
        if self.schedule == "cosine" and self.decay_steps:
            raise ValueError("decay_steps is for schedule: wsd (cosine decays over every step)")
        return self


class ExportSection(_Section):
    dir: str | None = None  # default models/<name>
    # dtype the weights are saved in (float16 halves a base model or a LoRA adapter)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    eval_tokens: int = Field(8192, ge=0)  # held-out tokens per genre measured for the model card
    registry: str = "models/registry.yaml"
    # registry fields for this model (name/source/adapter are filled in); checked by the
    # registry's own schema when the model is served
    entry: dict[str, Any] = Field(default_factory=dict)


class CardSection(_Section):
    summary: str | None = ""
    notes: str | None = ""


class Recipe(_Section):
    # also the export folder (models/<name>) and the registry name, so the registry's rule
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = Field(1234, ge=0)
    model: ModelSection = Field(default_factory=ModelSection)
    method: Literal["full", "lora"] = "full"
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    export: ExportSection = Field(default_factory=ExportSection)
    card: CardSection = Field(default_factory=CardSection)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.method == "lora" and self.model.init == "scratch":
            raise ValueError("a LoRA recipe needs model.init = a base checkpoint folder, not 'scratch'")
        return self


# The defaults as a plain dict, in the schema's order ("name" has none: a recipe must give it).
DEFAULTS: dict = Recipe.model_construct(name=None).model_dump()


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _section(loc: list) -> type[BaseModel] | None:
    """The schema class holding the last field of `loc` (for "did you mean" hints)."""
    cls: Any = Recipe
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        cls = field.annotation if field else None
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
    return cls


def _describe(err: dict[str, Any], label: str) -> str:
    loc = list(err["loc"])
    field = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section = _section(loc)
        known = list(section.model_fields) if section else []
        key = str(loc[-1])
        # `lr_rate` is `lr` with a word added: difflib alone would offer only `min_lr_ratio`
        close = [k for k in known if key.startswith(k + "_")] + difflib.get_close_matches(key, known, n=2)
        close = list(dict.fromkeys(close))[:2]
        msg = "unknown field" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close
                                 else f" (known: {', '.join(known)})")
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "float_type" and isinstance(err.get("input"), str):
        msg += " (YAML reads 1e-3 as text: write 1.0e-3)"
    return f"{label}: {field}: {msg}" if field else f"{label}: {msg}"


def parse_recipe(data: Any, label: str = "<recipe>") -> dict:
    """Validate an already-parsed recipe and fill in the defaults; RecipeError names the field."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(label, [f"{label}: expected a mapping of recipe sections ({', '.join(DEFAULTS)})"])
    try:
        Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(label, [_describe(e, label) for e in exc.errors()]) from None
    recipe = _merge(DEFAULTS, data)
    recipe["export"]["dir"] = recipe["export"]["dir"] or f"models/{recipe['name']}"
    return recipe


def load_recipe(path: str | Path) -> dict:
    """Read a recipe file and fill in defaults; refuse unknown keys and bad values at any level
    (RecipeError, a ValueError, naming the file and the dotted field)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"{path}: not valid YAML: {exc}"]) from None
    recipe = parse_recipe(data, str(path))
    recipe["_path"] = str(path)
    return recipe


def recipe_hash(recipe: dict) -> str:
    """Hash of what decides the trained weights (not where they are exported, not the step count:
    a run may be resumed with more steps). Checkpoints under runs/ are keyed by it: the same
    recipe content must keep its hash."""
    keep = {k: recipe[k] for k in ("seed", "model", "method", "lora", "data")}
    # Neither `steps` nor (wsd) `decay_steps`: a run may be extended, or cooled down when it is
    # to ship, from a checkpoint taken before its decay.
    keep["train"] = {k: v for k, v in recipe["train"].items()
                     if k not in ("steps", "decay_steps", "eval_every", "save_every", "threads")}
    if keep["train"].get("schedule") == "cosine":  # as recipes older than the field hashed
        del keep["train"]["schedule"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def repo_path(p: str | Path) -> Path:
    """A recipe path: absolute as given, otherwise relative to the repository root."""
    p = Path(p)
    return p if p.is_absolute() else REPO_ROOT / p
