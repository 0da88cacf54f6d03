"""Quill training: corpora -> cleaned splits -> base model and genre LoRA adapters -> servable exports.

Modules:
- data.py      clean, split, tokenise and pack the public-domain corpora in training/corpora/
- recipe.py    the YAML recipe format (one file per model in training/recipes/)
- train.py     train a base model from scratch or a LoRA adapter on top of it (`quill train`)
- export.py    save_pretrained (safetensors) + tokenizer + model card + registry entry
- evaluate.py  held-out perplexity per genre and sample text into docs/models.md (`quill evaluate`)
"""
