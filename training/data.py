"""Corpora -> clean text -> train / held-out split -> token ids -> fixed-size blocks.

The raw files under training/corpora/ are read-only inputs: nothing here writes to them.
Tokenised splits are cached under runs/cache/ (git-ignored) as plain .npy arrays, keyed by a
hash of the raw bytes and of every setting that changes the result, so a stale cache can't be
used by mistake.

Cleaning (clean_text) is deliberately conservative: the models should learn the voice of each
genre, not the typesetting of the scans it came from.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPORA_DIR = REPO_ROOT / "training" / "corpora"
TOKENIZER_DIR = REPO_ROOT / "models" / "gpt2-tokenizer"
CACHE_DIR = REPO_ROOT / "runs" / "cache"

GENRES = ("legal", "copywriting", "lyrics", "fantasy", "abstracts")

# Bump when clean_text / split_documents change behaviour, so cached token arrays are rebuilt.
CLEAN_VERSION = 1

# Several works inside one corpus file are joined by three blank lines (see SOURCES.md).
WORK_SEPARATOR = "\n\n\n\n"

# Typographic quotes -> ASCII: GPT-2's BPE has far better merges for ASCII quotes, and one
# spelling of a quote is easier for a small model to learn than two.
_CHAR_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u00b7": ".",  # "THE·PLIMPTON·PRESS" style middle dots in title pages
})
# Zero-width characters and the byte-order mark carry no text.
_INVISIBLE_RE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
# Lines that are only decoration: "*   *   *", "-----", "■", "=====".
_DECORATION_RE = re.compile(r"^[\s*\-=_~#■•○➢.]+$")
# Leftover e-text boilerplate that the collectors' cleaning may have missed.
_BOILERPLATE_RE = re.compile(
    r"project gutenberg|gutenberg\.org|pgdp|distributed proofread|transcriber'?s note|"
    r"^\s*\[(illustration|picture|music|decoration)[^\]]*\]\s*$",
    re.IGNORECASE,
)
# Gutenberg's _italics_ markup; the underscores are typography, not text.
_ITALICS_RE = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")


def clean_text(text: str) -> str:
    """Normalise one document: newlines, unicode, whitespace, and drop boilerplate lines.

    - CRLF / CR -> LF
    - unicode NFKC (non-breaking spaces, ligatures, full-width forms), curly quotes -> ASCII,
      zero-width characters and control characters removed (tabs become spaces)
    - trailing spaces stripped; centred title-page indentation removed; runs of spaces collapsed
    - decoration-only lines and e-text boilerplate lines dropped
    - more than one empty line in a row collapsed to one (paragraphs stay separated)
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE_RE.sub("", text.translate(_CHAR_MAP))
    text = text.replace("\t", " ")
    # Remaining C0/C1 control characters (form feeds, stray escapes) except the newline.
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc")

    lines = []
    for line in text.split("\n"):
        line = re.sub(r" {2,}", " ", line.strip())
        if line and (_DECORATION_RE.match(line) or _BOILERPLATE_RE.search(line)):
            continue
        lines.append(_ITALICS_RE.sub(r"\1", line))
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def corpus_files(genre: str, corpora_dir: Path = CORPORA_DIR) -> list[Path]:
    """A genre's corpus files (.txt, .jsonl) in a stable order; none when its folder is missing."""
    folder = Path(corpora_dir) / genre
    return sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".jsonl")) if folder.is_dir() else []


def read_documents(genre: str, corpora_dir: Path = CORPORA_DIR) -> list[str]:
    """All cleaned documents of one genre, in a stable order (file name, then position).

    .txt files hold works joined by WORK_SEPARATOR; .jsonl files hold one record per line with
    "title" and "abstract" fields (the arXiv abstracts).
    """
    files = corpus_files(genre, corpora_dir)
    if not files:
        raise FileNotFoundError(f"no .txt or .jsonl corpus files in {Path(corpora_dir) / genre}")
    docs: list[str] = []
    for path in files:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for line in raw.splitlines():
                if line.strip():
                    rec = json.loads(line)
                    docs.append(clean_text(f"{rec.get('title', '')}\n\n{rec.get('abstract', '')}"))
        else:
            raw = raw.replace("\r\n", "\n").replace("\r", "\n")
            docs.extend(clean_text(work) for work in raw.split(WORK_SEPARATOR))
    return [d for d in docs if d]


def _chunks(doc: str, chunk_chars: int) -> list[str]:
    """Cut a document at paragraph boundaries into pieces of about chunk_chars characters."""
    pieces, current, size = [], [], 0
    for para in doc.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def split_documents(docs: list[str], val_fraction: float = 0.05, chunk_chars: int = 4000,
                    ) -> tuple[list[str], list[str]]:
    """Split into (train, held-out) pieces.

    Each document is cut into ~chunk_chars pieces and a piece goes to the held-out split when a
    hash of its text falls under val_fraction. Hashing (not position) spreads the held-out text
    over every work in the genre, and keeps the split stable when files are added or reordered.
    A genre always gets at least one held-out piece.
    """
    train, val = [], []
    for doc in docs:
        for piece in _chunks(doc, chunk_chars):
            h = int.from_bytes(hashlib.sha256(piece.encode()).digest()[:8], "big") / 2**64
            (val if h < val_fraction else train).append(piece)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path | str = TOKENIZER_DIR):
    """A byte-level BPE in GPT-2's format from a folder (GPT-2's own, or models/quill-tokenizer).

    Loaded with from_pretrained on the folder: in transformers 5.x, passing
    vocab_file=/merges_file= to GPT2TokenizerFast silently yields a tokenizer that encodes
    everything to []. The round trip below makes any such failure loud instead of silent, and
    the id bound keeps token streams in uint16. Cached: building a BPE takes seconds.
    """
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(path))
    ids = tok("Hello world")["input_ids"]
    if not ids or tok.decode(ids) != "Hello world" or tok.eos_token_id is None:
        raise RuntimeError(f"tokenizer at {path} is broken: 'Hello world' -> {ids}")
    if len(tok) > 65536:
        raise RuntimeError(f"tokenizer at {path} has {len(tok)} tokens; token streams are uint16")
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer's output, for cache keys: its vocabulary and merges."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def tokenize_pieces(pieces: list[str], tokenizer) -> np.ndarray:
    """One flat uint16 stream: each piece's ids followed by <|endoftext|> (so the model learns
    where a text ends, and no block pretends two unrelated texts are one)."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for start in range(0, len(pieces), 256):  # batches keep the fast tokenizer busy, memory flat
        for ids in tokenizer(pieces[start:start + 256])["input_ids"]:
            out.extend(ids)
            out.append(eos)
    return np.asarray(out, dtype=np.uint16)  # load_tokenizer checks the vocabulary fits


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Reshape a token stream into [n_blocks, block_size]; the ragged tail is dropped."""
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


@dataclass(frozen=True)
class SplitSettings:
    val_fraction: float = 0.05
    chunk_chars: int = 4000


def _cache_key(genre: str, corpora_dir: Path, settings: SplitSettings, tokenizer) -> str:
    h = hashlib.sha256(f"v{CLEAN_VERSION}|{settings}|{genre}|{tokenizer_fingerprint(tokenizer)}".encode())
    for path in sorted((Path(corpora_dir) / genre).iterdir()):
        if path.suffix in (".txt", ".jsonl"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def genre_tokens(genre: str, split: str, corpora_dir: Path = CORPORA_DIR,
                 settings: SplitSettings = SplitSettings(), tokenizer=None,
                 cache_dir: Path | None = CACHE_DIR) -> np.ndarray:
    """The token stream of one genre's "train" or "val" split (cached as .npy under runs/cache)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    tokenizer = tokenizer or load_tokenizer()
    key = _cache_key(genre, corpora_dir, settings, tokenizer)
    if cache_dir is not None:
        cached = Path(cache_dir) / f"{genre}-{split}-{key}.npy"
        if cached.exists():
            return np.load(cached, allow_pickle=False)
    train, val = split_documents(read_documents(genre, corpora_dir), settings.val_fraction,
                                 settings.chunk_chars)
    streams = {"train": tokenize_pieces(train, tokenizer), "val": tokenize_pieces(val, tokenizer)}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for name, arr in streams.items():
            tmp = Path(cache_dir) / f"{genre}-{name}-{key}.tmp.npy"
            np.save(tmp, arr, allow_pickle=False)
            tmp.replace(Path(cache_dir) / f"{genre}-{name}-{key}.npy")  # atomic: no half files
    return streams[split]


def main(argv: list[str] | None = None) -> int:
    """`quill data`: build the cached, tokenized splits and print their sizes. With --recipe, those
    of that recipe's data section (tokenizer, corpora, cache, split), which `quill train` then reads."""
    import argparse
    import sys

    from training.recipe import RecipeError, load_recipe, parse_recipe, repo_path

    ap = argparse.ArgumentParser(prog="quill data", description=main.__doc__)
    ap.add_argument("--recipe", help="a training recipe (training/recipes/<name>.yaml): its data section")
    ap.add_argument("--genres", nargs="*", default=None, choices=GENRES, help="default: the recipe's, or all five")
    args = ap.parse_args(argv)
    try:  # a recipe's defaults where none is named: GPT-2's tokenizer, training/corpora, runs/cache
        d = (load_recipe(args.recipe if Path(args.recipe).exists() else repo_path(args.recipe)) if args.recipe
             else parse_recipe({"name": "defaults"}, "<defaults>"))["data"]
    except RecipeError as exc:
        print("\n".join(f"quill data: {problem}" for problem in exc.problems), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"quill data: {args.recipe}: cannot be read ({exc.strerror or exc})", file=sys.stderr)
        return 2
    tok = load_tokenizer(repo_path(d["tokenizer"]))
    corpora, cache = repo_path(d["corpora_dir"]), repo_path(d["cache_dir"])
    settings = SplitSettings(d["val_fraction"], d["chunk_chars"])
    print(f"tokenizer {d['tokenizer']} ({len(tok)} tokens); corpora {corpora}; cache {cache}")
    for g in args.genres or d["genres"]:
        tr, va = (genre_tokens(g, split, corpora, settings, tok, cache) for split in ("train", "val"))
        print(f"{g:12s} train {len(tr):>9,d} tokens   held-out {len(va):>7,d} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
