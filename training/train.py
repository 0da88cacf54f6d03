"""Train a Quill model from a YAML recipe: a base GPT-2 from scratch, or a LoRA genre adapter.

    quill train --recipe training/recipes/quill-base.yaml
    python -m training.train --recipe training/recipes/quill-legal.yaml

What a run does:
1. builds the data (training/data.py; cached under runs/cache/),
2. trains with accelerate (mixed precision on a GPU, fp32 on a CPU), a tqdm progress bar and a
   JSON-lines log in runs/<name>/log.jsonl,
3. saves a resumable checkpoint in runs/<name>/checkpoint/ every `save_every` steps (safetensors
   + JSON, no pickles); running the same command again resumes from it (`--fresh` starts over);
   with `schedule: wsd`, raising `steps` extends a finished run from the checkpoint kept where
   its learning-rate decay began, so a base can be trained a few hours per session,
4. exports to models/<name>/ with a model card and its entry in models/registry.yaml.

Determinism: weights are initialised from `seed`; the batch of step s and the dropout noise of
step s are drawn from generators seeded by (seed, s). So a run gives the same weights whether
it ran straight through or was stopped and resumed (on the same hardware and library versions).

Why LoRA for the genre models: five full copies of the base would be five times its size
(over the 60 MB budget for shipped weights); a rank-16 adapter on c_attn/c_proj/c_fc is ~1 MB,
trains ~1.5x faster per token on a CPU (no gradients for the 50,257-row embedding), keeps the
base's general English, and is merged into the base at load so serving costs nothing extra.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.machine import machine_info
from training import export
from training.card import model_card
from serve_app.engine.loader import TOKENIZER_FILES, load_model
from training.data import GENRES, SplitSettings, corpus_files, genre_tokens, load_tokenizer
from training.metrics import perplexity, score_stream
from training.recipe import RecipeError, load_recipe, recipe_hash, repo_path


# ----------------------------------------------------------------------------- model

def build_model(recipe: dict, tokenizer):
    """A new GPT-2 (seeded init) sized to the tokenizer, or a checkpoint folder, plus a peft
    LoRA wrapper if asked."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    init = recipe["model"]["init"]
    if init == "scratch":
        torch.manual_seed(recipe["seed"])
        eos = tokenizer.eos_token_id
        cfg = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                         tie_word_embeddings=True, **recipe["model"]["config"])
        model = GPT2LMHeadModel(cfg)
    else:
        # Loaded in fp32 whatever it was saved in: training wants full-precision master weights.
        # `hf://gpt2` / `hf://gpt2-medium` fetch a hub checkpoint where the hub is reachable.
        where = init[len("hf://"):] if init.startswith("hf://") else str(repo_path(init))
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, use_safetensors=True)
        if len(tokenizer) > model.config.vocab_size:  # else the first batch fails in torch.embedding
            path = recipe.get("_path", "<recipe>")
            raise RecipeError(path, [f"{path}: data.tokenizer: {recipe['data']['tokenizer']} has {len(tokenizer)} tokens, "
                                     f"more than the {model.config.vocab_size} rows of model.init {init}: set it to the "
                                     "base's own tokenizer (models/quill-tokenizer for quill-base)"])
    model.config.use_cache = False  # no KV cache while training (and required by checkpointing)

    if recipe["train"]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        if recipe["method"] == "lora":
            model.enable_input_require_grads()  # frozen embeddings would cut the grad path

    if recipe["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = recipe["lora"]
        cfg = LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                         lora_dropout=lora["dropout"], target_modules=list(lora["target_modules"]),
                         modules_to_save=list(lora.get("modules_to_save") or []) or None,
                         fan_in_fan_out=True)  # GPT-2 uses Conv1D: weights stored (in, out)
        torch.manual_seed(recipe["seed"])  # LoRA A matrices are randomly initialised
        model = get_peft_model(model, cfg)
    return model


def _check_paths(recipe: dict, export_model: bool = True) -> None:
    """The folders a recipe names, checked before anything loads: a typo in one was a traceback
    from deep in transformers (model.init: the hub's "repo id" message) or the data loader; a
    registry the export cannot update was a traceback after the whole run."""
    path, d, problems = recipe.get("_path", "<recipe>"), recipe["data"], []
    if export_model:
        try:
            export.read_registry(repo_path(recipe["export"]["registry"]))
        except RecipeError as exc:
            problems += [f"export.registry: {problem}" for problem in exc.problems]
    init = recipe["model"]["init"]
    if init != "scratch" and not init.startswith("hf://") and not (repo_path(init) / "config.json").is_file():
        problems.append(f"model.init: {init} is not a checkpoint folder (no {repo_path(init) / 'config.json'}); "
                        "name a folder that save_pretrained wrote (models/quill-base), hf://name, or scratch")
    elif init != "scratch" and not init.startswith("hf://") and not any(repo_path(init).glob("*.safetensors")):
        problems.append(f"model.init: {init} has no .safetensors weights (pickled weights are refused: "
                        "load and re-save it with save_pretrained, which writes safetensors)")
    tokenizer = repo_path(d["tokenizer"])
    if not any((tokenizer / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"data.tokenizer: {d['tokenizer']} holds no tokenizer (no tokenizer.json or vocab.json in {tokenizer})")
    for genre in d["genres"]:
        if not corpus_files(genre, repo_path(d["corpora_dir"])):
            problems.append(f"data.corpora_dir: {d['corpora_dir']} has no {genre}/ folder of .txt or .jsonl "
                            f"files ({repo_path(d['corpora_dir']) / genre}), which data.genres asks for")
    if problems:
        raise RecipeError(path, [f"{path}: {problem}" for problem in problems])


def count_params(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------- data

class Batches:
    """The training batch of any step, drawn from a generator seeded by (seed, step).

    Each row picks a genre (by genre_weights; equal by default, so the small abstracts corpus
    is not drowned by the large legal one) and a random window of block_size tokens from
    that genre's train stream. Random windows rather than fixed blocks: every offset is seen.
    """

    def __init__(self, streams: dict[str, np.ndarray], weights: dict | None, block_size: int,
                 batch_size: int, seed: int):
        self.genres = list(streams)
        self.streams = [torch.from_numpy(streams[g].astype(np.int64)) for g in self.genres]
        for g, s in zip(self.genres, self.streams):
            if len(s) <= block_size:
                raise ValueError(f"genre {g}: {len(s)} train tokens, fewer than one block ({block_size})")
        w = [float((weights or {}).get(g, 1.0)) for g in self.genres]
        self.weights = torch.tensor(w) / sum(w)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed

    def __call__(self, step: int, micro: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + micro)
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        rows = []
        for k in which.tolist():
            s = self.streams[k]
            start = int(torch.randint(0, len(s) - self.block_size, (1,), generator=g))
            rows.append(s[start:start + self.block_size])
        return torch.stack(rows)


def lr_at(step: int, t: dict) -> float:
    """Linear warm-up, then the decay to lr * min_lr_ratio: cosine over the rest of the run, or
    (wsd) lr held until the last `decay_steps`. A pure function of the step, so a resumed run
    needs no scheduler state."""
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    floor = t["lr"] * t["min_lr_ratio"]
    if t.get("schedule") == "wsd":
        into = step - decay_start(t)
        if into < 0:
            return t["lr"]
        # 1 - sqrt: the cool-down shape that beat linear and cosine ones in Hägele et al. (2024),
        # "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations".
        return floor + (t["lr"] - floor) * (1 - math.sqrt(min(1.0, (into + 1) / t["decay_steps"])))
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return floor + (t["lr"] - floor) * cosine


def decay_start(t: dict) -> int | None:
    """The step where a wsd run's decay begins (None for cosine, which decays throughout)."""
    return t["steps"] - t["decay_steps"] if t.get("schedule") == "wsd" else None


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt_dir: Path, model, optimizer, step: int, meta: dict) -> None:
    """Trainable weights + AdamW moments as safetensors, the rest as JSON. Written to a temp
    folder and renamed, so a run killed mid-save leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    save_file({n: p.detach().contiguous().cpu() for n, p in named}, str(tmp / "weights.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(
        {**meta, "step": step, "param_groups": opt["param_groups"], "scalars": scalars,
         "param_names": [n for n, _ in named]}, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.rename(ckpt_dir)


def load_checkpoint(ckpt_dir: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    state = json.loads((ckpt_dir / "state.json").read_text())
    weights = load_file(str(ckpt_dir / "weights.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(state["scalars"].items()):
        idx, field = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[field] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def _decayed_too_early(meta: dict, t: dict) -> bool:
    """Whether a checkpoint's weights went through a wsd decay that the recipe's schedule (its
    `steps` raised since) has not begun at that step."""
    started = meta.get("decay_start")
    return started is not None and meta["step"] > started and (decay_start(t) or 0) > started


# ----------------------------------------------------------------------------- training

def _mixed_precision(setting: str) -> str:
    """auto: bf16 (or fp16) on a GPU; bf16 on a CPU whose oneDNN has bf16 kernels (AMX or
    AVX512-BF16: 1.5-2x the fp32 tokens/s on the build box, docs/models.md); fp32 elsewhere."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train(recipe: dict, fresh: bool = False, export_model: bool = True, log_to_stdout: bool = False,
          run_root: Path | None = None, stop_at: int | None = None) -> dict:
    """Run (or resume) one recipe; returns a summary dict (losses, tokens/s, export path).

    stop_at: checkpoint and return after this step (as if the run were interrupted there); the
    next call resumes. The learning-rate schedule still follows train.steps, so stopping and
    resuming gives the same weights as one straight run.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    _check_paths(recipe, export_model)
    t = recipe["train"]
    torch.set_num_threads(int(t["threads"]))
    name = recipe["name"]
    run_dir = (run_root or repo_path("runs")) / name
    ckpt_dir = run_dir / "checkpoint"
    stable_dir = run_dir / "checkpoint-stable"  # wsd: the weights where the decay began
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    # --- data
    d = recipe["data"]
    tokenizer = load_tokenizer(repo_path(d["tokenizer"]))
    settings = SplitSettings(d["val_fraction"], d["chunk_chars"])
    corpora = repo_path(d["corpora_dir"])
    cache = repo_path(d["cache_dir"])
    train_streams = {g: genre_tokens(g, "train", corpora, settings, tokenizer, cache) for g in d["genres"]}
    val_streams = {g: genre_tokens(g, "val", corpora, settings, tokenizer, cache) for g in d["genres"]}
    batches = Batches(train_streams, d["genre_weights"], d["block_size"], t["batch_size"],
                      recipe["seed"])

    # --- model, optimizer
    model = build_model(recipe, tokenizer)
    n_total, n_train = count_params(model)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t["lr"], betas=(0.9, 0.95))

    start_step, elapsed_before, rhash = 0, 0.0, recipe_hash(recipe)
    loss_ema = None  # the loss's moving average; kept in checkpoints, so it goes on across a resume
    if (ckpt_dir / "state.json").exists():
        meta = json.loads((ckpt_dir / "state.json").read_text())
        if meta.get("recipe_hash") != rhash:
            raise SystemExit(f"{ckpt_dir} was made by a different recipe; rerun with --fresh "
                             "to start over (or restore the recipe)")
        done_summary = run_dir / "summary.json"
        finished = json.loads(done_summary.read_text()) if done_summary.exists() else {}
        # Exported by this run, at these steps, to where this recipe exports (not merely a
        # folder left there by an earlier run, or a run trained with --no-export).
        if (meta["step"] >= t["steps"] and finished.get("steps") == meta["step"]
                and finished.get("export") == str(repo_path(recipe["export"]["dir"]))):
            # Finished and exported already: a rerun of build_all.sh moves on to the next model.
            print(f"[{name}] already trained ({meta['step']} steps) and exported; --fresh retrains",
                  flush=True)
            return finished
        resume_dir = ckpt_dir
        if _decayed_too_early(meta, t) and (stable_dir / "state.json").exists():
            # Extended: the checkpoint went through a decay the longer schedule has not reached.
            resume_dir = stable_dir
        state = load_checkpoint(resume_dir, model, optimizer)
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        loss_ema = state.get("loss_ema")
        print(f"[{name}] resuming from step {start_step} ({resume_dir})", flush=True)

    accelerator = Accelerator(mixed_precision=_mixed_precision(t["mixed_precision"]),
                              cpu=not torch.cuda.is_available())
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    log_path = run_dir / "log.jsonl"
    if log_path.exists():  # drop records of steps after the checkpoint (a run killed mid-way)
        kept = [line for line in log_path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step]
        log_path.write_text("".join(line + "\n" for line in kept))
    tokens_per_step = t["batch_size"] * d["block_size"] * t["grad_accum"]
    print(f"[{name}] {n_total/1e6:.2f}M params, {n_train/1e6:.3f}M trainable, "
          f"{tokens_per_step} tokens/step, steps {start_step}->{t['steps']}, "
          f"precision {accelerator.mixed_precision}, device {accelerator.device}", flush=True)

    end_step = min(t["steps"], stop_at) if stop_at else t["steps"]
    bar = tqdm(range(start_step, end_step), initial=start_step, total=t["steps"], desc=name,
               mininterval=5, disable=None)
    t0, step = time.time(), start_step
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        torch.manual_seed(recipe["seed"] * 7919 + step)  # this step's dropout noise
        step_loss = 0.0
        for micro in range(t["grad_accum"]):
            x = batches(step, micro).to(accelerator.device)
            with accelerator.autocast():
                loss = model(input_ids=x, labels=x).loss / t["grad_accum"]
            accelerator.backward(loss)
            step_loss += loss.item()
        if t["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_ema = step_loss if loss_ema is None else 0.98 * loss_ema + 0.02 * step_loss
        done = step + 1
        tok_s = (done - start_step) * tokens_per_step / (time.time() - t0)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tok_s:.0f}")
        record = {"step": done, "loss": round(step_loss, 4), "lr": lr_at(step, t),
                  "tok_s": round(tok_s, 1)}
        if t["eval_every"] and (done % t["eval_every"] == 0 or done == t["steps"]):
            record["val_ppl"] = {g: round(perplexity(accelerator.unwrap_model(model), s,
                                                     d["block_size"], t["eval_tokens"]), 2)
                                 for g, s in val_streams.items()}
            bar.write(f"[{name}] step {done} loss {loss_ema:.3f} held-out ppl {record['val_ppl']}")
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if log_to_stdout and done % 10 == 0:
            print(json.dumps(record), flush=True)
        ckpt_meta = {"recipe_hash": rhash, "elapsed_s": elapsed_before + time.time() - t0,
                     "decay_start": decay_start(t), "loss_ema": loss_ema}
        if done == end_step or (t["save_every"] and done % t["save_every"] == 0):
            save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, done, ckpt_meta)
        if done == decay_start(t):  # where a longer run of this recipe would go on from
            save_checkpoint(stable_dir, accelerator.unwrap_model(model), optimizer, done, ckpt_meta)
    bar.close()

    elapsed = elapsed_before + (time.time() - t0)
    # Steps done so far (end_step: a --stop-at run stops short of train.steps), over the time
    # they took across resumes.
    summary = {"name": name, "steps": end_step, "tokens": end_step * tokens_per_step,
               "train_seconds": round(elapsed, 1),
               "tokens_per_second": round(end_step * tokens_per_step / max(elapsed, 1e-9), 1),
               "final_loss_ema": None if loss_ema is None else round(loss_ema, 4),
               "params": n_total, "trainable_params": n_train, "vocab_size": len(tokenizer),
               "train_tokens": {g: int(len(s)) for g, s in train_streams.items()},
               "val_tokens": {g: int(len(s)) for g, s in val_streams.items()},
               "device": str(accelerator.device), "precision": accelerator.mixed_precision,
               "threads": torch.get_num_threads(), "cpu": machine_info()["cpu"]}
    model = accelerator.unwrap_model(model)
    if end_step < t["steps"]:
        print(f"[{name}] stopped at step {end_step} of {t['steps']}; run again to resume", flush=True)
        return summary
    if export_model:
        summary["export"] = export_recipe_model(recipe, model, tokenizer, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _base_ref(init: str, registry_dir: Path) -> str:
    """How a registry entry names the base an adapter was trained on."""
    if init.startswith("hf://"):
        return init
    return os.path.relpath(repo_path(init), registry_dir)


def rewrite_card(recipe: dict) -> Path:
    """Re-render models/<name>/README.md from the run summary the export wrote beside the weights,
    without training (for when the card's wording changes). The registry entry is rebuilt the
    same way as at export."""
    e = recipe["export"]
    out_dir, registry_dir = repo_path(e["dir"]), repo_path(e["registry"]).parent
    summary = export.read_training_run(out_dir)
    if summary is None:
        raise FileNotFoundError(f"{out_dir / export.TRAINING_RUN}: no run summary beside the "
                                f"weights; train {recipe['name']} again to write one")
    if recipe["method"] == "lora":
        entry = export.registry_entry(recipe["name"], _base_ref(recipe["model"]["init"], registry_dir),
                                      os.path.relpath(out_dir, registry_dir), e["entry"])
    else:
        entry = export.registry_entry(recipe["name"], os.path.relpath(out_dir, registry_dir), None,
                                      e["entry"])
    export.write_card(out_dir, model_card(recipe, summary, entry))
    return out_dir / "README.md"


def _held_out_scores(model, recipe: dict, tokenizer, genres) -> tuple[dict, dict]:
    """({genre: perplexity}, {genre: bits per byte}) on the held-out split, for the model card."""
    d, e = recipe["data"], recipe["export"]
    settings, corpora = SplitSettings(d["val_fraction"], d["chunk_chars"]), repo_path(d["corpora_dir"])
    scores = {g: score_stream(model, genre_tokens(g, "val", corpora, settings, tokenizer,
                                                  repo_path(d["cache_dir"])),
                              d["block_size"], e["eval_tokens"], tokenizer=tokenizer) for g in genres}
    return ({g: round(s.perplexity, 2) for g, s in scores.items()},
            {g: round(s.bits_per_byte, 3) for g, s in scores.items()})


def export_recipe_model(recipe: dict, model, tokenizer, summary: dict) -> str:
    """Export weights + tokenizer + card, measure the card's held-out perplexity and bits per
    byte, and write the registry entry."""
    e, d = recipe["export"], recipe["data"]
    out_dir = repo_path(e["dir"])
    registry_path = repo_path(e["registry"])
    model.eval()
    if recipe["method"] == "lora":
        base_ref = _base_ref(recipe["model"]["init"], registry_path.parent)
        init = recipe["model"]["init"]
        export.export_adapter(model, tokenizer, out_dir, base_ref, d["block_size"], e["dtype"],
                              base_dir=None if init.startswith("hf://") else repo_path(init))
        entry = export.registry_entry(recipe["name"], base_ref,
                                      os.path.relpath(out_dir, registry_path.parent), e["entry"])
        # The base alone on the same text, for the card's comparison (adapter switched off).
        with model.disable_adapter():
            summary["base_held_out_ppl"], summary["base_held_out_bpb"] = _held_out_scores(
                model, recipe, tokenizer, d["genres"])
        # Measure what will be served: the exported adapter merged into its base by the loader
        # `quill serve` uses (peft's own merge moves a tied embedding with a LoRA on lm_head).
        source = init if init.startswith("hf://") else str(repo_path(init))
        scored = load_model(source, str(out_dir), next(model.parameters()).device, torch.float32)
    else:
        export.export_full(model, tokenizer, out_dir, e["dtype"])
        entry = export.registry_entry(recipe["name"], os.path.relpath(out_dir, registry_path.parent),
                                      None, e["entry"])
        scored = model.float()  # weights already rounded to the export dtype by export_full
    # A base is scored on every genre that has a corpus folder; an adapter on its own genre(s)
    # (docs/models.md compares it with the base there; scoring all genres costs minutes on a CPU).
    corpora = repo_path(d["corpora_dir"])
    genres = (d["genres"] if recipe["method"] == "lora"
              else [g for g in GENRES if (corpora / g).is_dir()])
    summary["held_out_ppl"], summary["held_out_bpb"] = _held_out_scores(scored, recipe, tokenizer, genres)
    export.write_card(out_dir, model_card(recipe, summary, entry))
    export.write_training_run(out_dir, summary)
    export.update_registry(registry_path, entry)
    print(f"[{recipe['name']}] exported to {out_dir}; held-out ppl {summary['held_out_ppl']}, "
          f"bits/byte {summary['held_out_bpb']}", flush=True)
    return str(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quill train", description="Train a Quill model from a YAML recipe.")
    ap.add_argument("--recipe", required=True, nargs="+", help="training/recipes/<name>.yaml (several run in order)")
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint in runs/<name>/ and start over")
    ap.add_argument("--steps", type=int, help="override train.steps (e.g. for a smoke run)")
    ap.add_argument("--threads", type=int, help="override train.threads (torch CPU threads)")
    ap.add_argument("--stop-at", type=int, help="checkpoint and exit after this step (resume later)")
    ap.add_argument("--no-export", action="store_true", help="train only; don't touch models/")
    ap.add_argument("--runs", type=Path, help="folder for run checkpoints and logs (default: runs/ in the repo)")
    ap.add_argument("--print-recipe", action="store_true", help="print the merged recipe and exit")
    ap.add_argument("--card-only", action="store_true",
                    help="re-render the model card from the run summary beside the weights; no training")
    args = ap.parse_args(argv)
    for path in args.recipe:
        try:
            _run(path, args)
        except RecipeError as exc:  # one line per problem, as `quill serve` reports a registry
            print("\n".join(f"quill train: {problem}" for problem in exc.problems), file=sys.stderr)
            return 2
    return 0


def _run(path: str, args: argparse.Namespace) -> None:
    """One recipe of `quill train --recipe ...`."""
    recipe = load_recipe(repo_path(path) if not Path(path).exists() else path)
    if args.steps is not None:
        recipe["train"]["steps"] = args.steps
    if args.threads is not None:
        recipe["train"]["threads"] = args.threads
    if args.print_recipe:
        print(yaml.safe_dump(recipe, sort_keys=False))
    elif args.card_only:
        print(f"wrote {rewrite_card(recipe)}")
    else:
        summary = train(recipe, fresh=args.fresh, export_model=not args.no_export, stop_at=args.stop_at,
                        run_root=args.runs)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("train_tokens", "val_tokens")}),
              flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
