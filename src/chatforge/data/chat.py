"""SFT conversations: read and validate them, tokenize them through the one chat template, and
batch them as packed or padded rows.

Inputs (files or folders, mixed freely):
- JSON Lines, one object per line: {"messages": [{"role": "system"|"user"|"assistant",
  "content": "..."}, ...]} or {"prompt": ..., "completion": ...} (a string each, or lists of
  messages as in TRL's conversational prompt-completion form). Other keys (e.g. "metadata")
  are carried along untouched.
- Parquet files with a "messages" column or "prompt" + "completion" columns.
- A Hugging Face `datasets` folder written by `save_to_disk` (state.json + *.arrow); the arrow
  files are read with pyarrow, so `datasets` itself is not needed. A DatasetDict folder reads
  its "train" split (point at DIR/<split> for another).
A bad record is a ValueError naming the file and line (row for parquet/arrow); nothing is skipped.

Tokenization is only `Tokenizer.render(messages)`: ids, and a loss mask that is 1 on assistant
content and the end-of-turn token closing it. A conversation of n tokens gives n-1 (input,
target) positions; targets whose token is not in the mask are -100.

Rows: with packing, several conversations share a row, each with position ids restarting at 0
and a block-diagonal causal attention mask, so a packed conversation sees exactly what it would
see alone. Without packing, a row holds one conversation, right-padded; padding sits after
every real token, so plain causal attention needs no mask.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..tokenizer import Tokenizer, check_messages
from .loader import rank_batches
from .text import expand_inputs, jsonl_values

SUFFIXES = (".jsonl", ".parquet")


@dataclass
class Conversation:
    messages: list[dict]  # validated {"role", "content"} dicts
    source: str  # "file: line N" (or "row N"), for error messages and reports
    meta: dict = field(default_factory=dict)  # the record's "metadata" object, if any


# ---- reading --------------------------------------------------------------------------------


def _as_messages(value: object, role: str, where: str) -> list[dict]:
    """A prompt/completion value: a string becomes one message of `role`; a list is messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, where)
    raise ValueError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def record_to_conversation(obj: object, where: str) -> Conversation:
    """Validate one record ({"messages"} or {"prompt", "completion"}); `where` names file and line."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = check_messages(obj["messages"], f"{where}: messages")
    elif "prompt" in obj and "completion" in obj:
        messages = _as_messages(obj["prompt"], "user", f"{where}: prompt") + _as_messages(
            obj["completion"], "assistant", f"{where}: completion"
        )
    else:
        raise ValueError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' fields, got keys {sorted(obj)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn from; add an assistant message")
    # Keep only role and content: HF datasets pad message structs with extra None fields.
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    meta = obj.get("metadata")
    return Conversation(messages, where, meta if isinstance(meta, dict) else {})


def read_jsonl(path: Path) -> Iterator[Conversation]:
    for lineno, obj in jsonl_values(path):
        yield record_to_conversation(obj, f"{path}: line {lineno}")


def _read_table_rows(path: Path, batches: Iterable) -> Iterator[Conversation]:
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            row += 1
            yield record_to_conversation(obj, f"{path}: row {row}")


def read_parquet(path: Path) -> Iterator[Conversation]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    yield from _read_table_rows(path, pf.iter_batches(batch_size=1024))


def read_hf_dataset(directory: Path) -> Iterator[Conversation]:
    """A `datasets.save_to_disk` folder: state.json lists arrow files in the IPC stream format."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise ValueError(f"{directory}: a DatasetDict without a 'train' split; pass one of {[str(directory / s) for s in splits]}")
        directory = directory / "train"
    state = json.loads((directory / "state.json").read_text())
    for entry in state.get("_data_files", []):
        path = directory / entry["filename"]
        try:
            with pa.memory_map(str(path)) as src:
                table = pa.ipc.open_stream(src).read_all()
        except Exception as e:
            raise ValueError(f"{path}: not a readable arrow file ({e})") from None
        yield from _read_table_rows(path, table.to_batches(max_chunksize=1024))


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def expand_chat_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files and HF dataset folders named directly, plus every .jsonl/.parquet under other folders."""
    return expand_inputs(inputs, SUFFIXES, whole=is_hf_dataset, what="conversation")


def read_conversations(inputs: Iterable[str | Path]) -> list[Conversation]:
    """Every conversation of every input, validated, in order."""
    out: list[Conversation] = []
    for p in expand_chat_inputs(inputs):
        if p.is_dir():
            out += read_hf_dataset(p)
        elif p.suffix == ".parquet":
            out += read_parquet(p)
        else:
            out += read_jsonl(p)
    if not out:
        raise ValueError(f"no conversations in {', '.join(map(str, inputs))}")
    return out


# ---- tokenizing -----------------------------------------------------------------------------


@dataclass
class Tokenized:
    """Conversations as token ids (int32) and loss masks (bool), truncated to `max_tokens`."""

    ids: list[np.ndarray]
    mask: list[np.ndarray]
    truncated: int = 0  # conversations cut at max_tokens
    dropped: int = 0  # conversations with no assistant token left after the cut (not used)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def target_tokens(self) -> int:
        return int(sum(m[1:].sum() for m in self.mask))

    @property
    def tokens(self) -> int:
        return int(sum(len(i) for i in self.ids))


def tokenize(convs: list[Conversation], tok: Tokenizer, max_tokens: int) -> Tokenized:
    """render() each conversation; keep the first `max_tokens` tokens of a longer one (its later
    turns are lost and counted as truncated); a conversation whose cut leaves no assistant
    token to learn from is counted as dropped."""
    ids_out, mask_out = [], []
    truncated = dropped = 0
    for c in convs:
        ids, mask = tok.render(c.messages)
        if len(ids) > max_tokens:
            truncated += 1
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        ids_out.append(np.asarray(ids, dtype=np.int32))
        mask_out.append(np.asarray(mask, dtype=bool))
    return Tokenized(ids_out, mask_out, truncated, dropped)


# ---- rows and batches -----------------------------------------------------------------------


def pack_rows(lengths: list[int], order: list[int], row_len: int, pack: bool) -> list[list[int]]:
    """Group conversations (by index, in `order`) into rows of at most `row_len` positions, where
    a conversation of n tokens takes n-1 positions. Without packing, one conversation per row."""
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i] - 1
        assert 0 < n <= row_len, (n, row_len)
        if used + n > row_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def collate(data: Tokenized, rows: list[list[int]], pack: bool, pad_to: int = 0) -> tuple[torch.Tensor, ...]:
    """Tensors for a list of rows: x, y (-100 = no loss), and for packed rows the position ids
    (B,T) and the block-diagonal causal attention mask (B,1,T,T), True = may attend.
    Rows are as long as the longest one in the batch, or `pad_to` (one shape for every batch:
    a compiled step then never recompiles)."""
    B = len(rows)
    T = max(max(sum(len(data.ids[i]) - 1 for i in r) for r in rows), pad_to)
    x = np.zeros((B, T), dtype=np.int64)
    y = np.full((B, T), -100, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)  # which conversation of the row a position belongs to
    for b, r in enumerate(rows):
        at = 0
        for k, i in enumerate(r):
            ids, m = data.ids[i], data.mask[i]
            n = len(ids) - 1
            x[b, at : at + n] = ids[:-1]
            y[b, at : at + n] = np.where(m[1:], ids[1:], -100)
            pos[b, at : at + n] = np.arange(n)
            seg[b, at : at + n] = k
            at += n
        # Trailing padding forms its own segment: it attends only to itself (no all-masked
        # softmax rows, which would be NaN) and nothing real attends to it.
        seg[b, at:] = len(r)
        pos[b, at:] = np.arange(T - at)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if not pack:
        return xt, yt
    s = torch.from_numpy(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (s[:, :, None] == s[:, None, :]) & causal
    return xt, yt, torch.from_numpy(pos), mask[:, None]


class ChatBatches:
    """Training batches of SFT rows for step `step`, micro-step `micro`, on `rank` of `world`.

    Like data/loader.TrainBatches, the data position is a function of the step only: epoch e
    shuffles the conversations with seed (seed, e) and packs them; the global batch of a step
    is the next `micro_batch*accum*world` rows of that endless stream, dealt to micro-steps and
    ranks the same way as pretraining batches. Exact resume needs the step number and nothing else.
    """

    def __init__(self, data: Tokenized, row_len: int, pack: bool, micro_batch: int, accum: int, seed: int, rank: int = 0, world: int = 1):
        if len(data) == 0:
            raise ValueError("no conversations to train on")
        self.data, self.row_len, self.pack = data, row_len, pack
        self.B, self.accum, self.seed, self.rank, self.world = micro_batch, accum, seed, rank, world
        self.lengths = [len(i) for i in data.ids]
        self._rows: dict[int, list[list[int]]] = {}  # the most recent epochs' rows
        self._counts: list[int] = []  # rows in epoch 0, 1, ... as far as computed

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows:
            order = list(range(len(self.data)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            if len(self._rows) >= 2:
                self._rows.pop(min(self._rows))
            self._rows[epoch] = pack_rows(self.lengths, order, self.row_len, self.pack)
        return self._rows[epoch]

    @property
    def rows_per_step(self) -> int:
        return self.B * self.accum * self.world

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def _global_row(self, g: int) -> list[int]:
        # Epochs can differ by a row or two (packing depends on the order): count them once.
        epoch = 0
        while True:
            if epoch == len(self._counts):
                self._counts.append(len(self.epoch_rows(epoch)))
            if g < self._counts[epoch]:
                return self.epoch_rows(epoch)[g]
            g -= self._counts[epoch]
            epoch += 1

    def rows(self, step: int, micro: int) -> list[list[int]]:
        first = step * self.rows_per_step + (micro * self.world + self.rank) * self.B
        return [self._global_row(first + j) for j in range(self.B)]

    def get(self, step: int, micro: int, pad_to: int = 0) -> tuple[torch.Tensor, ...]:
        """(x, y) padded rows, or (x, y, pos, mask) packed rows (see collate)."""
        return collate(self.data, self.rows(step, micro), self.pack, pad_to)

    def positions(self, step: int, micro: int) -> int:
        """Real (not padding) input positions of a micro-batch: what throughput counts."""
        return sum(self.lengths[i] - 1 for r in self.rows(step, micro) for i in r)


def val_batches(data: Tokenized, row_len: int, pack: bool, batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
    """Validation rows in file order (the same every time), dealt round-robin to ranks, as many
    batches on each (loader.rank_batches: a sharded model's forward needs every rank): a stand-in
    batch has every target -100, so it adds no loss and no tokens."""
    rows = pack_rows([len(i) for i in data.ids], list(range(len(data))), row_len, pack)
    for idx, counts in rank_batches(len(rows), batch, rank, world):
        x, y, *rest = collate(data, [rows[i] for i in idx], pack)
        yield x, (y if counts else torch.full_like(y, -100)), *rest
