"""The registry that training/ writes is the one serve_app/config.py serves.

- a registry naming a model whose files are missing is refused with a message that names the
  registry file, the model and the missing path;
- the shipped models/registry.yaml validates, and every model it names has its safetensors and
  tokenizer on disk, within the 60 MB budget for shipped weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from serve_app.config import RegistryError, load_registry
from training.export import registry_entry, update_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["quill-base", "quill-legal", "quill-copywriting", "quill-lyrics", "quill-fantasy",
           "quill-abstracts"]


def test_registry_naming_missing_model_files_is_refused_clearly(tmp_path):
    (tmp_path / "base").mkdir()
    registry = tmp_path / "registry.yaml"
    update_registry(registry, registry_entry("quill-base", "base", None, {}))
    update_registry(registry, registry_entry("quill-legal", "base", "quill-legal-adapter", {}))
    update_registry(registry, registry_entry("quill-gone", "not-there", None, {}))
    with pytest.raises(RegistryError) as err:
        load_registry(registry)
    message = str(err.value)
    assert str(registry) in message
    assert "quill-gone" in message and "source" in message and "not-there" in message
    assert "quill-legal" in message and "adapter" in message and "quill-legal-adapter" in message
    assert "'quill-base'" not in message  # the model whose files exist is not blamed


def test_registry_written_by_training_loads_in_the_server_schema(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "legal").mkdir()
    registry = tmp_path / "registry.yaml"
    update_registry(registry, registry_entry("quill-legal", "base", "legal", {}))
    update_registry(registry, registry_entry("quill-base", "base", None, {"dtype": "float16"}))
    loaded = load_registry(registry)
    assert loaded.names == ["quill-base", "quill-legal"]  # base first, whatever the export order
    assert loaded.get("quill-legal").adapter == str((tmp_path / "legal").resolve())
    assert loaded.get("quill-base").dtype == "float16"


shipped_registry = REPO_ROOT / "models" / "registry.yaml"


@pytest.mark.skipif(not shipped_registry.exists(), reason="models/registry.yaml not built yet")
def test_shipped_registry_serves_the_six_models_within_budget():
    registry = load_registry(shipped_registry)
    assert registry.names == SHIPPED
    for entry in registry.models:
        assert (Path(entry.source) / "model.safetensors").is_file(), entry.name
        assert (Path(entry.source) / "tokenizer.json").is_file(), entry.name
        if entry.name != "quill-base":
            assert entry.source == registry.get("quill-base").source
            assert (Path(entry.adapter) / "adapter_model.safetensors").is_file(), entry.name
    total = sum(p.stat().st_size for p in (REPO_ROOT / "models").rglob("*.safetensors"))
    assert total < 60e6, f"shipped weights are {total / 1e6:.1f} MB"
    card = (REPO_ROOT / "models" / "quill-copywriting" / "README.md").read_text()
    assert "1866" in card and "1920" in card and "advertising" in card


@pytest.mark.skipif(not (REPO_ROOT / "models" / "quill-copywriting").exists(),
                    reason="genre models not built yet")
def test_shipped_genre_model_served_is_the_one_evaluated():
    """training/evaluate.py loads a registry entry through the engine's own loader: the same
    merged model and the same tokenizer the server serves."""
    import torch

    from serve_app.engine.loader import load_model, load_tokenizer, resolve_dtype
    from training.evaluate import load_served

    entry = load_registry(shipped_registry).get("quill-copywriting")
    cpu = torch.device("cpu")  # in the dtype the server picks here (dtype: auto)
    served = load_model(entry.source, entry.adapter, cpu, resolve_dtype(entry.dtype, cpu))
    config, evaluated, tokenizer = load_served(entry)
    assert (config.source, config.adapter) == (entry.source, entry.adapter)
    base = load_model(entry.source, None, torch.device("cpu"), torch.float32)
    text = "The court held that the goods were lost."
    x = torch.tensor([tokenizer.encode(text)])  # the shipped models' own tokenizer, not GPT-2's
    with torch.no_grad():
        got, want = evaluated(input_ids=x.to(evaluated.device)).logits.cpu(), served(input_ids=x).logits
        plain = base(input_ids=x).logits
    torch.testing.assert_close(got, want)
    assert (got.float() - plain).abs().max() > 1e-2  # the adapter is really merged in
    assert tokenizer.encode(text) == load_tokenizer(entry.source).encode(text)


def test_shipped_registry_survives_being_copied_elsewhere(tmp_path):
    """Relative paths resolve against the registry's folder, so the models/ folder can move."""
    if not shipped_registry.exists():
        pytest.skip("models/registry.yaml not built yet")
    data = yaml.safe_load(shipped_registry.read_text())
    moved = tmp_path / "models"
    moved.mkdir()
    for entry in data["models"]:
        for key in ("source", "adapter"):
            if entry.get(key) and not (moved / entry[key]).exists():
                shutil.copytree(shipped_registry.parent / entry[key], moved / entry[key])
    shutil.copy(shipped_registry, moved / "registry.yaml")
    assert load_registry(moved / "registry.yaml").names == SHIPPED


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exported_adapter_loads_through_the_engine_loader(tmp_path, dtype):
    """What training exports is what the engine serves: same logits after the engine's merge,
    whether the adapter ships in float32 or in float16 (half the bytes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from serve_app.engine.loader import load_model, load_tokenizer
    from training.data import load_tokenizer as training_tokenizer
    from training.export import export_adapter, export_full

    torch.manual_seed(0)
    tok = training_tokenizer()
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    export_full(base, tok, tmp_path / "base", dtype="float32")
    lora = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=True,
                                           target_modules=["c_attn", "c_proj", "c_fc"],
                                           modules_to_save=["ln_f"]))  # as the genre recipes do
    with torch.no_grad():  # a freshly initialised adapter is a no-op (B = 0): make it count
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            if "modules_to_save" in name and name.endswith("bias"):
                p.normal_(0, 0.5)
    export_adapter(lora, tok, tmp_path / "legal", "../base", max_len=64, dtype=dtype)
    shipped = load_file(str(tmp_path / "legal" / "adapter_model.safetensors"))
    assert {t.dtype for t in shipped.values()} == {getattr(torch, dtype)}

    served = load_model(str(tmp_path / "base"), str(tmp_path / "legal"), torch.device("cpu"), torch.float32)
    x = torch.tensor([[15496, 995, 13]])
    with torch.no_grad():
        expected, plain = lora(input_ids=x).logits, GPT2LMHeadModel.from_pretrained(
            tmp_path / "base", use_safetensors=True)(input_ids=x).logits
        got = served(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert load_tokenizer(str(tmp_path / "legal")).encode("Hello world") == [15496, 995]


HAND_WRITTEN = """\
# Our registry: DO NOT reorder (the page lists models in this order).
models:
  - name: quill-legal
    source: base          # the shipped base
    adapter: legal
  - &small  # the shared shape
    name: house-style
    source: base
    adapter: house
    cpus_per_replica: 0.25
  - <<: *small
    name: house-style-exact
    dtype: float32        # hand edit: scoring needs float32
"""


def test_a_re_export_keeps_the_rest_of_a_hand_written_registry(tmp_path):
    for folder in ("base", "legal", "house", "legal-2"):
        (tmp_path / folder).mkdir()
    registry = tmp_path / "registry.yaml"
    registry.write_text(HAND_WRITTEN)
    update_registry(registry, registry_entry("quill-legal", "base", "legal-2", {"defaults": {"max_tokens": 16}}))
    update_registry(registry, registry_entry("quill-base", "base", None, {}))
    text = registry.read_text()
    for kept in ("# Our registry: DO NOT reorder", "&small", "<<: *small", "# hand edit: scoring needs float32"):
        assert kept in text, text
    loaded = load_registry(registry)
    assert loaded.names == ["quill-base", "quill-legal", "house-style", "house-style-exact"]  # base in its place
    assert loaded.get("quill-legal").adapter == str((tmp_path / "legal-2").resolve())
    # The re-exported entry: the recipe's one default over the shipped ones, not instead of them.
    defaults = loaded.get("quill-legal").defaults
    assert defaults.max_tokens == 16 and defaults.frequency_penalty == 0.5
    assert loaded.get("house-style-exact").dtype == "float32"
    assert loaded.get("house-style-exact").adapter == str((tmp_path / "house").resolve())


def test_a_registry_with_a_key_given_twice_is_not_updated_and_the_run_refused_before_training(tmp_path, capsys):
    from training.recipe import RecipeError
    from training.train import main

    (tmp_path / "base").mkdir()
    registry = tmp_path / "registry.yaml"
    registry.write_text("models:\n  - name: mine\n    source: base\n    source: other\n")
    with pytest.raises(RecipeError, match="cannot be updated"):
        update_registry(registry, registry_entry("quill-base", "base", None, {}))
    assert "source: other" in registry.read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nexport: {{registry: {registry}}}\n")
    assert main(["--recipe", str(recipe), "--runs", str(tmp_path / "runs"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"export.registry: {registry} cannot be updated" in err and "duplicate key" in err, err
    assert not (tmp_path / "runs").exists()  # refused before anything ran
