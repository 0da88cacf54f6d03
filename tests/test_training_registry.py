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
