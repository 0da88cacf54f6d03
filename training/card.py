"""The model card (README.md) written into every exported model folder: data, licence, recipe,
training run and held-out metrics, in plain Markdown."""
from __future__ import annotations

from pathlib import Path

import yaml

from training.data import REPO_ROOT

LICENCE_TEXT = """\
- Training text: public domain (pre-1929 publications and US federal government works; the
  arXiv titles/abstracts are CC0 1.0). Every file's origin, commit and licence basis is listed
  in `training/corpora/SOURCES.md`.
- Tokenizer: {tokenizer}
- Weights: trained by the Quill project from the text above; released under the project's
  licence (Apache-2.0).
"""

GPT2_TOKENIZER = ("GPT-2's byte-level BPE (vocab.json/merges.txt from OpenAI's GPT-2 release, "
                  "MIT-style licence; see `models/gpt2-tokenizer/`).")
OWN_TOKENIZER = ("Quill's own byte-level BPE in GPT-2's format (`{path}`, {vocab:,} tokens), fitted "
                 "by `training/tokenizer.py` on the train split of the corpora above; released "
                 "under the project's licence (Apache-2.0).")


def tokenizer_text(recipe: dict, summary: dict) -> str:
    path = recipe["data"]["tokenizer"]
    if Path(path).name == "gpt2-tokenizer":
        return GPT2_TOKENIZER
    return OWN_TOKENIZER.format(path=path, vocab=summary.get("vocab_size", 0))


GENRE_DATA = {
    "legal": "legal and governmental prose: Holmes' *The Common Law* (1881), the US Constitution "
             "and the Federalist Papers, State of the Union addresses 1945-2006, and Federal "
             "Register / CFR / public-law text",
    "copywriting": "vintage advertising copy (1866-1920, plus older newspaper advertisements "
                   "collected in 1886): publishers' catalogues and book blurbs, manufacturers' "
                   "sales catalogues, and Herbert Kaufman's 1912 essays on advertising",
    "lyrics": "songs and verse: Burns, W. S. Gilbert, cowboy songs and folk ballads, hymns, "
              "nursery rhymes",
    "fantasy": "pre-1929 fantasy fiction: Baum's Oz books, Carroll's Alice books, fairy tales "
               "(Grimm, Andersen, Lang) and George MacDonald",
    "abstracts": "research-paper titles and abstracts from arXiv's own metadata samples (CC0)",
}


def _recipe_path(recipe: dict) -> str:
    """The recipe's path as a user would type it: relative to the repository root if inside it."""
    path = Path(recipe["_path"]).resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def model_card(recipe: dict, summary: dict, entry: dict) -> str:
    name, genres = recipe["name"], recipe["data"]["genres"]
    is_lora = recipe["method"] == "lora"
    lines = [f"# {name}", ""]
    if recipe["card"].get("summary"):
        lines += [recipe["card"]["summary"].strip(), ""]
    if is_lora:
        extra = recipe["lora"].get("modules_to_save") or []
        lines += [f"A LoRA adapter (rank {recipe['lora']['r']}, on "
                  f"{', '.join(recipe['lora']['target_modules'])}"
                  + (f"; {', '.join(extra)} trained in full" if extra else "")
                  + f") for `{entry['source']}`; the server merges it into the base at load "
                  "(peft `merge_and_unload`), so it is served as a plain GPT-2.", ""]
    else:
        cfg = recipe["model"]["config"] if recipe["model"]["init"] == "scratch" else {}
        lines += ["A small GPT-2-architecture model (`GPT2LMHeadModel`; tied embeddings; "
                  f"{cfg}) trained from scratch, with a vocabulary of {summary.get('vocab_size', 50257):,} "
                  f"tokens, saved in {recipe['export']['dtype']} safetensors. It carries its "
                  "tokenizer in this folder; real `gpt2` / `gpt2-medium` checkpoints (with their own "
                  "tokenizer) can be swapped in and fine-tuned with the same recipes.", ""]
    if recipe["card"].get("notes"):
        lines += [recipe["card"]["notes"].strip(), ""]

    lines += ["## Data", ""]
    for g in genres:
        lines.append(f"- **{g}** ({summary['train_tokens'][g]:,} training tokens, "
                     f"{summary['val_tokens'][g]:,} held out): {GENRE_DATA[g]}.")
    lines += ["", "Cleaning and the held-out split are in `training/data.py` (about 5% of each "
              "genre, chosen by a hash of ~4 KB pieces, never trained on).", ""]
    lines += ["## Licence", "", LICENCE_TEXT.format(tokenizer=tokenizer_text(recipe, summary))]

    lines += ["## Training", "",
              f"- command: `quill train --recipe {_recipe_path(recipe)}` "
              "(or `python -m training.train --recipe ...`)",
              f"- {summary['steps']:,} steps, {summary['tokens']:,} tokens, "
              f"{summary['train_seconds']/60:.1f} min on {summary['device']}"
              + (f" ({summary['cpu']}, {summary['threads']} torch thread(s))" if "cpu" in summary else "")
              + " "
              f"({summary['tokens_per_second']:.0f} tokens/s, "
              f"{'fp32' if summary['precision'] == 'no' else summary['precision']})",
              f"- parameters: {summary['params']/1e6:.2f}M, trained: {summary['trainable_params']/1e6:.3f}M",
              f"- final training loss (moving average): {summary['final_loss_ema']}", ""]
    hidden = {"card"} | ({"lora"} if not is_lora else set())  # the card already says these
    shown = {k: v for k, v in recipe.items() if not k.startswith("_") and k not in hidden}
    lines += ["Recipe (defaults filled in):", "", "```yaml",
              yaml.safe_dump(shown, sort_keys=False, width=100).rstrip(), "```", ""]

    # Bits per byte (train.py's held_out_bpb / base_held_out_bpb) where the summary has it:
    # summaries written before it was measured have perplexity only.
    bpb = summary.get("held_out_bpb") or {}
    lines += ["## Held-out perplexity" + (" and bits per byte" if bpb else ""), "",
              (f"First {recipe['export']['eval_tokens']:,} held-out tokens of each genre, "
               if recipe["export"]["eval_tokens"] else "Each genre's whole held-out split, ")
              + 
              f"{recipe['data']['block_size']}-token blocks, as exported"
              + (" (adapter merged into the base)" if is_lora else "") + ". Lower is better"
              + ("; bits per byte is the loss in bits per UTF-8 byte of the predicted text, "
                 "comparable across tokenizers" if bpb else "")
              + "; `docs/models.md` compares every model.", "",
              ]
    base_ppl = summary.get("base_held_out_ppl") or {}
    columns = [(name if base_ppl else "perplexity", summary["held_out_ppl"])]
    if bpb:
        columns.append((f"{name}, bits/byte" if base_ppl else "bits per byte", bpb))
    if base_ppl:
        columns.append((f"{entry['source']} alone", base_ppl))
        if summary.get("base_held_out_bpb"):
            columns.append((f"{entry['source']} alone, bits/byte", summary["base_held_out_bpb"]))
    lines += ["| genre | " + " | ".join(h for h, _ in columns) + " |",
              "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for g in summary["held_out_ppl"]:
        lines.append(f"| {g} | " + " | ".join(str(col.get(g, "")) for _, col in columns) + " |")
    lines += ["", "## Limitations", "",
              "A small model trained for about an hour on a 2-core CPU: it imitates the voice and "
              "vocabulary of its genre, not facts. Text reflects the attitudes of its (mostly "
              "19th- and early 20th-century) sources. Not for legal, medical or factual advice.", ""]
    return "\n".join(lines)
