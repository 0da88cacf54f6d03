"""training/: cleaning messy text, held-out splits, a few training steps, resume, export -> load.

Everything runs on tiny models (32 wide, 1 layer) and tiny corpora written into tmp dirs, with
one torch thread, so the file takes well under a minute on a 2-core CPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training import data
from training.recipe import DEFAULTS, _merge, load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- cleaning

def test_clean_text_normalises_messy_input():
    messy = ("\ufeffTHE\u00a0TITLE   \r\n\r\n\r\n\r\n\r\n"
             "\u201cHello,\u201d she said\u2019s   \r\n"
             "     centred   line\twith\ttabs  \r"
             "zero\u200bwidth and \u0007bell\n"
             "*       *       *       *\n"
             "This eBook is for the use of anyone, Project Gutenberg License\n"
             "[Illustration: a dragon]\n"
             "an _italic_ word and snake_case stays\n"
             "\n\n\n\n\n"
             "\ufb01ne ligature\n\n   \n")
    assert data.clean_text(messy) == (
        "THE TITLE\n"
        "\n"
        '"Hello," she said\'s\n'
        "centred line with tabs\n"
        "zerowidth and bell\n"
        "an italic word and snake_case stays\n"
        "\n"
        "fine ligature")


def test_clean_text_keeps_plain_paragraphs_unchanged():
    text = "First paragraph, line one.\nLine two.\n\nSecond paragraph."
    assert data.clean_text(text) == text


def _write_corpora(root: Path) -> Path:
    """Two small genres in the layout of training/corpora/ (works joined by 3 blank lines)."""
    legal, abstracts = root / "legal", root / "abstracts"
    legal.mkdir(parents=True)
    abstracts.mkdir()
    para = "The party of the first part shall deliver the goods. " * 6
    works = ["\n\n".join(f"Section {w}.{i}. {para}" for i in range(40)) for w in range(3)]
    (legal / "a.txt").write_text("\r\n".join(data.WORK_SEPARATOR.join(works).split("\n")))
    with (abstracts / "x.jsonl").open("w") as f:
        for i in range(60):
            f.write(json.dumps({"title": f"On problem {i}",
                                "abstract": f"We study problem {i} and prove a bound. " * 5}) + "\n")
    return root


def test_documents_split_is_stable_disjoint_and_leaves_raw_files_alone(tmp_path):
    corpora = _write_corpora(tmp_path / "corpora")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpora.rglob("*.*")}
    docs = data.read_documents("legal", corpora)
    assert len(docs) == 3 and all("\r" not in d for d in docs)
    train, val = data.split_documents(docs, val_fraction=0.2, chunk_chars=500)
    assert val and train
    assert not set(train) & set(val)
    assert 0.05 < len(val) / (len(val) + len(train)) < 0.45
    # the split is by content, so it doesn't move when the documents are reordered
    train2, val2 = data.split_documents(list(reversed(docs)), val_fraction=0.2, chunk_chars=500)
    assert set(val2) == set(val)
    abstracts = data.read_documents("abstracts", corpora)
    assert len(abstracts) == 60 and abstracts[0].startswith("On problem 0\n\nWe study")
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in corpora.rglob("*.*")}


def test_tokenizer_is_real_gpt2_bpe_and_blocks_pack():
    tok = data.load_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    stream = data.tokenize_pieces(["Hello world", "Hello"], tok)
    assert stream.tolist() == [15496, 995, 50256, 15496, 50256]
    blocks = data.pack_blocks(np.arange(10, dtype=np.uint16), 4)
    assert blocks.shape == (2, 4) and blocks[1].tolist() == [4, 5, 6, 7]


# ----------------------------------------------------------------------------- training

def _tiny_recipe(tmp_path: Path, corpora: Path, **train_overrides) -> dict:
    recipe = _merge(DEFAULTS, {
        "name": "tiny-base",
        "seed": 7,
        "model": {"init": "scratch",
                  "config": {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}},
        "data": {"genres": ["legal", "abstracts"], "block_size": 32, "val_fraction": 0.2,
                 "chunk_chars": 500, "corpora_dir": str(corpora), "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 3, "eval_every": 0,
                  "save_every": 10, "eval_tokens": 256, **train_overrides},
        "export": {"dir": str(tmp_path / "models" / "tiny-base"), "dtype": "float32",
                   "eval_tokens": 256, "registry": str(tmp_path / "models" / "registry.yaml")},
    })
    recipe["_path"] = "training/recipes/tiny-base.yaml"
    return recipe


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return _write_corpora(tmp_path_factory.mktemp("corpora"))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, corpora):
    """A tiny base trained for 25 steps and exported (shared by the tests below: it is slow-ish)."""
    from training.train import train

    tmp_path = tmp_path_factory.mktemp("tiny-base")
    recipe = _tiny_recipe(tmp_path, corpora, steps=25)
    summary = train(recipe, run_root=tmp_path / "runs")
    return tmp_path, recipe, summary


def test_a_few_steps_lower_the_loss_and_export_loads_with_safetensors(tiny_base, corpora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.metrics import perplexity

    tmp_path, recipe, summary = tiny_base
    losses = _losses(tmp_path / "runs" / "tiny-base")
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # ln(50257) = 10.8 at the start

    out = Path(recipe["export"]["dir"])
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)  # the folder is self-contained
    assert tok("Hello world")["input_ids"] == [15496, 995]
    # the exported model is the trained one: its held-out perplexity is what the card reports
    val = data.genre_tokens("legal", "val", corpora, data.SplitSettings(0.2, 500), tok,
                            tmp_path / "cache")
    assert perplexity(model, val, 32, 256) == pytest.approx(summary["held_out_ppl"]["legal"], rel=1e-3)
    assert summary["held_out_ppl"]["legal"] < 5000  # an untrained model is ~50,000

    card = (out / "README.md").read_text()
    assert "## Licence" in card and "public domain" in card and "tiny-base" in card
    assert f"| legal | {summary['held_out_ppl']['legal']} |" in card
    # --card-only re-renders the same card from the run's summary, without training, and needs
    # no runs/ folder: the export wrote the summary beside the weights (docs/models.md's
    # training table comes from there too)
    from training.train import rewrite_card

    (out / "README.md").write_text("stale")
    runs = tmp_path / "runs"
    runs.rename(tmp_path / "runs-away")
    try:
        assert rewrite_card(recipe).read_text() == card
    finally:
        (tmp_path / "runs-away").rename(runs)
    registry = yaml.safe_load(Path(recipe["export"]["registry"]).read_text())
    assert [m["name"] for m in registry["models"]] == ["tiny-base"]
    assert registry["models"][0]["source"] == "tiny-base"  # relative to the registry's folder


def test_own_tokenizer_is_fitted_on_the_train_split_and_loads_like_gpt2s(tmp_path, corpora):
    """The shipped models' BPE: GPT-2's format, so the serving loader takes it as it is; every
    byte still encodes."""
    from serve_app.engine.loader import load_tokenizer as serving_tokenizer
    from training.tokenizer import EOS, fit

    fit(corpora, vocab_size=300, genres=("legal", "abstracts")).save_pretrained(str(tmp_path / "tok"))
    tok = serving_tokenizer(str(tmp_path / "tok"))
    assert len(tok) == 300 and tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == tok.eos_token_id
    text = "Section 7. The party shall deliver\n\nCafé, naïve, 日本語, 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The party of the first part")) < len("The party of the first part") / 2
    assert data.load_tokenizer(tmp_path / "tok") is not None  # training's loader accepts it too
    # A model trained on it is sized to it, and its token streams are cached apart from GPT-2's.
    from training.train import train

    recipe = _tiny_recipe(tmp_path, corpora, steps=3)
    recipe["data"]["tokenizer"] = str(tmp_path / "tok")
    summary = train(recipe, run_root=tmp_path / "runs")
    assert json.loads((Path(recipe["export"]["dir"]) / "config.json").read_text())["vocab_size"] == 300
    assert summary["held_out_bpb"]["legal"] > 0
    gpt2 = data.genre_tokens("legal", "val", corpora, data.SplitSettings(0.2, 500), data.load_tokenizer(),
                             tmp_path / "cache")
    own = data.genre_tokens("legal", "val", corpora, data.SplitSettings(0.2, 500),
                            data.load_tokenizer(tmp_path / "tok"), tmp_path / "cache")
    assert own.max() < 300 < gpt2.max()


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, corpora):
    from safetensors.torch import load_file

    from training.train import train

    straight = _tiny_recipe(tmp_path / "a", corpora, steps=8, save_every=4)
    whole = train(straight, run_root=tmp_path / "a" / "runs", export_model=False)

    # the same recipe, stopped after step 5 (stop_at checkpoints there), then run again
    resumed = _tiny_recipe(tmp_path / "b", corpora, steps=8, save_every=4)
    stopped = train(resumed, run_root=tmp_path / "b" / "runs", export_model=True, stop_at=5)
    assert "export" not in stopped  # an unfinished run exports nothing
    assert stopped["steps"] == 5 and stopped["tokens"] * 8 == whole["tokens"] * 5  # what ran, not the plan
    ckpt = tmp_path / "b" / "runs" / "tiny-base" / "checkpoint" / "state.json"
    assert json.loads(ckpt.read_text())["step"] == 5
    train(resumed, run_root=tmp_path / "b" / "runs", export_model=False)

    wa = load_file(str(tmp_path / "a" / "runs" / "tiny-base" / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "runs" / "tiny-base" / "checkpoint" / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    # and the resumed run did start where it stopped, not from scratch
    assert len(_losses(tmp_path / "b" / "runs" / "tiny-base")) == 8


def test_lora_adapter_trains_exports_small_and_merges(tiny_base, corpora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.train import train

    tmp_path, base, base_summary = tiny_base
    base_dir = Path(base["export"]["dir"])

    lora = _merge(base, {"name": "tiny-legal", "method": "lora",
                         "model": {"init": str(base_dir)},
                         "data": {"genres": ["legal"]},
                         "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"steps": 12, "lr": 1e-2},
                         "export": {"dir": str(tmp_path / "models" / "tiny-legal")}})
    lora["_path"] = "training/recipes/tiny-legal.yaml"
    summary = train(lora, run_root=tmp_path / "runs")
    assert summary["trainable_params"] < summary["params"] / 10

    out = Path(lora["export"]["dir"])
    adapter_file = out / "adapter_model.safetensors"
    assert adapter_file.is_file() and not (out / "model.safetensors").exists()
    assert adapter_file.stat().st_size < (base_dir / "model.safetensors").stat().st_size / 5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert set(cfg["target_modules"]) == {"c_attn", "c_proj", "c_fc"}

    # load the way the engine does: base from safetensors, adapter merged
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True), out).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    x = torch.tensor([[15496, 995, 13, 383]])
    with torch.no_grad():
        assert not torch.allclose(merged(x).logits, plain(x).logits)  # the adapter changes the model
    # and the adapter helps on its own genre, as measured at export on the merged model
    assert summary["held_out_ppl"]["legal"] < base_summary["held_out_ppl"]["legal"]
    # the card's "base alone" column is the same base, measured the same way
    assert summary["base_held_out_ppl"]["legal"] == pytest.approx(base_summary["held_out_ppl"]["legal"],
                                                                  rel=1e-3)
    assert "tiny-base alone" in (out / "README.md").read_text()

    registry = yaml.safe_load(Path(lora["export"]["registry"]).read_text())
    entry = {m["name"]: m for m in registry["models"]}["tiny-legal"]
    assert entry["source"] == "tiny-base" and entry["adapter"] == "tiny-legal"

    # The export records its base: the engine's loader refuses the adapter on another base of
    # the same shape (it would merge, and serve noise), and takes it on its own.
    from safetensors.torch import load_file, save_file

    from serve_app.engine.loader import CheckpointError, load_weights

    other = tmp_path / "other-base"
    shutil.copytree(base_dir, other)
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(other / "model.safetensors").items()}
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    load_weights(str(base_dir), str(out), torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match="was trained on other weights than"):
        load_weights(str(other), str(out), torch.device("cpu"), torch.float32)

    # evaluate.py reads that registry, loads both models the way the server does, and writes
    # the comparison table + samples; it exits 0 only if the genre model beats the base
    from training.evaluate import main as evaluate_main

    doc = tmp_path / "models.md"
    rc = evaluate_main(["--registry", lora["export"]["registry"], "--genres", "legal", "abstracts",
                        "--max-tokens", "256", "--block-size", "32", "--out", str(doc),
                        "--corpora", str(corpora), "--cache-dir", str(tmp_path / "cache")])
    text = doc.read_text()
    assert rc == 0
    assert "| `tiny-legal` | - | " not in text and "| `tiny-legal` | **" in text
    assert "### tiny-legal" in text and "quill evaluate --registry" in text
    assert "| `tiny-legal` | **" in text.split("Bits per byte:")[1]  # bits per byte beside perplexity
    # the training table comes from the run summaries the exports wrote beside the weights
    # (the runs/ folder of a fresh checkout is empty)
    steps = {row.split("|")[1].strip(): row.split("|")[3].strip()
             for row in text.split("## Training runs")[1].split("## Held-out")[0].splitlines()
             if row.startswith("| `tiny-")}
    assert steps == {"`tiny-base`": f"{base_summary['steps']:,}", "`tiny-legal`": f"{summary['steps']:,}"}


def test_recipe_refuses_typos_and_lora_from_scratch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrian: {steps: 3}\n")
    with pytest.raises(ValueError, match="trian"):
        load_recipe(bad)
    bad.write_text("name: x\nmethod: lora\n")
    with pytest.raises(ValueError, match="LoRA recipe needs"):
        load_recipe(bad)


def test_shipped_recipes_load_and_name_the_six_models():
    names = {load_recipe(p)["name"] for p in (REPO_ROOT / "training" / "recipes").glob("*.yaml")}
    assert names == {"quill-base", "quill-legal", "quill-copywriting", "quill-lyrics",
                     "quill-fantasy", "quill-abstracts"}


def test_gradient_checkpointing_option_still_trains_a_lora(tiny_base, corpora):
    """train.gradient_checkpointing (for gpt2-medium-sized models) still trains the adapter: a
    checkpointed block over a frozen base can silently cut the grad path (reentrant checkpoints
    need inputs that require grad), and then LoRA's B matrices would stay at zero."""
    from safetensors.torch import load_file

    from training.train import train

    tmp_path, base, _ = tiny_base
    recipe = _merge(base, {"name": "tiny-ckpt", "method": "lora", "model": {"init": base["export"]["dir"]},
                           "data": {"genres": ["legal"]}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                           "train": {"steps": 3, "lr": 1e-2, "gradient_checkpointing": True}})
    train(recipe, run_root=tmp_path / "runs", export_model=False)
    weights = load_file(str(tmp_path / "runs" / "tiny-ckpt" / "checkpoint" / "weights.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it moved


def test_a_run_trained_without_export_is_exported_by_the_next_run_not_skipped(tmp_path, corpora):
    """`--no-export` then the same command: the finished run is exported (an old folder at the
    export path does not count as its export), and the card keeps the run's final loss."""
    from training.train import train

    recipe = _tiny_recipe(tmp_path, corpora, steps=4)
    trained = train(recipe, run_root=tmp_path / "runs", export_model=False)
    out = Path(recipe["export"]["dir"])
    out.mkdir(parents=True)
    (out / "README.md").write_text("a card left by an earlier run\n")

    again = train(recipe, run_root=tmp_path / "runs")
    assert (out / "model.safetensors").is_file()
    assert "a card left by an earlier run" not in (out / "README.md").read_text()
    assert again["final_loss_ema"] == trained["final_loss_ema"] is not None
    assert len(_losses(tmp_path / "runs" / "tiny-base")) == 4  # nothing was trained twice
    # and now it is done: a third run skips straight on
    assert train(recipe, run_root=tmp_path / "runs")["export"] == str(out)


# ----------------------------------------------------------------------------- scoring

def _direct_nll(model, ids: list[int]) -> float:
    """Total next-token loss in nats of one block, computed without training/metrics.py."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return -logp.gather(1, x[0, 1:, None]).sum().item()


def _small_byte_level_bpe(texts: list[str]):
    """A 300-odd-token byte-level BPE in GPT-2's format (trained here, in milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


# Characters that byte-level BPEs split over several tokens, each of which alone decodes to U+FFFD.
MIXED_TEXT = ["The café in Zoë's Straße sold 日本茶 for £5 🙂 to the party of the first part.",
              "Naïve dragons 🐉 guard the goods; the court held that ½ of them were lost."]


def _tiny_lm(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                      vocab_size=vocab_size, initializer_range=0.3)).eval()


@pytest.mark.parametrize("which", ["gpt2", "small-bpe"])
def test_bits_per_byte_is_loss_in_bits_over_the_bytes_of_the_predicted_text(which):
    """score_stream on one block: total NLL / ln 2 / UTF-8 bytes of what the predicted tokens
    decode to (<|endoftext|> counts no bytes but its loss counts), for GPT-2's 50,257-token BPE
    and for a 320-token byte-level BPE alike."""
    from training.metrics import perplexity, score_stream, token_byte_lengths

    tok = data.load_tokenizer() if which == "gpt2" else _small_byte_level_bpe(MIXED_TEXT * 20)
    stream = data.tokenize_pieces(MIXED_TEXT, tok)  # piece, <|endoftext|>, piece, <|endoftext|>
    assert len(stream) < 128
    model = _tiny_lm(len(tok))
    got = score_stream(model, stream, block_size=128, tokenizer=tok)  # one (short) block

    predicted = stream[1:].tolist()
    text = tok.decode(predicted, skip_special_tokens=True)
    assert "\ufffd" not in text and text.count("🙂") == 1
    n_bytes = len(text.encode("utf-8"))
    nll = _direct_nll(model, stream.tolist())
    assert got.tokens == len(predicted) and got.bytes == n_bytes
    assert got.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / len(predicted)), rel=1e-5)
    assert perplexity(model, stream, 128) == pytest.approx(got.perplexity, rel=1e-9)
    # the byte table counts the whole text once, whichever tokenizer cut it
    table = token_byte_lengths(tok)
    assert table[stream].sum() == len("".join(MIXED_TEXT).encode("utf-8"))
    assert table[tok.eos_token_id] == 0


def test_scoring_in_blocks_adds_up_block_by_block():
    """Several blocks (and a ragged tail dropped): the loss and the bytes are the sums over the
    blocks, each scored from its own start; perplexity() is the same loop's other number."""
    from training.metrics import perplexity, score_stream

    tok = data.load_tokenizer()
    stream = data.tokenize_pieces(["The party of the first part shall deliver the goods. " * 12,
                                   "We study problem seven and prove a bound. " * 8], tok)
    model = _tiny_lm(len(tok), seed=1)
    block = 16
    got = score_stream(model, stream, block, max_tokens=100, batch_size=2, tokenizer=tok)
    blocks = [stream[i:i + block].tolist() for i in range(0, 96, block)]  # 100 tokens -> 6 blocks
    nll = sum(_direct_nll(model, b) for b in blocks)
    n_bytes = sum(len(tok.decode(b[1:], skip_special_tokens=True).encode()) for b in blocks)
    assert (got.tokens, got.bytes) == (6 * (block - 1), n_bytes)
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert perplexity(model, stream, block, 100, 2) == pytest.approx(got.perplexity, rel=1e-9)
    assert score_stream(model, stream, block, 100, tokenizer=None).bits_per_byte is None


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_loads_an_adapter_through_the_engine_loader_and_reports_bits_per_byte(
        tmp_path, corpora, monkeypatch):
    """quill evaluate reads the registry with the server's schema and loads each model with the
    engine's loader (adapter merged, the tokenizer the engine serves it with); its bits per byte
    is that model's on the held-out text in that tokenizer's tokens, and the docs say which text."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from serve_app.config import load_registry
    from serve_app.engine import loader
    from tests.conftest import save_tiny_gpt2
    from training import evaluate as ev
    from training.export import export_adapter, registry_entry, update_registry
    from training.metrics import score_stream

    models = tmp_path / "models"
    save_tiny_gpt2(models / "tiny-base", n_positions=64)
    tok = data.load_tokenizer()
    lora = get_peft_model(GPT2LMHeadModel.from_pretrained(models / "tiny-base"),
                          LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, fan_in_fan_out=True,
                                     target_modules=["c_attn", "c_proj", "c_fc"]))
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0): make it count
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    export_adapter(lora, tok, models / "tiny-legal", "tiny-base", max_len=64)
    registry = models / "registry.yaml"
    update_registry(registry, registry_entry("tiny-base", "tiny-base", None, {}))
    update_registry(registry, registry_entry("tiny-legal", "tiny-base", "tiny-legal", {}))

    calls = []
    real_load_model = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a: calls.append(a[:2]) or real_load_model(*a))
    results = ev.evaluate(registry, None, ["legal", "abstracts"], max_tokens=256, block_size=32,
                          seed=0, corpora=corpora, cache_dir=tmp_path / "cache")
    entries = {e.name: e for e in load_registry(registry).models}
    assert calls == [(entries["tiny-base"].source, None),
                     (entries["tiny-base"].source, entries["tiny-legal"].adapter)]

    cpu = torch.device("cpu")  # in the dtype the entry resolves to here, as the server loads it
    served = real_load_model(entries["tiny-legal"].source, entries["tiny-legal"].adapter, cpu,
                             loader.resolve_dtype(entries["tiny-legal"].dtype, cpu))
    served_tok = loader.load_tokenizer(entries["tiny-legal"].source)
    val = data.genre_tokens("legal", "val", corpora, data.SplitSettings(), served_tok, tmp_path / "cache")
    want = score_stream(served, val, 32, 256, tokenizer=served_tok)
    assert results["bpb"]["tiny-legal"] == {"legal": pytest.approx(want.bits_per_byte, rel=1e-6)}
    assert results["ppl"]["tiny-legal"] == {"legal": pytest.approx(want.perplexity, rel=1e-6)}
    assert set(results["bpb"]["tiny-base"]) == {"legal", "abstracts"}
    assert results["bpb"]["tiny-base"]["legal"] != pytest.approx(want.bits_per_byte)  # merged in
    assert results["text"]["tiny-base"]["genres"]["legal"] == (want.tokens, want.bytes)
    assert [p for p, _ in results["samples"]["tiny-legal"]] == [ev.PROMPTS["legal"]] * 3
    assert results["defaults"]["tiny-legal"]["top_k"] == 40  # the registry entry's defaults
    # and the docs say in which dtype the numbers were taken (dtype: auto decides by CPU)
    served_dtype = str(loader.resolve_dtype(entries["tiny-legal"].dtype, cpu)).removeprefix("torch.")
    assert results["dtypes"]["tiny-legal"] == served_dtype
    assert f"weights in {served_dtype}" in ev.render(results, ["legal", "abstracts"], "quill evaluate", 256, 32)

    doc = ev.render(results, ["legal", "abstracts"], "quill evaluate ...", 256, 32)
    # What each is, from its registry entry and training run, not from its name's last word.
    assert results["what"]["tiny-legal"].startswith("LoRA adapter on ") and results["what"]["tiny-legal"].endswith(", legal corpus")
    assert not results["what"]["tiny-base"].startswith("LoRA") and f"| `tiny-base` | {results['what']['tiny-base']} |" in doc
    assert f"| legal | held-out split of `{corpora.resolve()}/legal` | {want.tokens:,} | {want.bytes:,} |" in doc
    assert f"| `tiny-legal` | **{want.bits_per_byte:.3f}** | - |" in doc
    assert "## Held-out perplexity and bits per byte" in doc
    assert "Registry defaults: max_tokens 48, temperature 0.8, top_k 40, top_p 0.95" in doc
    # each genre model's continuations, then the base's continuation of the same prompt
    samples = doc[doc.index("## Sample continuations"):]
    assert "### tiny-base" not in samples
    assert samples.index("`tiny-legal`:") < samples.index("`tiny-base`:")
    base_text = dict(results["samples"]["tiny-base"])[ev.PROMPTS["legal"]].strip()
    assert base_text.split("\n")[0] in samples


# ----------------------------------------------------------------------------- model card

def _card_summary(**extra) -> dict:
    return {"train_tokens": {"legal": 1000}, "val_tokens": {"legal": 50}, "steps": 3, "tokens": 96,
            "train_seconds": 6.0, "device": "cpu", "tokens_per_second": 16.0, "precision": "no",
            "params": 1000, "trainable_params": 100, "final_loss_ema": 5.0,
            "held_out_ppl": {"legal": 700.5}, **extra}


def test_model_card_shows_bits_per_byte_beside_perplexity_when_the_summary_has_it():
    from training.card import model_card
    from training.recipe import parse_recipe

    recipe = parse_recipe({"name": "tiny-legal", "method": "lora", "model": {"init": "models/tiny-base"},
                           "data": {"genres": ["legal"]}})
    recipe["_path"] = "training/recipes/tiny-legal.yaml"
    entry = {"name": "tiny-legal", "source": "tiny-base", "adapter": "tiny-legal"}

    old = model_card(recipe, _card_summary(base_held_out_ppl={"legal": 720.0}), entry)
    assert "| genre | tiny-legal | tiny-base alone |" in old and "| legal | 700.5 | 720.0 |" in old
    assert "bits" not in old  # a summary from before bits per byte renders as it did

    new = model_card(recipe, _card_summary(base_held_out_ppl={"legal": 720.0}, held_out_bpb={"legal": 2.345},
                                           base_held_out_bpb={"legal": 2.4}), entry)
    assert "## Held-out perplexity and bits per byte" in new
    assert ("| genre | tiny-legal | tiny-legal, bits/byte | tiny-base alone | tiny-base alone, bits/byte |"
            in new)
    assert "| legal | 700.5 | 2.345 | 720.0 | 2.4 |" in new

    base = model_card({**recipe, "method": "full"}, _card_summary(held_out_bpb={"legal": 2.345}), entry)
    assert "| genre | perplexity | bits per byte |" in base and "| legal | 700.5 | 2.345 |" in base


def test_a_wsd_schedule_holds_then_decays_and_extending_keeps_the_stable_part():
    from training.train import lr_at

    t = {"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 10, "steps": 100, "decay_steps": 20,
         "schedule": "wsd"}
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[9] == lrs[10] == lrs[79] == 1e-3  # warmed up, then held
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # then a strictly falling decay
    assert lrs[99] == pytest.approx(1e-4)  # to lr * min_lr_ratio at the last step
    longer = {**t, "steps": 300}
    assert [lr_at(s, longer) for s in range(80)] == lrs[:80]  # extending changes no earlier step


def test_extending_a_finished_wsd_run_matches_a_straight_longer_run(tmp_path, corpora):
    """A finished wsd run, its `steps` raised, goes on from the weights where its decay began,
    as if it had been the longer run all along: the decayed steps are replaced, not built on."""
    from safetensors.torch import load_file

    from training.train import train

    straight = _tiny_recipe(tmp_path / "a", corpora, steps=12, save_every=4, schedule="wsd", decay_steps=3)
    train(straight, run_root=tmp_path / "a" / "runs", export_model=False)

    short = _tiny_recipe(tmp_path / "b", corpora, steps=8, save_every=4, schedule="wsd", decay_steps=3)
    train(short, run_root=tmp_path / "b" / "runs", export_model=False)
    run = tmp_path / "b" / "runs" / "tiny-base"
    assert json.loads((run / "checkpoint-stable" / "state.json").read_text())["step"] == 5
    extended = _tiny_recipe(tmp_path / "b", corpora, steps=12, save_every=4, schedule="wsd", decay_steps=3)
    train(extended, run_root=tmp_path / "b" / "runs", export_model=False)

    wa = load_file(str(tmp_path / "a" / "runs" / "tiny-base" / "checkpoint" / "weights.safetensors"))
    wb = load_file(str(run / "checkpoint" / "weights.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert len(_losses(run)) == 12  # the log keeps steps 1-5, then the extension's 6-12


def test_a_wsd_recipe_without_a_decay_is_refused(tmp_path):
    from training.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="decay_steps"):
        parse_recipe({"name": "x", "train": {"steps": 100, "schedule": "wsd"}}, "training/recipes/x.yaml")


def test_a_tokenizer_larger_than_the_base_is_refused_before_training():
    """The recipe default is GPT-2's tokenizer (50,257 tokens); quill-base has 8,192 rows. Trained
    anyway, the first batch failed in torch.embedding with an IndexError."""
    from training.recipe import RecipeError
    from training.train import build_model

    recipe = _merge(DEFAULTS, {"name": "x", "method": "lora", "model": {"init": "models/quill-base"}})
    recipe["_path"] = "my-recipe.yaml"
    with pytest.raises(RecipeError, match="my-recipe.yaml: data.tokenizer: models/gpt2-tokenizer has 50257 tokens, "
                                          "more than the 8192 rows of model.init models/quill-base"):
        build_model(recipe, data.load_tokenizer())
