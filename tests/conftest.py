"""Shared fixtures: a throwaway bilingual tokenizer, token shards and tiny models, built in-test."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import load_file

from chatforge.tokenizer import train_tokenizer
from store_backends import BACKENDS, database_url

EN = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Python is a programming language that lets you work quickly.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
]
ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"]


def corpus_docs(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        parts = [rng.choice(EN + ZH) for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(parts) + f" {rng.randint(0, 999)}")
    return docs


def run_killed(monkeypatch, owner, name: str, call: int, run: Callable[[], object]) -> None:
    """Run `run()` with `owner.name` raising KeyboardInterrupt on its `call`-th call (the process
    killed mid-run, e.g. a few steps after a checkpoint), then put the real function back."""
    real = getattr(owner, name)
    calls = 0

    def dying(*a, **k):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, name, dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(owner, name, real)


def run_chatforge(args: list[str], nproc: int = 1, timeout: float = 300, entry: list[str] | None = None) -> subprocess.CompletedProcess:
    """`chatforge ARGS` (or the script `entry`) in one process, or in `nproc` processes under
    torchrun (gloo, one thread each), as a finished process with its output. Past `timeout` the
    test fails instead of waiting on a hang (ranks stuck in mismatched collectives): the launcher
    gets SIGTERM, on which torchrun stops its workers (they run in sessions of their own, out of
    reach of a kill of the launcher's group). Output goes through files, which workers still
    holding them open cannot block the way a pipe's EOF would."""
    entry = entry or ["-m", "chatforge"]
    cmd = [sys.executable, *entry, *args]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "--master_addr=127.0.0.1",
               *entry, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=err, text=True)
        try:
            p.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    if hung:
        pytest.fail(f"`chatforge {' '.join(args[:1])}` in {nproc} processes still running after {timeout:.0f}s (hung?):\n{r.stderr[-3000:]}")
    return r


def assert_close_weights(a: Path, b: Path, file: str = "model.safetensors") -> None:
    """Every tensor of checkpoint folder a's model.safetensors (or another `file`, such as
    extra.safetensors) matches b's, and b has no other, to multi-process tolerance (summation
    order differs between process counts)."""
    wa, wb = load_file(str(a / file)), load_file(str(b / file))
    assert wa.keys() == wb.keys(), f"{file}: {sorted(wa)} vs {sorted(wb)}"
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(iter(corpus_docs()), vocab_size=512)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tok):
    """Token shards of a small bilingual corpus, made by the real `prepare`."""
    from chatforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("shards")
    tok.save(root / "tok")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in corpus_docs(400, seed=1):
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    prepare([str(root / "corpus.jsonl")], root / "tok", root / "shards", val_fraction=0.1, seed=0)
    return root / "shards"


@pytest.fixture(autouse=True)
def _threads():
    # Keep tests deterministic and polite on a 2-core machine.
    torch.set_num_threads(2)
    yield


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> Iterator[str]:
    """An empty store database on each backend."""
    with database_url(request.param, tmp_path) as url:
        yield url
