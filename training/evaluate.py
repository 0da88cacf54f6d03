"""Held-out perplexity of every registry model on every genre, plus sample text -> docs/models.md.

    quill evaluate                               # all models in models/registry.yaml
    python -m training.evaluate --models quill-base quill-legal --max-tokens 8192

Models are loaded the way the server loads them: the entry's `source` (safetensors only) and,
for a genre model, its LoRA `adapter` merged into the base with peft's merge_and_unload.
Relative paths resolve against the registry's folder, as in serve_app/config.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from training.data import GENRES, SplitSettings, genre_tokens, load_tokenizer
from training.metrics import perplexity
from training.recipe import repo_path

# One prompt per genre for the sample continuations (the writer's text so far).
PROMPTS = {
    "legal": "Section 4. Whenever the Secretary determines that",
    "copywriting": "Every home should have one. This handsome new",
    "lyrics": "O my love is like the morning,\n",
    "fantasy": "The little princess opened the golden door and saw",
    "abstracts": "We propose a new method for",
}


def load_entry_model(entry: dict, registry_dir: Path):
    """A registry entry -> a plain causal LM in eval mode (adapter merged), fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    def local(p: str) -> str:
        path = Path(p)
        return str(path if path.is_absolute() else (registry_dir / path).resolve())

    model = AutoModelForCausalLM.from_pretrained(local(entry["source"]), dtype=torch.float32,
                                                 use_safetensors=True)
    if entry.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, local(entry["adapter"])).merge_and_unload()
    return model.eval()


def genre_of(name: str) -> str | None:
    """quill-legal -> legal; a name that doesn't end in a genre (quill-base) -> None."""
    g = name.rsplit("-", 1)[-1]
    return g if g in GENRES else None


@torch.no_grad()
def sample(model, tokenizer, prompt: str, seed: int, max_new_tokens: int = 48) -> str:
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    # min_new_tokens: a small model often samples <|endoftext|> at once; a sample of nothing
    # shows nothing about its voice.
    out = model.generate(ids, do_sample=True, temperature=0.8, top_k=40, top_p=0.95,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens // 2,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate(registry: Path, names: list[str] | None, genres: list[str], max_tokens: int,
             block_size: int, seed: int, matrix: str = "own", corpora: Path | None = None,
             cache_dir: Path | None = None) -> dict:
    data = yaml.safe_load(registry.read_text())
    entries = [m for m in data["models"] if not names or m["name"] in names]
    tokenizer = load_tokenizer()
    streams = {g: genre_tokens(g, "val", corpora or repo_path("training/corpora"), SplitSettings(),
                               tokenizer, cache_dir or repo_path("runs/cache")) for g in genres}
    results = {"ppl": {}, "samples": {}, "sizes": {}, "seconds": {}}
    for entry in entries:
        name, t0 = entry["name"], time.time()
        model = load_entry_model(entry, registry.parent)
        own = genre_of(name)
        # "own": a genre model is scored on its own genre only (the base on all of them);
        # "full": every model on every genre (6 x 5 evaluations: minutes on a CPU).
        scored = [g for g in streams if matrix == "full" or own is None or g == own]
        results["ppl"][name] = {g: perplexity(model, streams[g], block_size, max_tokens) for g in scored}
        prompt_genres = [own] if own else list(PROMPTS)
        # two samples for a genre model, one per genre for the base
        seeds = [seed] if own is None else [seed, seed + 1]
        results["samples"][name] = [(PROMPTS[g], sample(model, tokenizer, PROMPTS[g], s))
                                    for g in prompt_genres for s in seeds]
        results["seconds"][name] = time.time() - t0
        print(f"{name}: " + ", ".join(f"{g} {v:.1f}" for g, v in results["ppl"][name].items())
              + f"  ({results['seconds'][name]:.0f} s)", flush=True)
        summary = repo_path("runs") / name / "summary.json"  # present where the model was trained
        if summary.exists():
            results.setdefault("training", {})[name] = json.loads(summary.read_text())
        folder = [entry.get("adapter") or entry["source"]]
        results["sizes"][name] = sum(p.stat().st_size for f in folder
                                     for p in (registry.parent / f).glob("*.safetensors"))
    return results


def render(results: dict, genres: list[str], command: str, max_tokens: int, block_size: int) -> str:
    import peft
    import transformers

    ppl = results["ppl"]
    base_name = next((n for n in ppl if genre_of(n) is None), None)
    base = ppl.get(base_name)
    lines = [
        "# Quill's shipped models",
        "",
        "Quill ships a small GPT-2-architecture base model trained from scratch and five genre "
        "models, each a LoRA adapter merged into that base when it is served. All use GPT-2's own "
        "BPE tokenizer, so real `gpt2` / `gpt2-medium` checkpoints can be swapped in through "
        "`models/registry.yaml` (`source: hf://gpt2`) and fine-tuned with the same recipes. "
        "Each model folder holds a model card (README.md) with its data, licence, recipe and metrics.",
        "",
        "| model | what | shipped weights |",
        "| --- | --- | --- |",
    ]
    base_name = next((n for n in results["sizes"] if genre_of(n) is None), "the base")
    for name, size in results["sizes"].items():
        g = genre_of(name)
        what = f"LoRA adapter on {base_name}, {g} corpus" if g else "base, all five genres"
        lines.append(f"| `{name}` | {what} | {size / 1e6:.2f} MB |")
    lines += ["", f"All shipped weights together: {sum(results['sizes'].values()) / 1e6:.1f} MB "
              "(`find models -name '*.safetensors' | xargs du -cb`).", ""]

    training = results.get("training") or {}
    if training:
        lines += ["## Training runs", "",
                  "One CPU thread each on the shared 2-core build box (AMD EPYC Zen 1), so "
                  "tokens/s depend on what else ran beside it. From `runs/<name>/summary.json`:", "",
                  "| model | method | steps | tokens | minutes | tokens/s | trainable params |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, t in training.items():
            method = "LoRA" if t["trainable_params"] < t["params"] / 2 else "from scratch"
            lines.append(f"| `{name}` | {method} | {t['steps']:,} | {t['tokens']:,} | "
                         f"{t['train_seconds'] / 60:.1f} | {t['tokens_per_second']:.0f} | "
                         f"{t['trainable_params'] / 1e6:.2f}M of {t['params'] / 1e6:.1f}M |")
        lines += ["", "Why LoRA for the genre models: five full copies of the base would not fit "
                  "the 60 MB budget for shipped weights; an adapter (rank-16 LoRA plus the final layer norm) "
                  "is about 1 MB, trains "
                  "faster per token (no gradients for the 50,257-row embedding), and is merged into "
                  "the base at load, so it costs nothing per generated token.", ""]

    lines += ["## Held-out perplexity", "",
              "Perplexity on each genre's held-out split (about 5% of the corpus, chosen by hash of "
              "~4 KB pieces in `training/data.py`, never trained on): the first "
              f"{max_tokens:,} tokens of each split, scored in {block_size}-token blocks. Lower is "
              "better; **bold** is a genre model on its own genre.", "",
              "| model | " + " | ".join(genres) + " |",
              "| --- | " + " | ".join("---:" for _ in genres) + " |"]
    for name, row in ppl.items():
        cells = ["-" if g not in row else f"**{row[g]:.1f}**" if genre_of(name) == g
                 else f"{row[g]:.1f}" for g in genres]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if base:
        lines += ["", f"| genre model | own genre | {base_name} on that genre | change |",
                  "| --- | ---: | ---: | ---: |"]
        for name, row in ppl.items():
            g = genre_of(name)
            if g and g in row and g in base:
                change = 100 * (row[g] / base[g] - 1)
                lines.append(f"| `{name}` | {row[g]:.1f} | {base[g]:.1f} | {change:+.0f}% |")
    lines += ["", "Made by:", "", "```", command, "```", "",
              f"on {platform.machine()} / {platform.system()}, {torch.get_num_threads()} torch thread(s), "
              f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
              f"{peft.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", ""]

    lines += ["## What to expect", "",
              "These are tiny models trained for well under an hour on one CPU core: the base saw "
              "about 410k tokens, a tenth of the corpora, and its perplexities are in the hundreds "
              "(roughly the level of word-frequency statistics plus short phrases). They produce "
              "the vocabulary and rhythm of a genre, not coherent text; the point of shipping them "
              "is a complete, servable pipeline with honest numbers. For useful suggestions, point "
              "a registry entry at `hf://gpt2` or `hf://gpt2-medium` and fine-tune it with the "
              "same recipes (`model.init: hf://gpt2`, `method: lora`) on a GPU, where "
              "accelerate turns on mixed precision by itself; `train.gradient_checkpointing: true` "
              "trades compute for memory on the larger models.", ""]
    lines += ["## Sample continuations", "",
              "Sampled with temperature 0.8, top-k 40, top-p 0.95, 24-48 new tokens, fixed seeds; "
              "the prompt is in bold. These are small models: expect the voice of the genre, "
              "not sense.", ""]
    for name, pairs in results["samples"].items():
        lines += [f"### {name}", ""]
        for prompt, text in pairs:
            quoted = ("**" + prompt.strip() + "**" + (" " if not prompt.endswith("\n") else "\n")
                      + text.strip()).replace("\n", "\n> ")
            lines += ["> " + quoted, ""]
    lines += ["## Reproduce", "",
              "```sh",
              "sh training/build_all.sh          # quill-base (30-60 min) then the five adapters (5-10 min each), one CPU thread",
              command,
              "```", "",
              "Each recipe is one YAML file in `training/recipes/`; `quill train --recipe <file>` "
              "trains, resumes if interrupted, and exports to `models/<name>/` with its registry entry.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quill evaluate",
                                 description="Held-out perplexity per genre and samples -> docs/models.md")
    ap.add_argument("--registry", default="models/registry.yaml")
    ap.add_argument("--models", nargs="*", help="names from the registry (default: all)")
    ap.add_argument("--genres", nargs="*", default=list(GENRES))
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per genre")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matrix", choices=["own", "full"], default="own",
                    help="own: genre models on their own genre, the base on all; full: every pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpora", default="training/corpora", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="runs/cache", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="docs/models.md", help="Markdown file to write ('-' = stdout)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = repo_path(args.registry)
    results = evaluate(registry, args.models, args.genres, args.max_tokens, args.block_size, args.seed,
                       args.matrix, repo_path(args.corpora), repo_path(args.cache_dir))
    command = "quill evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = render(results, args.genres, command.strip(), args.max_tokens, args.block_size)
    if args.out == "-":
        print(text)
    else:
        out = repo_path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    # A genre model that doesn't beat the base on its own genre is a failed training run.
    base = next((row for n, row in results["ppl"].items() if genre_of(n) is None), None)
    worse = [n for n, row in results["ppl"].items()
             if base and genre_of(n) in row and row[genre_of(n)] >= base[genre_of(n)]]
    if worse:
        print(f"WARNING: not better than the base on their own genre: {worse}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
