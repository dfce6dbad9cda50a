"""Text files -> tokenizer, and text files -> token shards.

Shard format ("chatforge-shards/1"), read by data/loader.py:
    OUT/train.bin, OUT/val.bin   flat token ids (numpy tofile), uint16 when the vocabulary fits, else
                                 uint32; every document is followed by the tokenizer's <|endoftext|>
    OUT/meta.json                {"format", "dtype", "vocab_size", "eos_id", "tokenizer", "splits":
                                  {"train"|"val": {"tokens", "documents", "bytes"}}, "inputs", "seconds"}
    OUT/tokenizer.json (+ tokenizer_config.json)   a copy, so OUT describes itself
"bytes" counts the UTF-8 bytes of the documents, so validation loss converts to bits per byte.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..config import save_json
from ..tokenizer import Tokenizer, train_tokenizer
from .text import expand_inputs, iter_documents

FORMAT = "chatforge-shards/1"


def _progress(msg: str) -> None:
    print("\r" + msg, end="", file=sys.stderr, flush=True)


def train_tokenizer_on_files(inputs: Iterable[str], vocab_size: int, out: str | Path, max_chars: int = 0) -> Tokenizer:
    """Train chatforge's byte-level BPE on documents from files/folders and save it to `out`."""
    files = expand_inputs(inputs)
    t0 = time.time()
    seen = {"chars": 0, "docs": 0}

    def texts():
        for doc in iter_documents(files, max_chars=max_chars):
            seen["chars"] += len(doc)
            seen["docs"] += 1
            if seen["docs"] % 2000 == 0:
                _progress(f"tokenizer: read {seen['docs']:,} documents, {seen['chars'] / 1e6:.1f}M chars")
            yield doc

    tok = train_tokenizer(texts(), vocab_size)
    if seen["docs"] == 0:
        raise ValueError(f"no text found in {', '.join(map(str, files))}")
    tok.save(out)
    sample = "".join(doc for _, doc in zip(range(200), iter_documents(files)))[:200_000]
    bpt = len(sample.encode("utf-8")) / max(1, len(tok.encode(sample)))
    print(
        f"\ntokenizer: {tok.vocab_size} tokens from {seen['docs']:,} documents ({seen['chars'] / 1e6:.1f}M chars) "
        f"in {time.time() - t0:.1f}s; {bpt:.2f} bytes/token on a sample; saved to {out}",
        file=sys.stderr,
    )
    return tok


def prepare(
    inputs: Iterable[str],
    tokenizer_dir: str | Path,
    out: str | Path,
    val_fraction: float = 0.005,
    seed: int = 0,
    batch_docs: int = 256,
) -> dict:
    """Tokenize documents into train/val shards (streaming; memory bounded by one batch)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    files = expand_inputs(inputs)
    tok = Tokenizer.load(tokenizer_dir)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f"{s}.bin.tmp" for s in ("train", "val")}
    handles = {s: open(p, "wb") for s, p in tmp.items()}
    stats = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
    rng = np.random.default_rng(seed)
    eos = tok.eos_id
    t0 = time.time()
    n_docs = 0

    def flush(batch: list[str]) -> None:
        nonlocal n_docs
        # The split decision depends only on the seed and the document's index: deterministic.
        coins = rng.random(len(batch))
        for doc, ids, coin in zip(batch, tok.encode_batch(batch), coins):
            split = "val" if (coin < val_fraction or n_docs == 0) else "train"
            arr = np.asarray(ids + [eos], dtype=dtype)
            arr.tofile(handles[split])
            stats[split]["tokens"] += arr.size
            stats[split]["documents"] += 1
            stats[split]["bytes"] += len(doc.encode("utf-8"))
            n_docs += 1
        mb = (stats["train"]["bytes"] + stats["val"]["bytes"]) / 1e6
        _progress(f"prepare: {n_docs:,} documents, {mb:.1f} MB, {mb / max(1e-9, time.time() - t0):.2f} MB/s")

    try:
        batch: list[str] = []
        for doc in iter_documents(files):
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        for h in handles.values():
            h.close()
    if n_docs == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise ValueError(f"no documents found in {', '.join(map(str, files))}")
    for split, p in tmp.items():
        os.replace(p, out / f"{split}.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eos_id": eos,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "splits": stats,
        "inputs": [str(f) for f in files],
        "seconds": round(time.time() - t0, 2),
    }
    save_json(meta, out / "meta.json")
    total_tokens = stats["train"]["tokens"] + stats["val"]["tokens"]
    total_bytes = stats["train"]["bytes"] + stats["val"]["bytes"]
    print(
        f"\nprepare: {n_docs:,} documents -> {total_tokens:,} tokens "
        f"(train {stats['train']['tokens']:,}, val {stats['val']['tokens']:,}), "
        f"{total_bytes / max(1, total_tokens):.2f} bytes/token, {meta['seconds']:.1f}s -> {out}",
        file=sys.stderr,
    )
    return meta
