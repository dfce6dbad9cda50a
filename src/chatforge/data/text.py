"""Streaming document readers for pretraining text: .txt, .jsonl ("text"), .parquet ("text"), folders.

A .txt file is one document. A .jsonl line is one document. A parquet row is one document.
Folders are walked recursively in sorted order, taking the three suffixes above.
Nothing is read whole into memory except a single .txt document; bad input is a ValueError that
names the file and the line (JSONL) or the byte offset (invalid UTF-8).

Also the one script detector (`script_lang`: Chinese or English by the share of Han characters),
used by the prompt builders, the gold labeler and the answer verifiers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

SUFFIXES = (".txt", ".jsonl", ".parquet")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # Han characters (CJK unified ideographs, ext. A, compatibility)


def script_lang(text: str) -> str | None:
    """"zh" when at least 30% of the letters are Han characters, "en" otherwise, None for text
    without letters (a bare number is in either language)."""
    han = len(CJK.findall(text))
    letters = sum(1 for ch in text if ch.isalpha())
    if not letters:
        return None
    return "zh" if han / letters >= 0.3 else "en"


def expand_inputs(inputs: Iterable[str | Path], suffixes: tuple[str, ...] = SUFFIXES, whole=None, what: str = "input") -> list[Path]:
    """Files named directly, plus every file with one of `suffixes` under named folders (sorted).
    A folder for which `whole(folder)` is true counts as one input (a `datasets` save_to_disk folder)."""
    also = " or a `datasets` folder" if whole else ""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if whole is not None and whole(p):
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise ValueError(f"{p}: folder holds no {'/'.join(suffixes)} files" + (" and is not a `datasets` save_to_disk folder" if whole else ""))
            files += found
        elif p.is_file():
            if p.suffix not in suffixes:
                raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use one of {suffixes}{also}")
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"no {what} files given")
    return files


def _decode(data: bytes, path: Path, base_offset: int = 0, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"line {line}, " if line is not None else ""
        raise ValueError(
            f"{path}: {where}invalid UTF-8 at byte offset {base_offset + e.start}; re-encode the file as UTF-8"
        ) from None


def read_txt(path: Path) -> Iterator[str]:
    yield _decode(path.read_bytes(), path)


def jsonl_values(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line; invalid UTF-8 or JSON is a ValueError
    naming the line."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, offset, lineno)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield lineno, obj


def read_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    for lineno, obj in jsonl_values(path):
        if not isinstance(obj, dict) or field not in obj:
            raise ValueError(f"{path}: line {lineno}: expected an object with a {field!r} field")
        text = obj[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {lineno}: field {field!r} must be a string, got {type(text).__name__}")
        yield text


def read_parquet(path: Path, column: str = "text", batch_rows: int = 1024) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no {column!r} column (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise ValueError(f"{path}: row {row}: {column!r} must be a string, got {type(value).__name__}")
            yield value


def read_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        return read_txt(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".parquet":
        return read_parquet(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}")


def iter_documents(inputs: Iterable[str | Path], max_chars: int = 0) -> Iterator[str]:
    """Every non-empty document of every input, in order; stop after `max_chars` characters if > 0."""
    total = 0
    for path in expand_inputs(inputs):
        for doc in read_documents(path):
            if not doc:
                continue
            yield doc
            total += len(doc)
            if max_chars and total >= max_chars:
                return
