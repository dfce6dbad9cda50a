"""Shared pieces of the server tests: a tiny checkpoint and a live uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from chatforge import checkpoint
from chatforge.model import GPT, GPTConfig


def make_tiny_checkpoint(tok, path: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama-style model with the test tokenizer, saved as a real checkpoint."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=128, block="llama")
    m = GPT(cfg)
    m.init_weights(seed)
    return checkpoint.save(path, m, tok, {"stage": "test"})


def free_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class LiveServer:
    """`chatforge serve` in a thread of this process (so tests can reach its engine and store)."""

    def __init__(self, cfg):
        import uvicorn

        from chatforge.serve.app import build

        self.app, self.models, self.store = build(cfg)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.models.close()
        self.store.close()
        self.sock.close()

    @property
    def model(self):
        return self.models.models[0]

    def client(self, api_key: str, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def async_client(self, api_key: str, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)


@contextlib.contextmanager
def slowed(model, seconds_per_step: float):
    """`slow_engine` for the length of a with-block (for a server other tests share)."""
    step = model.engine.step
    slow_engine(model, seconds_per_step)
    try:
        yield
    finally:
        model.engine.step = step


def slow_engine(model, seconds_per_step: float) -> None:
    """Make every engine step take at least `seconds_per_step` (to hold slots and fill queues)."""
    step = model.engine.step

    def slow():
        time.sleep(seconds_per_step)
        return step()

    model.engine.step = slow


class ServerProcess:
    """`python -m chatforge serve ...` as a child process (for kill -9)."""

    def __init__(self, args: list[str], log: Path):
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.sock.close()  # the child binds it; another test grabbing it in between is unlikely on loopback
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", *args, "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready")

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handlers, no flushing
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
