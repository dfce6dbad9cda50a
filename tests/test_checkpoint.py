"""Checkpoint directory: round trip, atomic replace, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge import checkpoint
from chatforge.model import GPT, GPTConfig


def _model(block="llama", tie=True):
    cfg = GPTConfig(vocab_size=576, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64, block=block, tie_embeddings=tie)
    m = GPT(cfg)
    m.init_weights(1)
    return m.eval()


@pytest.mark.parametrize("block, tie", [("llama", True), ("gpt2", False)])
def test_round_trip_same_logits(tmp_path, tok, block, tie):
    """Guards weights, config or tokenizer changing through save/load (tied heads, RoPE buffers)."""
    m = _model(block, tie)
    checkpoint.save(tmp_path / "ck", m, tok, {"stage": "test"})
    ck = checkpoint.load(tmp_path / "ck")
    x = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), m(x), rtol=0, atol=0)
    assert ck.tokenizer.encode("hi 你好") == tok.encode("hi 你好")
    assert ck.meta["stage"] == "test" and len(ck.meta["snapshot"]) == 12


def test_atomic_replace_keeps_run_files(tmp_path, tok):
    """Guards a save leaving temp dirs behind or deleting the run's log beside the weights."""
    m = _model()
    checkpoint.save(tmp_path / "ck", m, tok, {"step": 1})
    (tmp_path / "ck" / "log.jsonl").write_text('{"step": 1}\n')
    checkpoint.save(tmp_path / "ck", m, tok, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (tmp_path / "ck" / "log.jsonl").read_text() == '{"step": 1}\n'
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["step"] == 2


def test_missing_files_and_bad_config(tmp_path, tok):
    with pytest.raises(ValueError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "nope")
    m = _model()
    checkpoint.save(tmp_path / "ck", m, tok, {})
    (tmp_path / "ck" / "meta.json").unlink()
    with pytest.raises(ValueError, match="missing meta.json"):
        checkpoint.load(tmp_path / "ck")
    checkpoint.save(tmp_path / "ck", m, tok, {})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load(tmp_path / "ck")
    cfg["flux"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown field"):
        checkpoint.load(tmp_path / "ck")


def test_tokenizer_bigger_than_model(tmp_path, tok):
    """Guards token ids that would index past the embedding table."""
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    with pytest.raises(ValueError, match="embeddings"):
        checkpoint.load(tmp_path / "ck")


class _Payload:
    """Unpickling this calls a function of the file's choosing (here: one that leaves a mark)."""

    def __reduce__(self):
        return (_leave_mark, ("unpickled",))


MARKS: list[str] = []


def _leave_mark(x):
    MARKS.append(x)
    return x


def test_train_state_is_loaded_without_running_pickled_code(tmp_path):
    """Guards finding 5: --resume loaded train_state.pt with torch.load(weights_only=False), so a
    run folder from elsewhere could run any code. A real train state (optimizer, the RNG states of
    python, numpy and torch) still loads; a file naming a function is refused, naming the file,
    and the function never runs."""
    import random

    import numpy as np

    from chatforge.checkpoint import load_train_state
    from chatforge.train.common import rng_state

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    opt.zero_grad()
    opt.param_groups[0]["params"][0].sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": rng_state(), "config": {"lr": 1e-3, "name": "x"}}
    torch.save(state, tmp_path / "train_state.pt")
    back = load_train_state(tmp_path)
    assert back["step"] == 7 and back["config"] == {"lr": 1e-3, "name": "x"}
    assert np.array_equal(back["rng"]["numpy"][1], np.random.get_state()[1]) and back["rng"]["python"] == random.getstate()
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"step": 1, "rng": _Payload()}, evil / "train_state.pt")
    with pytest.raises(ValueError, match=r"evil/train_state.pt: not a chatforge train state"):
        load_train_state(evil)
    assert MARKS == []
