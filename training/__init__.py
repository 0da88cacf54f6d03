"""Quill training: corpora -> cleaned splits -> base model and genre LoRA adapters -> servable exports.

Modules:
- data.py      clean, split, tokenise and pack the public-domain corpora in training/corpora/
- tokenizer.py fit Quill's byte-level BPE on the corpora's train split (models/quill-tokenizer/)
- recipe.py    the YAML recipe format, a validated schema (one file per model in training/recipes/)
- train.py     train a base model from scratch or a LoRA adapter on top of it (`quill train`)
- export.py    save_pretrained (safetensors) + tokenizer + model card + registry entry
- metrics.py   held-out perplexity and bits per byte (one scoring loop)
- evaluate.py  held-out perplexity and bits per byte per genre, and samples from the serving
               engine, into docs/models.md (`quill evaluate`)
"""
