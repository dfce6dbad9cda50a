"""Text files -> tokenizer, and text files -> token shards.

Shard format ("chatforge-shards/1"), read by data/loader.py:
    OUT/train.bin, OUT/val.bin   flat token ids (numpy tofile), uint16 when the vocabulary fits, else
                                 uint32; every document is followed by the tokenizer's <|endoftext|>
    OUT/meta.json                {"format", "dtype", "vocab_size", "eos_id", "tokenizer", "splits":
                                  {"train"|"val": {"tokens", "documents", "bytes"}}, "inputs", "seconds"}
    OUT/tokenizer.json (+ tokenizer_config.json)   a copy, so OUT describes itself
"bytes" counts the UTF-8 bytes of the documents, so validation loss converts to bits per byte.

The train/val split is by document, from a seeded hash of the document's text: the same text
always lands in the same split whatever its position, so duplicated documents never straddle the
split and adding files does not reshuffle the held-out set. The first document always goes to val,
so a small corpus still has a validation split.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..config import save_json
from ..console import StatusLine
from ..tokenizer import Tokenizer, train_tokenizer
from .text import expand_inputs, iter_documents

FORMAT = "chatforge-shards/1"


def shard_dtype(vocab_size: int) -> type:
    """The smallest unsigned dtype that holds every token id."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def in_val(text_bytes: bytes, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: a uniform number from a hash of (seed, text) < val_fraction."""
    h = hashlib.blake2b(text_bytes, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


def sample_documents(files: list[Path], max_chars: int, seed: int = 0) -> Iterator[str]:
    """Documents for tokenizer training: all of them when `max_chars` is 0; otherwise each document
    kept with probability max_chars / (total characters, counted in a first streaming pass), so the
    sample spans every file in proportion to its size. (The first `max_chars` characters would be
    the first files only: the English half of the default corpus, and no Chinese merges.)"""
    if not max_chars:
        yield from iter_documents(files)
        return
    total = sum(len(doc) for doc in iter_documents(files))
    keep = max_chars / max(1, total)
    rng = random.Random(seed)
    taken = 0
    for doc in iter_documents(files):
        if keep >= 1.0 or rng.random() < keep:
            yield doc
            taken += len(doc)
            if taken >= max_chars:
                return


def bytes_per_token(tok: Tokenizer, files: list[Path], chars_per_file: int = 50_000) -> dict[str, float]:
    """UTF-8 bytes per token on the first `chars_per_file` characters of each file, and "all"."""
    out, all_bytes, all_tokens = {}, 0, 0
    for f in files:
        sample = ""
        for doc in iter_documents([f]):
            sample += doc + "\n"
            if len(sample) >= chars_per_file:
                break
        n_bytes, n_tokens = len(sample.encode("utf-8")), len(tok.encode(sample))
        out[str(f)] = n_bytes / max(1, n_tokens)
        all_bytes, all_tokens = all_bytes + n_bytes, all_tokens + n_tokens
    out["all"] = all_bytes / max(1, all_tokens)
    return out


def train_tokenizer_on_files(
    inputs: Iterable[str], vocab_size: int, out: str | Path, max_chars: int = 0, seed: int = 0
) -> Tokenizer:
    """Train chatforge's byte-level BPE on documents from files/folders (a `max_chars` sample of
    them if > 0, see sample_documents) and save it to `out`."""
    files = expand_inputs(inputs)
    t0 = time.time()
    seen = {"chars": 0, "docs": 0}
    status = StatusLine()
    if max_chars:
        print(f"tokenizer: counting characters to sample {max_chars / 1e6:.1f}M of them evenly", file=sys.stderr)

    def texts() -> Iterator[str]:
        for doc in sample_documents(files, max_chars, seed):
            seen["chars"] += len(doc)
            seen["docs"] += 1
            if seen["docs"] % 2000 == 0:
                status.update(f"tokenizer: read {seen['docs']:,} documents, {seen['chars'] / 1e6:.1f}M chars")
            yield doc
        status.done(f"tokenizer: read {seen['docs']:,} documents, {seen['chars'] / 1e6:.1f}M chars; merging ...")

    tok = train_tokenizer(texts(), vocab_size)
    if seen["docs"] == 0:
        raise ValueError(f"no text found in {', '.join(map(str, files))} (all documents are empty)")
    seconds = time.time() - t0
    tok.save(out)
    bpt = bytes_per_token(tok, files)
    print(
        f"tokenizer: {tok.vocab_size} tokens from {seen['docs']:,} documents ({seen['chars'] / 1e6:.1f}M chars) "
        f"in {seconds:.1f}s; {bpt.pop('all'):.2f} bytes/token on a sample; saved to {out}",
        file=sys.stderr,
    )
    if tok.vocab_size < vocab_size:
        print(
            f"tokenizer: note: the text allowed only {tok.vocab_size} of the {vocab_size} tokens asked for "
            "(no pair left that occurs twice); more or more varied text gives the full vocabulary",
            file=sys.stderr,
        )
    if len(bpt) > 1:
        for f, v in bpt.items():
            print(f"tokenizer:   {v:5.2f} bytes/token  {f}", file=sys.stderr)
    return tok


def prepare(
    inputs: Iterable[str],
    tokenizer_dir: str | Path,
    out: str | Path,
    val_fraction: float = 0.005,
    seed: int = 0,
    batch_docs: int = 4096,
    batch_chars: int = 1_000_000,
) -> dict:
    """Tokenize documents into train/val shards, streaming: memory is bounded by one batch of at
    most `batch_docs` documents / `batch_chars` characters (batches must be large enough for the
    tokenizer's threads to pay off on corpora of short documents such as poems)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    files = expand_inputs(inputs)
    tok = Tokenizer.load(tokenizer_dir)
    dtype = shard_dtype(tok.vocab_size)
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f"{s}.bin.tmp" for s in ("train", "val")}
    stats = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
    eos = tok.eos_id
    t0 = last_report = time.time()
    n_docs = 0
    status = StatusLine()

    def write_batch(batch: list[str], handles: dict) -> None:
        nonlocal n_docs, last_report
        for doc, ids in zip(batch, tok.encode_batch(batch)):
            raw = doc.encode("utf-8")
            split = "val" if (n_docs == 0 or in_val(raw, seed, val_fraction)) else "train"
            arr = np.asarray(ids + [eos], dtype=dtype)
            arr.tofile(handles[split])
            stats[split]["tokens"] += arr.size
            stats[split]["documents"] += 1
            stats[split]["bytes"] += len(raw)
            n_docs += 1
        if time.time() - last_report > 0.5:
            last_report = time.time()
            mb = (stats["train"]["bytes"] + stats["val"]["bytes"]) / 1e6
            status.update(f"prepare: {n_docs:,} documents, {mb:.1f} MB, {mb / max(1e-9, last_report - t0):.2f} MB/s")

    try:
        with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
            handles = {"train": f_train, "val": f_val}
            batch: list[str] = []
            chars = 0
            for doc in iter_documents(files):
                batch.append(doc)
                chars += len(doc)
                if len(batch) >= batch_docs or chars >= batch_chars:
                    write_batch(batch, handles)
                    batch, chars = [], 0
            if batch:
                write_batch(batch, handles)
        if n_docs == 0:
            raise ValueError(f"no documents found in {', '.join(map(str, files))} (all files are empty)")
        if stats["train"]["documents"] == 0:
            raise ValueError(
                f"all {n_docs} documents went to the validation split; give more documents or a smaller --val-fraction"
            )
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # refused input leaves no empty shards folder that looks prepared
            out.rmdir()
        raise
    # meta.json goes first and comes back last: a crash in between leaves a folder the loader refuses.
    (out / "meta.json").unlink(missing_ok=True)
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
        "inputs": [str(f.resolve()) for f in files],
        "seconds": round(time.time() - t0, 2),
    }
    save_json(meta, out / "meta.json")
    total_tokens = stats["train"]["tokens"] + stats["val"]["tokens"]
    total_bytes = stats["train"]["bytes"] + stats["val"]["bytes"]
    status.done()
    print(
        f"prepare: {n_docs:,} documents -> {total_tokens:,} tokens "
        f"(train {stats['train']['tokens']:,}, val {stats['val']['tokens']:,}), "
        f"{total_bytes / max(1, total_tokens):.2f} bytes/token, {meta['seconds']:.1f}s -> {out}",
        file=sys.stderr,
    )
    return meta
