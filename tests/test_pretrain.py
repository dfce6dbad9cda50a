"""Pretraining: learns, resumes exactly, reports bits per byte, refuses bad configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatforge import checkpoint
from chatforge.cli import main as cli_main
from chatforge.data.loader import Shards, TrainBatches, rank_batches, val_batches
from chatforge.model import GPT, GPTConfig
from chatforge.train import common as C
from chatforge.train import loop as L
from chatforge.train.pretrain import PretrainConfig, main
from conftest import run_killed


def cfg(shards, out, **kw):
    base = dict(
        data=str(shards), out=str(out), preset="cpu-tiny", seq_len=32, micro_batch=4, max_steps=30, lr=3e-3,
        warmup_steps=3, eval_every=10, save_every=10, log_every=1, eval_tokens=512, dtype="fp32", device="cpu", peak_flops=1e11,
    )
    base.update(kw)
    return PretrainConfig(**base)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_decreases(shards_dir, tmp_path):
    """Guards a training loop that does not learn (wrong targets, lr schedule, zeroed grads)."""
    main(cfg(shards_dir, tmp_path / "run", max_steps=60))
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 1.0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 60 and meta["metrics"]["val_loss"] < ls[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resume_after_kill(shards_dir, tmp_path, monkeypatch):
    """Guards exact resume after a crash: kill the run right after the step-10 checkpoint, resume, compare."""
    ref = tmp_path / "ref"
    main(cfg(shards_dir, ref))
    run = tmp_path / "run"
    # steps 11..13 run after the save at step 10, then the process "dies"
    run_killed(monkeypatch, C, "train_step", 13, lambda: main(cfg(shards_dir, run)))
    main(cfg(shards_dir, run, resume=True))
    assert losses(run) == losses(ref)
    assert json.loads((run / "meta.json").read_text())["metrics"] == json.loads((ref / "meta.json").read_text())["metrics"]


def test_resume_incompatible(shards_dir, tmp_path):
    main(cfg(shards_dir, tmp_path / "r", max_steps=2, eval_every=1, save_every=1))
    with pytest.raises(ValueError, match="d_model"):
        main(cfg(shards_dir, tmp_path / "r", d_model=128, resume=True))


def test_bits_per_byte_by_hand(shards_dir, tmp_path):
    """Guards the bits/byte formula (loss * tokens / (bytes * ln 2)) and that pretraining reports it
    with the val split's bytes per token: 2 nats/token over 1000 tokens of 4000 bytes is 0.72135."""
    assert C.bits_per_byte(2.0, 1000, 4000) == pytest.approx(2.0 / math.log(2) / 4.0) == pytest.approx(0.721348, rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        C.bits_per_byte(2.0, 0, 10)
    main(cfg(shards_dir, tmp_path / "r", max_steps=2, eval_every=2, save_every=2))
    m = json.loads((tmp_path / "r" / "meta.json").read_text())["metrics"]
    val = json.loads((shards_dir / "meta.json").read_text())["splits"]["val"]
    assert m["val_bpb"] == pytest.approx(m["val_loss"] * val["tokens"] / (val["bytes"] * math.log(2)), rel=1e-9)


def test_max_tokens_and_time_budget(shards_dir, tmp_path):
    """Guards the run-length knobs: max_tokens sets the step count (ceil of tokens / tokens per
    step, here 4x32 = 128), and a spent time budget stops after the current step and still saves."""
    main(cfg(shards_dir, tmp_path / "a", max_tokens=3 * 128 + 1, eval_every=100, save_every=100))
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["step"] == 4
    main(cfg(shards_dir, tmp_path / "b", time_budget_s=1e-6))
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["step"] == 1
    assert checkpoint.load_train_state(tmp_path / "b")["step"] == 1


def test_bad_configs(shards_dir, tmp_path):
    """Guards user mistakes reaching the training loop instead of a ValueError that names the field."""
    with pytest.raises(ValueError, match="data is required"):
        PretrainConfig()
    with pytest.raises(ValueError, match="preset"):
        cfg(shards_dir, tmp_path, preset="huge")
    with pytest.raises(ValueError, match="longer than"):
        main(cfg(shards_dir, tmp_path / "x", seq_len=4096))
    with pytest.raises(ValueError, match="dtype"):
        cfg(shards_dir, tmp_path, dtype="int8")
    for field in ("max_tokens", "warmup_steps", "grad_clip", "time_budget_s", "d_model"):
        with pytest.raises(ValueError, match=field):
            cfg(shards_dir, tmp_path, **{field: -1})
    with pytest.raises(ValueError, match="micro_batch"):
        cfg(shards_dir, tmp_path, micro_batch=0)
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        main(cfg(shards_dir, tmp_path / "z", total_batch_tokens=200))
    with pytest.raises(ValueError, match="no meta.json"):
        main(cfg(tmp_path, tmp_path / "y"))
    with pytest.raises(ValueError, match="no train_state.pt"):
        main(cfg(shards_dir, tmp_path / "never-trained", resume=True))


def test_schedule_and_accum():
    """Guards the warmup/cosine endpoints and the accumulation derived from the token budget."""
    assert C.lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert C.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert C.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert C.grad_accum_steps(4096, 4, 256, 2) == 2
    with pytest.raises(ValueError, match="multiple"):
        C.grad_accum_steps(5000, 4, 256, 2)


# ---- the shared step: accumulation and token normalisation ------------------------------------


def test_accumulation_equals_one_big_batch():
    """Guards the loss normalisation of train_step: with masked targets and uneven valid tokens per
    micro-batch, 2 micro-batches must give exactly the gradient of the mean over all valid tokens of
    the whole batch (a per-micro-batch mean would weight the rows differently). SGD(lr=1) makes the
    update equal the gradient, so the scale is checked too, not just the direction."""
    torch.manual_seed(0)
    cfg_m = GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    x = torch.randint(0, 50, (4, 12))
    y = torch.randint(0, 50, (4, 12))
    y[0, :10] = -100  # rows 0-1 (micro-batch 0) keep 2 + 12 targets, rows 2-3 keep 24
    ref = GPT(cfg_m)
    ref.init_weights(0)
    ref_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    ref_loss.backward()
    expected = {n: p.detach() - p.grad for n, p in ref.named_parameters()}

    dist = C.Dist()
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        m = GPT(cfg_m)
        m.init_weights(0)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        r = C.train_step(C.LMLoss(m), [(x[s], y[s]) for s in split], C.lm_loss, opt, dist, "fp32", grad_clip=0.0)
        assert r["tokens"] == 38
        assert r["loss"] == pytest.approx(ref_loss.item(), rel=1e-6)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6, msg=f"{n} with {len(split)} micro-batches")


def test_bf16_autocast_step_on_cpu():
    """Guards the bf16 path on CPU: the step runs under autocast, weights stay fp32 for AdamW, and
    the loss stays close to the fp32 loss of the same batch."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    m.init_weights(0)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        fp32 = F.cross_entropy(m(x).flatten(0, 1), y.flatten()).item()
    opt = C.make_optimizer(m, 1e-3, 0.1)
    r = C.train_step(C.LMLoss(m), [(x, y)], C.lm_loss, opt, C.Dist(), "bf16", grad_clip=1.0)
    assert r["loss"] == pytest.approx(fp32, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_head_loss_matches_unfused(dtype, tie, monkeypatch):
    """Guards HeadCrossEntropy (the eager LMLoss head): same loss, count and gradients of every
    parameter as the plain head + token_loss_sum, with masked targets and rows over several chunks;
    without grad it returns the loss alone."""
    monkeypatch.setattr(C.HeadCrossEntropy, "CHUNK_BYTES", {"cpu": 48 * 70 * 4})  # 48 rows: 3 chunks, the last one short
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=70, n_layer=1, n_head=2, d_model=32, max_seq_len=64, tie_embeddings=tie))
    m.init_weights(0)
    x, y = torch.randint(0, 70, (4, 30)), torch.randint(0, 70, (4, 30))
    y[0, :7] = -100
    y[3, :] = -100
    runs = []
    for fused in (False, True):
        m.zero_grad()
        with C.autocast(torch.device("cpu"), dtype):
            loss, n = C.LMLoss(m)(x, y) if fused else C.token_loss_sum(m(x), y)
        (loss * 0.5).backward()
        runs.append((loss.item(), n.item(), [p.grad.clone() for p in m.parameters()]))
    (ref, n_ref, g_ref), (got, n_got, g_got) = runs
    assert n_got == n_ref == 4 * 30 - 37
    assert got == pytest.approx(ref, rel=1e-5)
    for a, b in zip(g_ref, g_got):
        if dtype == "fp32":
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        else:  # bf16 products summed in another order (chunks): within bf16 rounding (~0.006 of fp32 here)
            assert (a - b).norm() <= 0.02 * a.norm()
    with torch.no_grad(), C.autocast(torch.device("cpu"), dtype):
        loss, _ = C.LMLoss(m)(x, y)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    m.output_weight().requires_grad_(False)  # a frozen head: gradients for the rest only
    m.zero_grad()
    with C.autocast(torch.device("cpu"), dtype):
        C.LMLoss(m)(x, y)[0].mul(0.5).backward()
    assert m.output_weight().grad is None
    for p, a in zip(m.parameters(), g_ref):
        if p.requires_grad and dtype == "fp32":
            torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_optimizer_groups():
    """Guards the decay rule: every matrix (linear and embedding weights) decays, no bias or norm gain does."""
    m = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=16, block="gpt2", tie_embeddings=False))
    opt = C.make_optimizer(m, 1e-3, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    decay = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in opt.param_groups[1]["params"])
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == sorted(["tok_emb.weight", "pos_emb.weight", "lm_head.weight", "blocks.0.attn.qkv.weight",
                            "blocks.0.attn.proj.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"])
    assert no_decay and all(n.endswith(".bias") or ".norm" in n or n.startswith("norm_f") for n in no_decay)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))


def test_fused_adamw_equals_foreach():
    """Guards the fused AdamW kernel (train.common.adamw): its updates equal the foreach
    implementation's, with weight decay on one group, over a few steps of real gradients; and each
    step raises the weights' version counters, as the engine's copies need to see an update."""
    def run(impl):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
        m.init_weights(0)
        if impl == "chatforge":
            opt = C.make_optimizer(m, 1e-2, 0.1)
        else:
            decay = [p for p in m.parameters() if p.dim() >= 2]
            rest = [p for p in m.parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                    lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randint(0, 50, (2, 16), generator=g)
            F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            before = [p._version for p in m.parameters()]
            opt.step()
            assert all(p._version > v for p, v in zip(m.parameters(), before))
            opt.zero_grad()
        return opt, list(m.parameters())

    opt, fused = run("chatforge")
    assert opt.defaults["fused"]
    _, ref = run("foreach")
    torch.manual_seed(0)
    init = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
    init.init_weights(0)
    assert all(not torch.equal(a, b) for a, b in zip(fused, init.parameters()))  # every tensor was updated
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_progress_excludes_pauses(monkeypatch):
    """Guards tokens/s and ETA counting evaluation/save pauses as training time, and the moving
    window forgetting slow first steps."""
    now = [100.0]
    monkeypatch.setattr(C.time, "perf_counter", lambda: now[0])
    p = C.Progress(flops_per_token=10.0, peak=2000.0, total_steps=10, start_step=0, window=2)
    now[0] += 5.0  # a slow first step (warmup)
    p.update(0, 100)
    with p.paused():
        now[0] += 50.0  # evaluation
    now[0] += 1.0
    p.update(1, 100)
    now[0] += 1.0
    r = p.update(2, 100)  # the window now holds two 1-second steps
    assert r["tok_per_s"] == pytest.approx(100.0)
    assert r["mfu"] == pytest.approx(10.0 * 100.0 / 2000.0)
    assert r["eta_s"] == pytest.approx(7 * 1.0)



class TimedLoop:
    """What StepCompiler reads from a Loop, with step times set by the test."""

    def __init__(self, eta_s: float):
        self.name, self.eta_s, self.step_s, self.step, self.lines = "pretrain", eta_s, 0.0, 0, []
        self.progress = C.Progress(0.0, 0.0, 100, 0)
        self.records: list[dict] = []
        self.log = type("Log", (), {"print": lambda _, line: self.lines.append(line), "log": lambda _, r: self.records.append(r)})()

    def last_step_s(self) -> float:
        return self.step_s


def drive(compiler, loop, module, seconds):
    """Steps of the given durations; for each, the module the next step trains with."""
    used = []
    for s in seconds:
        loop.step_s = s
        module = compiler.after_step(loop, module)
        used.append(module)
    return used


@pytest.mark.parametrize("speedup, keeps", [(1.25, True), (1.0, False)])
def test_compile_auto_keeps_the_compiled_step_only_when_measured_faster(monkeypatch, speedup, keeps):
    """Guards --compile auto: PROBE eager steps after a warm-up, then compiled when the run has long
    enough left; the compiling step and a warm-up compiled step are not timed; then eager and
    compiled steps alternate in PROBE pairs and the faster is kept for good, decided on the pairs'
    ratios, so a machine slowing down during the comparison does not read as a slower compiled step."""
    compiled = []
    monkeypatch.setattr(L.torch, "compile", lambda m: compiled.append(m) or ("compiled", m))
    monkeypatch.setattr(L, "compiler_missing", lambda device: "")
    sc, loop = L.StepCompiler("auto", torch.device("cpu")), TimedLoop(eta_s=3600)
    eager, P = torch.nn.Linear(2, 2), sc.PROBE
    c = ("compiled", eager)
    used = drive(sc, loop, eager, [5.0] + [1.0] * P)
    assert used[:-1] == [eager] * P and used[-1] == c and compiled == [eager] and sc.compiled
    assert drive(sc, loop, c, [60.0, 9.0]) == [c, eager]  # compiling, warming up: then the first pair
    drift = [x for i in range(P) for x in (1.0 + 0.3 * i, (1.0 + 0.3 * i) / speedup)]  # each pair slower than the last
    used = drive(sc, loop, eager, drift)
    assert used[:-1] == [c, eager] * (P - 1) + [c]
    assert used[-1] == (c if keeps else eager) and sc.compiled is keeps and sc.compile_s == 60.0
    assert drive(sc, loop, used[-1], [0.1, 9.0]) == [used[-1]] * 2 and len(compiled) == 1  # decided for good
    assert ("keeping it" if keeps else "back to eager") in loop.lines[-1]
    assert loop.records[-1]["compile_kept"] is keeps and loop.records[-1]["compile_gain"] == pytest.approx(speedup)


def test_compile_auto_stays_eager_for_short_runs_or_without_a_compiler(monkeypatch):
    """Guards a compilation paid by a run too short to repay it (tests, best-of-n rounds), or
    tried where inductor has no compiler; and "off"/"on"/unknown modes."""
    monkeypatch.setattr(L.torch, "compile", lambda m: pytest.fail("compiled"))
    m = torch.nn.Linear(2, 2)
    short = TimedLoop(eta_s=L.StepCompiler.MIN_LEFT_S - 1)
    assert drive(L.StepCompiler("auto", torch.device("cpu")), short, m, [1.0] * 10) == [m] * 10
    assert "too short" in short.lines[-1]
    monkeypatch.setattr(L, "compiler_missing", lambda device: "no C++ compiler on PATH")
    long = TimedLoop(eta_s=3600)
    assert drive(L.StepCompiler("auto", torch.device("cpu")), long, m, [1.0] * 10) == [m] * 10
    assert "no C++ compiler" in long.lines[-1]
    assert drive(L.StepCompiler("off", torch.device("cpu")), long, m, [1.0] * 10) == [m] * 10
    assert drive(L.StepCompiler("auto", torch.device("cpu"), world=2), long, m, [1.0] * 10) == [m] * 10  # DDP wraps at setup
    with pytest.raises(ValueError, match="no C\\+\\+ compiler.*--compile off"):
        L.StepCompiler("on", torch.device("cpu")).setup(m)
    with pytest.raises(ValueError, match="compile='yes'"):
        cfg("x", "y", compile="yes")


def test_compiled_training_step_matches_eager(shards_dir, tmp_path, monkeypatch, capsys):
    """Guards the compiled training step (inductor) against the eager one: a run that switches
    to it mid-way (--compile auto, thresholds lowered so a tiny run qualifies) trains to the same
    fp32 losses as an eager run, and its checkpoint is the bare model's."""
    monkeypatch.setattr(L.StepCompiler, "MIN_LEFT_S", 0.0)
    monkeypatch.setattr(L.StepCompiler, "PROBE", 2)
    monkeypatch.setattr(L.StepCompiler, "MIN_GAIN", 0.0)  # keep it whatever the timing on a busy machine
    kw = dict(preset="cpu-tiny", n_layer=1, max_steps=10, eval_every=100, save_every=100, warmup_steps=1)  # 3 eager, 2 compiling, 2 pairs
    main(cfg(shards_dir, tmp_path / "eager", compile="off", **kw))
    main(cfg(shards_dir, tmp_path / "auto", compile="auto", **kw))
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-4)
    assert "compiling the training step" in capsys.readouterr().err
    assert [r for r in map(json.loads, (tmp_path / "auto" / "log.jsonl").read_text().splitlines()) if "compile_kept" in r][0]["compile_kept"]
    a, b = checkpoint.load(tmp_path / "eager").model.state_dict(), checkpoint.load(tmp_path / "auto").model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


# ---- the token-shard loader --------------------------------------------------------------------


def write_shards(root, train, val, dtype="uint16"):
    """Shards in the data/prepare.py format, by hand: meta.json + flat train.bin / val.bin."""
    root.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(root / "train.bin")
    np.asarray(val, dtype=dtype).tofile(root / "val.bin")
    splits = {k: {"tokens": len(v), "documents": 1, "bytes": 3 * len(v)} for k, v in (("train", train), ("val", val))}
    meta = {"format": "chatforge-shards/1", "dtype": dtype, "vocab_size": 70000, "eos_id": 0, "tokenizer": "", "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_loader_windows_and_ranks(tmp_path):
    """Guards the data stream: targets are inputs shifted by one, a step's batches depend only on
    (seed, step) (exact resume needs no other state), and 2 ranks x 1 micro-batch see exactly the
    rows of 1 rank x 2 micro-batches (DDP equivalence)."""
    sh = Shards(write_shards(tmp_path / "s", np.arange(5000) + 65000, np.arange(1000), dtype="uint32"))
    one = TrainBatches(sh, seq_len=16, micro_batch=3, accum=2, seed=7)
    x, y = one.get(5, 0)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1) and int(x.min()) >= 65000
    again = TrainBatches(sh, seq_len=16, micro_batch=3, accum=2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(one.get(5, 1), again.get(5, 1)))
    assert not torch.equal(one.get(5, 0)[0], one.get(6, 0)[0])
    assert not torch.equal(one.get(5, 0)[0], TrainBatches(sh, 16, 3, 2, seed=8).get(5, 0)[0])
    ranks = [TrainBatches(sh, 16, 3, accum=1, seed=7, rank=r, world=2).get(5, 0)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), torch.cat([one.get(5, 0)[0], one.get(5, 1)[0]]))


def test_val_batches_deterministic_and_split_over_ranks(tmp_path):
    """Guards validation drifting between evaluations or ranks double-counting windows: windows are
    consecutive from the start of val.bin, capped at max_tokens, and dealt round-robin to ranks.
    And guards an uneven share hanging FSDP: every rank gets as many batches (9 windows in
    batches of 4 are 5 + 4 windows, 2 batches each), a stand-in batch's targets all -100."""
    sh = Shards(write_shards(tmp_path / "s", np.arange(500), np.arange(1000)))
    xs = [x for x, _ in val_batches(sh, seq_len=10, batch=4, max_tokens=95)]
    assert [x.shape[0] for x in xs] == [4, 4, 1]  # 95 // 10 = 9 windows
    starts = torch.cat(xs)[:, 0].tolist()
    assert starts == [10 * w for w in range(9)]
    per_rank = [list(val_batches(sh, 10, 4, 95, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    counted = [(xb, yb) for batches in per_rank for xb, yb in batches if (yb != -100).any()]
    assert sorted(int(x[0]) for xb, _ in counted for x in xb) == starts
    stand_in = per_rank[1][1][1]
    assert bool((stand_in == -100).all()) and all(bool((yb != -100).all()) for _, yb in counted)


def test_rank_batches_even_over_ranks():
    """Guards the evaluation layout every stage shares (pretrain, SFT, RM, DPO): each item counted
    on exactly one rank, as many batches on every rank, stand-ins ([0], not counted) where a
    rank's share ran out (a rank with none at all still joins)."""
    for n, batch, world in [(9, 4, 2), (5, 2, 2), (1, 3, 2), (7, 1, 3), (0, 2, 2), (8, 4, 2)]:
        shares = [rank_batches(n, batch, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1, (n, batch, world)
        assert sorted(i for s in shares for idx, counts in s if counts for i in idx) == list(range(n))
        assert all(idx == [0] for s in shares for idx, counts in s if not counts)
    assert rank_batches(9, 4, 1, 2) == [([1, 3, 5, 7], True), ([0], False)]


def test_loader_errors(tmp_path):
    """Guards unreadable shard folders surfacing as numpy errors instead of a message naming the file."""
    with pytest.raises(ValueError, match="no meta.json"):
        Shards(tmp_path)
    root = write_shards(tmp_path / "s", np.arange(20), np.arange(5))
    with pytest.raises(ValueError, match="fewer than one window"):
        TrainBatches(Shards(root), seq_len=32, micro_batch=1, accum=1, seed=0)
    with pytest.raises(ValueError, match="val split"):
        next(val_batches(Shards(root), seq_len=8, batch=1, max_tokens=100))
    (root / "val.bin").unlink()
    with pytest.raises(ValueError, match="val.bin: missing"):
        Shards(root).split("val")
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "format": "other/2"}))
    with pytest.raises(ValueError, match="unknown shard format"):
        Shards(root)


# ---- `chatforge sample` -------------------------------------------------------------------------


def test_sample_cli_greedy(tmp_path, tok, capsys):
    """Guards `chatforge sample CKPT`: it prints the prompt and the greedy continuation that a
    plain argmax loop over the checkpoint's model gives, and an unknown model name exits with 2."""
    m = GPT(GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=32, max_seq_len=64))
    m.init_weights(3)
    checkpoint.save(tmp_path / "ck", m, tok, {"stage": "test"})
    prompt = "The quick brown 你好"
    assert cli_main(["sample", str(tmp_path / "ck"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"]) == 0
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(m.eval()(torch.tensor([ids]))[0, -1].argmax())
            if nxt in tok.stop_ids():
                break
            ids.append(nxt)
            new.append(nxt)
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"
    assert cli_main(["sample", "no-such-model-xyz", "--prompt", "hi"]) == 2
    assert "unknown model" in capsys.readouterr().err
