"""training/recipe.py: a recipe is checked like the registry (every key, every level, every value,
refused naming the file and the dotted field), and still loads into the same plain dict with the
same hash, so checkpoints under runs/ keep resuming."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.recipe import DEFAULTS, RecipeError, load_recipe, recipe_hash

REPO_ROOT = Path(__file__).resolve().parents[1]

# Recipe contents and the hash the recipe code before the schema gave each (commit 1d7afca).
# Checkpoints are keyed by it: a refactor must not move it.
HASHED = {
    "lora": ("""\
name: quill-legal
seed: 1234
model:
  init: models/quill-base
method: lora
lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: [c_attn, c_proj, c_fc], modules_to_save: [ln_f]}
data:
  genres: [legal]
  block_size: 512
train:
  steps: 80
  batch_size: 2
  lr: 4.0e-3
  warmup_steps: 8
  min_lr_ratio: 0.1
  weight_decay: 0.0
  eval_every: 0
  eval_tokens: 2048
  save_every: 25
export:
  entry: {}
card:
  summary: >
    Legal voice.
""", "befc60c6d1d76cbc"),
    "scratch": ("""\
name: quill-base
seed: 1234
model:
  init: scratch
  config: {n_embd: 256, n_layer: 4, n_head: 4, n_positions: 512, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}
method: full
data:
  genres: [legal, copywriting, lyrics, fantasy, abstracts]
  genre_weights: null
  block_size: 512
train:
  steps: 400
  batch_size: 2
  lr: 2.0e-3
  warmup_steps: 30
  weight_decay: 0.1
  eval_every: 100
  eval_tokens: 2048
  save_every: 50
export:
  dtype: float16
""", "32cd07d6e9b5b26d"),
    # mostly defaults, and integers where floats are meant: kept as written, as before
    "minimal": ("""\
name: tiny
data: {genres: [legal, lyrics], genre_weights: {legal: 2, lyrics: 1}}
train: {lr: 1, grad_clip: 0}
""", "7ce41314f51a35c9"),
}


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(HASHED))
def test_recipe_hash_is_unchanged_by_the_schema(tmp_path, case):
    text, expected = HASHED[case]
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe_hash(recipe) == expected
    # steps, eval/save cadence and threads may change between resumes without a new hash
    recipe["train"].update(steps=5, eval_every=1, save_every=1, threads=2)
    assert recipe_hash(recipe) == expected


def test_recipe_loads_as_the_same_plain_dict(tmp_path):
    path = _write(tmp_path, HASHED["minimal"][0])
    recipe = load_recipe(path)
    assert type(recipe) is dict and all(type(recipe[k]) is dict for k in ("model", "train", "data"))
    assert list(recipe) == [*DEFAULTS, "_path"] and recipe["_path"] == str(path)
    assert recipe["train"]["lr"] == 1 and isinstance(recipe["train"]["lr"], int)  # as written
    assert recipe["train"]["steps"] == DEFAULTS["train"]["steps"] == 1000
    assert recipe["data"]["tokenizer"] == "models/gpt2-tokenizer"
    assert recipe["export"]["dir"] == "models/tiny"
    # a recipe's model.config replaces the default one whole (GPT2Config keyword arguments)
    recipe = load_recipe(_write(tmp_path, "name: t\nmodel: {config: {n_embd: 64, n_layer: 1}}\n"))
    assert recipe["model"] == {"init": "scratch", "config": {"n_embd": 64, "n_layer": 1}}


def test_shipped_recipes_all_validate():
    paths = sorted((REPO_ROOT / "training" / "recipes").glob("*.yaml"))
    assert paths
    names = [load_recipe(path)["name"] for path in paths]
    assert len(set(names)) == len(names)


def test_unknown_nested_key_is_refused_naming_file_and_field(tmp_path):
    path = _write(tmp_path, "name: x\ntrain: {steps: 10, lr_rate: 3.0e-4}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: train.lr_rate: unknown field (did you mean 'lr' or 'min_lr_ratio'?)"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("text, field, says", [
    ("name: x\ntrain: {lr: -0.001}\n", "train.lr", "greater than 0"),
    ("name: x\ntrain: {steps: 0}\n", "train.steps", "greater than or equal to 1"),
    ("name: x\ntrain: {steps: '100'}\n", "train.steps", "valid integer"),
    ("name: x\ntrain: {lr: 1e-3}\n", "train.lr", "write 1.0e-3"),  # YAML 1.1 reads 1e-3 as text
    ("name: x\ntrain: {threads: 0}\n", "train.threads", "greater than or equal to 1"),
    ("name: x\ntrain: {mixed_precision: fp8}\n", "train.mixed_precision", "'auto', 'no', 'fp16' or 'bf16'"),
    ("name: x\ndata: {genres: [legl]}\n", "data.genres", "unknown genre 'legl' (did you mean 'legal'?)"),
    ("name: x\ndata: {genre_weights: {poetry: 1}}\n", "data.genre_weights", "unknown genre 'poetry'"),
    ("name: x\nmethod: qlora\n", "method", "'full' or 'lora'"),
    ("name: x\nmodel: {config: [n_embd, 64]}\n", "model.config", "valid dictionary"),
    ("name: x\nmodel: {config: {n_embd: 64}, inti: scratch}\n", "model.inti", "did you mean 'init'"),
    ("name: x\nlora: {r: 0}\n", "lora.r", "greater than or equal to 1"),
    ("name: x\nexport: {dtype: int8}\n", "export.dtype", "float32"),
    ("name: x\ncard: {sumary: hi}\n", "card.sumary", "did you mean 'summary'"),
    ("seed: 3\n", "name", "required field is missing"),
    ("name: x\ntrian: {steps: 3}\n", "trian", "did you mean 'train'"),
])
def test_bad_values_are_refused_naming_file_and_field(tmp_path, text, field, says):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems and all(p.startswith(f"{path}: ") for p in err.value.problems)
    assert any(p.startswith(f"{path}: {field}: ") and says in p for p in err.value.problems), err.value.problems


def test_lora_from_scratch_and_every_fault_at_once(tmp_path):
    path = _write(tmp_path, "name: x\nmethod: lora\n")
    with pytest.raises(RecipeError, match="LoRA recipe needs model.init"):
        load_recipe(path)
    path = _write(tmp_path, "name: x\ntrain: {lr: -1, steps: 0}\ndata: {genres: [poetry]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert len(err.value.problems) == 3  # one line per problem, not only the first


def test_not_a_mapping_and_not_yaml_are_refused_naming_the_file(tmp_path):
    for text in ("- name: x\n", "name: [unclosed\n"):
        path = _write(tmp_path, text)
        with pytest.raises(RecipeError, match=str(path)):
            load_recipe(path)


def test_quill_train_reports_a_bad_recipe_one_line_per_problem(tmp_path, capsys):
    from training.train import main

    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain: {lr_rate: 1}\nlora: {rank: 8}\n")
    assert main(["--recipe", str(path), "--runs", str(tmp_path / "runs")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"quill train: {path}: ") for line in lines)
    assert any("train.lr_rate: unknown field (did you mean 'lr'" in line for line in lines)
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made


def test_quill_train_names_a_missing_base_tokenizer_or_corpus_before_loading_anything(tmp_path, capsys):
    """A typo in a path was a traceback from deep in transformers (the hub's "repo id" message
    for model.init) or the data loader; now one line per folder, naming the field."""
    from training.train import main

    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmethod: lora\nmodel: {init: models/quill-bse}\n"
                    f"data: {{genres: [lyrics, legal], corpora_dir: {tmp_path / 'corpora'}, tokenizer: {tmp_path}}}\n")
    (tmp_path / "corpora" / "legal").mkdir(parents=True)
    (tmp_path / "corpora" / "legal" / "a.txt").write_text("Whereas the parties agree.")
    assert main(["--recipe", str(path), "--runs", str(tmp_path / "runs")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"quill train: {path}: ") for line in lines), lines
    assert "model.init: models/quill-bse is not a checkpoint folder" in lines[0]
    assert "data.tokenizer:" in lines[1] and "holds no tokenizer" in lines[1]
    assert "data.corpora_dir:" in lines[2] and "no lyrics/ folder" in lines[2]  # legal/ is there
    assert not (tmp_path / "runs").exists()


def test_quill_data_builds_the_splits_a_recipe_trains_on(tmp_path, capsys):
    """`quill data --recipe R` tokenizes with R's tokenizer into R's cache: what `quill train`
    reads (it used GPT-2's tokenizer and the repo's cache whatever a recipe said)."""
    from training.data import SplitSettings, genre_tokens, load_tokenizer, main
    from training.recipe import load_recipe, repo_path

    (tmp_path / "corpora" / "legal").mkdir(parents=True)
    (tmp_path / "corpora" / "legal" / "a.txt").write_text("Whereas the parties agree to the terms below. " * 400)
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ndata: {{genres: [legal], corpora_dir: {tmp_path / 'corpora'}, "
                    f"tokenizer: models/quill-tokenizer, cache_dir: {tmp_path / 'cache'}}}\n")
    assert main(["--recipe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer models/quill-tokenizer (8192 tokens)" in out
    cached = sorted((tmp_path / "cache").iterdir())
    assert cached, "nothing cached"
    d = load_recipe(path)["data"]
    train = genre_tokens("legal", "train", repo_path(d["corpora_dir"]), SplitSettings(d["val_fraction"], d["chunk_chars"]),
                         load_tokenizer(repo_path(d["tokenizer"])), repo_path(d["cache_dir"]))
    assert f"legal        train {len(train):>9,d} tokens" in out
    assert sorted((tmp_path / "cache").iterdir()) == cached  # the run's read found the same files


def test_quill_train_refuses_a_base_with_pickled_weights_in_one_line(tmp_path, capsys):
    from transformers import GPT2Config

    from training.train import main

    base = tmp_path / "base"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(base)
    (base / "pytorch_model.bin").write_bytes(b"not unpickled")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\nmethod: lora\nmodel: {{init: {base}}}\n")
    assert main(["--recipe", str(path), "--runs", str(tmp_path / "runs"), "--no-export"]) == 2
    err = capsys.readouterr().err
    assert f"model.init: {base} has no .safetensors weights (pickled weights are refused" in err, err
    assert "Traceback" not in err
