"""Held-out perplexity and bits per byte of every registry model on every genre, plus sample
text -> docs/models.md.

    quill evaluate                               # all models in models/registry.yaml
    python -m training.evaluate --models quill-base quill-legal --max-tokens 8192

Models are loaded by the serving code itself: the registry is read by serve_app/config.py's
`load_registry` (paths resolve against its folder), a remote checkpoint is synced as a replica
syncs it (serve_app/weights.py), and the engine's loader (serve_app/engine/loader.py) loads the
entry's `source` (safetensors only), merges its LoRA `adapter`, and loads the tokenizer the
engine serves it with. Each model's held-out text is tokenised with that tokenizer, so a model
that ships its own tokenizer is scored on its own tokens; bits per byte compares across them.
Samples come from the serving engine at the entry's registry defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from training.data import GENRES, REPO_ROOT, SplitSettings, genre_tokens
from training.export import read_training_run
from training.metrics import score_stream
from training.recipe import repo_path

# One prompt per genre for the sample continuations (the writer's text so far).
PROMPTS = {
    "legal": "Section 4. Whenever the Secretary determines that",
    "copywriting": "Every home should have one. This handsome new",
    "lyrics": "O my love is like the morning,\n",
    "fantasy": "The little princess opened the golden door and saw",
    "abstracts": "We propose a new method for",
}


def load_served(entry):
    """A validated registry entry (serve_app.config.ModelEntry) -> (engine config, model,
    tokenizer), loaded exactly as a model replica loads them before serving."""
    from serve_app.engine.loader import load_model, load_tokenizer, resolve_device, resolve_dtype
    from serve_app.weights import local_entry

    config = local_entry(entry).engine_config()
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.source)
    model = load_model(config.source, config.adapter, device, resolve_dtype(config.dtype, device))
    return config, model, tokenizer


def genre_of(name: str) -> str | None:
    """quill-legal -> legal; a name that doesn't end in a genre (quill-base) -> None."""
    g = name.rsplit("-", 1)[-1]
    return g if g in GENRES else None


def samples(config, model, tokenizer, defaults: dict, prompts: list[tuple[str, int]]) -> list[str]:
    """What the serving engine writes after each (prompt, seed) at the registry's defaults: the
    text a writer gets for a request that sets nothing but the seed."""
    from serve_app.engine import Engine, GenerationRequest, SamplingParams

    # threads=None: the engine keeps this process's torch threads (evaluate's --threads)
    engine = Engine(dataclasses.replace(config, threads=None), model=model, tokenizer=tokenizer)
    requests = [GenerationRequest(p, SamplingParams(**defaults, seed=s)) for p, s in prompts]
    for r in requests:
        engine.add(r)
    texts = {r.request_id: "" for r in requests}
    while engine.has_work:
        for delta in engine.step():
            if delta.finish_reason == "error":
                raise RuntimeError(f"sampling failed: {delta.error}")
            texts[delta.request_id] += delta.text
    return [texts[r.request_id] for r in requests]


def _shown(path: str, registry_dir: Path) -> str:
    """A tokenizer's folder as the docs name it: relative to the registry (hf:// ids as they are)."""
    p = Path(path)
    return p.relative_to(registry_dir).as_posix() if p.is_relative_to(registry_dir) else path


def evaluate(registry: Path, names: list[str] | None, genres: list[str], max_tokens: int,
             block_size: int, seed: int, matrix: str = "own", corpora: Path | None = None,
             cache_dir: Path | None = None) -> dict:
    from serve_app.config import load_registry

    entries = [m for m in load_registry(registry).models if not names or m.name in names]
    registry_dir = registry.resolve().parent
    corpora = corpora or repo_path("training/corpora")
    streams: dict[str, dict] = {}  # tokenizer folder -> genre -> held-out tokens
    results = {"ppl": {}, "bpb": {}, "samples": {}, "sizes": {}, "seconds": {}, "defaults": {},
               "dtypes": {}, "text": {}, "corpora": corpora}
    for entry in entries:
        name, t0 = entry.name, time.time()
        config, model, tokenizer = load_served(entry)
        tok_name = _shown(config.source, registry_dir)  # the engine's tokenizer comes from there
        if tok_name not in streams:  # the held-out split, in this tokenizer's tokens
            streams[tok_name] = {g: genre_tokens(g, "val", corpora, SplitSettings(), tokenizer,
                                                 cache_dir or repo_path("runs/cache")) for g in genres}
            results["text"][tok_name] = {"vocab": len(tokenizer), "genres": {}}
        own = genre_of(name)
        # "own": a genre model is scored on its own genre only (the base on all of them);
        # "full": every model on every genre (6 x 5 evaluations: minutes on a CPU).
        scored = {g: score_stream(model, s, block_size, max_tokens, tokenizer=tokenizer)
                  for g, s in streams[tok_name].items() if matrix == "full" or own is None or g == own}
        results["ppl"][name] = {g: s.perplexity for g, s in scored.items()}
        results["bpb"][name] = {g: s.bits_per_byte for g, s in scored.items()}
        results["text"][tok_name]["genres"].update({g: (s.tokens, s.bytes) for g, s in scored.items()})
        prompt_genres = [own] if own else list(PROMPTS)
        # three samples for a genre model; the base writes one after each genre's prompt, to
        # be read beside that genre's model
        seeds = [seed] if own is None else [seed, seed + 1, seed + 2]
        prompts = [(PROMPTS[g], s) for g in prompt_genres for s in seeds]
        results["defaults"][name] = entry.defaults.model_dump()
        results["dtypes"][name] = str(next(model.parameters()).dtype).removeprefix("torch.")
        texts = samples(config, model, tokenizer, results["defaults"][name], prompts)
        results["samples"][name] = [(p, text) for (p, _), text in zip(prompts, texts)]
        results["seconds"][name] = time.time() - t0
        print(f"{name}: " + ", ".join(f"{g} ppl {s.perplexity:.1f} bpb {s.bits_per_byte:.3f}"
                                      for g, s in scored.items())
              + f"  ({results['seconds'][name]:.0f} s)", flush=True)
        folder = Path(config.adapter or config.source)
        run = read_training_run(folder)
        if run:
            results.setdefault("training", {})[name] = run
        results["sizes"][name] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        results.setdefault("what", {})[name] = _what(config, own, run, registry_dir)
    return results


def _what(config, own: str | None, run: dict | None, registry_dir: Path) -> str:
    """A model's row in the table: an adapter or a whole model, and the text it was trained on
    (the training run's genres where it was recorded, else what its name says)."""
    trained = sorted(run["train_tokens"]) if run and run.get("train_tokens") else [own] if own else []
    text = ("all five genres" if set(trained) == set(GENRES) else
            f"{', '.join(trained)} corpus" if trained else "trained elsewhere")
    if config.adapter:
        return f"LoRA adapter on {_shown(config.source, registry_dir)}, {text}"
    return f"base, {text}" if set(trained) == set(GENRES) else f"full model, {text}"


def render(results: dict, genres: list[str], command: str, max_tokens: int, block_size: int) -> str:
    import peft
    import transformers

    ppl, bpb = results["ppl"], results["bpb"]
    base_name = next((n for n in ppl if genre_of(n) is None), None)
    base = ppl.get(base_name)
    vocabs = {t["vocab"] for t in results["text"].values()}
    if vocabs == {50257}:
        tokenizer = ("All use GPT-2's own BPE tokenizer, so real `gpt2` / `gpt2-medium` checkpoints "
                     "can be swapped in through `models/registry.yaml` (`source: hf://gpt2`) and "
                     "fine-tuned with the same recipes.")
    else:
        tokenizer = ("Each is served with the tokenizer in its base folder ("
                     + ", ".join(f"`{t}`: {v['vocab']:,} tokens" for t, v in results["text"].items())
                     + "); bits per byte below compares models across tokenizers.")
    lines = [
        "# Quill's shipped models",
        "",
        "Quill ships a small GPT-2-architecture base model trained from scratch and five genre "
        f"models, each a LoRA adapter merged into that base when it is served. {tokenizer} "
        "Each model folder holds a model card (README.md) with its data, licence, recipe and metrics.",
        "",
        "| model | what | shipped weights |",
        "| --- | --- | --- |",
    ]
    for name, size in results["sizes"].items():
        lines.append(f"| `{name}` | {results['what'][name]} | {size / 1e6:.2f} MB |")
    lines += ["", f"All shipped weights together: {sum(results['sizes'].values()) / 1e6:.1f} MB "
              "(`find models -name '*.safetensors' | xargs du -cb`).", ""]

    training = results.get("training") or {}
    if training:
        where = sorted({f"{t.get('cpu', 'an unrecorded CPU')}, {t.get('threads', 1)} torch thread(s), "
                        f"{'fp32' if t['precision'] == 'no' else t['precision']}" for t in training.values()})
        lines += ["## Training runs", "",
                  f"On the build box ({'; '.join(where)}); tokens/s depend on what else ran "
                  "beside it. From `models/<name>/training_run.json`, which the export writes beside the weights:", "",
                  "| model | method | steps | tokens | minutes | tokens/s | trainable params |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, t in training.items():
            method = "LoRA" if t["trainable_params"] < t["params"] / 2 else "from scratch"
            lines.append(f"| `{name}` | {method} | {t['steps']:,} | {t['tokens']:,} | "
                         f"{t['train_seconds'] / 60:.1f} | {t['tokens_per_second']:.0f} | "
                         f"{t['trainable_params'] / 1e6:.2f}M of {t['params'] / 1e6:.1f}M |")
        lines += ["", "Why LoRA for the genre models: five full copies of the base would not fit "
                  "the 60 MB budget for shipped weights; an adapter (LoRA on every block's "
                  "matmuls plus the final layer norm) is a few MB, trains faster per token (no "
                  "gradients for the embedding), and is merged into the base at load, so it costs "
                  "nothing per generated token. How the base's shape and tokenizer were chosen: "
                  "[training.md](training.md).", ""]

    corpora = Path(results["corpora"]).resolve()
    shown = corpora.relative_to(REPO_ROOT).as_posix() if corpora.is_relative_to(REPO_ROOT) else str(corpora)
    several = len(results["text"]) > 1
    lines += ["## Held-out perplexity and bits per byte", "",
              f"Every number below is on the held-out split of `{shown}/<genre>` (about 5% of the "
              "corpus, chosen by hash of ~4 KB pieces in `training/data.py`, never trained on), "
              "cut into tokens by the tokenizer the model is served with: the "
              + (f"{max_tokens:,} tokens of each split" if max_tokens else "whole split")
              + f", scored in {block_size}-token blocks, each from "
              "its own start (a block's first token is context; the others are predicted). "
              + ("The same number of tokens covers a different length of text in each tokenizer: "
                 "the bytes say how much. " if several else "")
              + "The text scored:", "",
              "| genre | text | " + ("tokenizer | " if several else "")
              + "tokens predicted | UTF-8 bytes of those tokens |",
              "| --- | --- | " + ("--- | " if several else "") + "---: | ---: |"]
    for tok_name, text in results["text"].items():
        for g in genres:
            if g in text["genres"]:
                tokens, n_bytes = text["genres"][g]
                lines.append(f"| {g} | held-out split of `{shown}/{g}` | "
                             + (f"`{tok_name}` ({text['vocab']:,} tokens) | " if several else "")
                             + f"{tokens:,} | {n_bytes:,} |")
    lines += ["", "Perplexity, exp(mean next-token loss). Lower is better; **bold** is a genre "
              "model on its own genre. It depends on how the tokenizer cuts the text, so it "
              "compares only models that share a tokenizer.", ""]
    lines += _matrix(ppl, genres, "{:.1f}")
    lines += ["", "Bits per byte: the same loss in bits, over the UTF-8 bytes of the predicted text "
              "(`<|endoftext|>` between pieces counts no bytes; predicting it still costs loss). "
              "The text is the same whatever tokenizer cuts it, so this compares models across "
              "tokenizers too. Lower is better.", ""]
    lines += _matrix(bpb, genres, "{:.3f}")
    if base:
        base_bpb = bpb[base_name]
        lines += ["", f"| genre model | own genre | {base_name} on that genre | change | "
                  f"own genre, bits/byte | {base_name}, bits/byte |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in ppl.items():
            g = genre_of(name)
            if g and g in row and g in base:
                change = 100 * (row[g] / base[g] - 1)
                lines.append(f"| `{name}` | {row[g]:.1f} | {base[g]:.1f} | {change:+.0f}% | "
                             f"{bpb[name][g]:.3f} | {base_bpb[g]:.3f} |")
    served_dtypes = ", ".join(sorted(set(results.get("dtypes", {}).values()))) or "an unrecorded dtype"
    lines += ["", "Made by:", "", "```", command, "```", "",
              f"on {platform.machine()} / {platform.system()}, {torch.get_num_threads()} torch thread(s), "
              f"weights in {served_dtypes} (as the registry's dtype loads them on this machine), "
              f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
              f"{peft.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", ""]

    base_run = training.get(base_name) or {}
    if base_run:  # how much training, from the runs themselves
        hours = sum(t["train_seconds"] for t in training.values()) / 3600
        passes = base_run["tokens"] / max(1, sum(base_run.get("train_tokens", {}).values()))
        trained = (f"These are small models trained for {hours:.1f} hours in all on a 2-core CPU "
                   f"(docs/training.md): the base saw {base_run['tokens'] / 1e6:.1f}M tokens, "
                   f"{passes:.1f} passes over the corpora.")
    else:
        trained = "These are small models trained on a 2-core CPU (docs/training.md)."
    lines += ["## What to expect", "",
              f"{trained} They write the phrases, line shapes and vocabulary of a genre, often "
              "grammatical for a clause or two, but not coherent text. The point of shipping them "
              "is a complete, servable pipeline with honest numbers. For useful suggestions, point "
              "a registry entry at `hf://gpt2` or `hf://gpt2-medium` and fine-tune it with the "
              "same recipes (`model.init: hf://gpt2`, `method: lora`, `data.tokenizer: "
              "models/gpt2-tokenizer`) on a GPU, where accelerate turns on mixed precision by "
              "itself; `train.gradient_checkpointing: true` trades compute for memory on the "
              "larger models.", ""]
    lines += ["## Sample continuations", "",
              "Written by the serving engine for a request that sets nothing but a seed, so at "
              "each model's registry defaults (listed under its name); the prompt is in bold. "
              "For each genre: the genre model's three continuations of its genre's prompt "
              "(seeds 0, 1, 2), then the base's continuation of the same prompt (seed 0).", ""]
    by_prompt = {p: t for p, t in results["samples"].get(base_name, [])} if base_name else {}
    for name, pairs in results["samples"].items():
        if name == base_name and any(genre_of(n) for n in results["samples"]):
            continue  # shown beside each genre model below
        defaults = ", ".join(f"{k} {v}" for k, v in results["defaults"][name].items())
        lines += [f"### {name}", "", f"Registry defaults: {defaults}.", ""]
        shown_pairs = [(name, p, t) for p, t in pairs]
        if genre_of(name) and pairs[0][0] in by_prompt:
            shown_pairs.append((base_name, pairs[0][0], by_prompt[pairs[0][0]]))
        for who, prompt, text in shown_pairs:
            text = text.strip() or "*(nothing: the model ended the text at once)*"
            quoted = ("**" + prompt.strip() + "**" + (" " if not prompt.endswith("\n") else "\n")
                      + text).replace("\n", "\n> ")
            lines += [f"`{who}`:", "", "> " + quoted, ""]
    lines += ["## Reproduce", "",
              "```sh",
              "sh training/build_all.sh          # tokenizer, quill-base, the five adapters, this page (times above)",
              command,
              "```", "",
              "Each recipe is one YAML file in `training/recipes/`; `quill train --recipe <file>` "
              "trains, resumes if interrupted, and exports to `models/<name>/` with its registry entry.",
              ""]
    return "\n".join(lines)


def _matrix(table: dict[str, dict[str, float]], genres: list[str], fmt: str) -> list[str]:
    """A model x genre table; a genre model's own genre in bold, '-' where not scored."""
    lines = ["| model | " + " | ".join(genres) + " |", "| --- | " + " | ".join("---:" for _ in genres) + " |"]
    for name, row in table.items():
        cells = ["-" if g not in row else f"**{fmt.format(row[g])}**" if genre_of(name) == g
                 else fmt.format(row[g]) for g in genres]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def _registry_problem(registry: Path, names: list[str] | None) -> str | None:
    """What stops `quill evaluate` before it loads anything: a registry that cannot be read, or a
    model name it does not hold."""
    from serve_app.config import RegistryError, load_registry

    try:
        known = load_registry(registry).names
    except RegistryError as exc:
        return "\n".join(exc.problems)
    unknown = [n for n in names or [] if n not in known]
    return f"{registry}: no model {', '.join(map(repr, unknown))} (it has {', '.join(known)})" if unknown else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quill evaluate",
                                 description="Held-out perplexity and bits per byte per genre, "
                                             "and samples -> docs/models.md")
    ap.add_argument("--registry", default="models/registry.yaml")
    ap.add_argument("--models", nargs="*", help="names from the registry (default: all)")
    ap.add_argument("--genres", nargs="*", default=list(GENRES), choices=GENRES)
    ap.add_argument("--max-tokens", type=int, default=0,
                    help="held-out tokens per genre (default 0: the whole held-out split)")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matrix", choices=["own", "full"], default="own",
                    help="own: genre models on their own genre, the base on all; full: every pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpora", default="training/corpora", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="runs/cache", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="Markdown file to write ('-' = stdout; default: docs/models.md "
                    "for the shipped registry, stdout for another, so that the shipped models' page stays theirs)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "docs/models.md" if repo_path(args.registry) == repo_path("models/registry.yaml") else "-"
    torch.set_num_threads(args.threads)
    registry = repo_path(args.registry)
    problem = _registry_problem(registry, args.models)
    if problem:
        print("\n".join(f"quill evaluate: {line}" for line in problem.splitlines()), file=sys.stderr)
        return 2
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
