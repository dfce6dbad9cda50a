"""Scaling laws: the fit recovers known laws, the compute-optimal split is right, and a tiny
ladder goes end to end (ladder -> fit -> predict -> check run), refusing inputs it cannot fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.cli import main as cli_main
from chatforge.eval.scaling import Fit, Law, fit, fit_law
from chatforge import checkpoint as ckpt_io
from chatforge.pipelines.scale import LadderConfig, collect_runs, fit_dir, ladder, load_fit, size_lr

TRUE = Law(E=1.8, A=400.0, alpha=0.34, B=410.0, beta=0.28)  # Chinchilla-like exponents, CPU-sized constants
N = np.repeat([6e5, 1.8e6, 4.2e6, 8.4e6], 3)
D = np.tile([2e5, 6e5, 1.8e6], 4)


def test_fit_recovers_a_known_law_exactly():
    """Guards the variable-projection fit (grid over exponents, NNLS for E, A, B, the rescaling of N
    and D): noise-free losses from a known law give back its constants."""
    got = fit_law(N, D, TRUE.loss(N, D))
    assert got.alpha == pytest.approx(TRUE.alpha, abs=2e-3) and got.beta == pytest.approx(TRUE.beta, abs=2e-3)
    assert got.E == pytest.approx(TRUE.E, abs=0.05)
    assert got.A == pytest.approx(TRUE.A, rel=0.05) and got.B == pytest.approx(TRUE.B, rel=0.05)
    np.testing.assert_allclose(got.loss(N, D), TRUE.loss(N, D), rtol=1e-4)


def test_fit_with_noise_has_honest_intervals():
    """Guards the bootstrap: with 0.3% noise on the losses the 95% intervals contain the true
    exponents and the true loss of a run 10x beyond the ladder, and the prediction is within 2%."""
    rng = np.random.default_rng(1)
    loss = TRUE.loss(N, D) * (1 + 0.003 * rng.standard_normal(len(N)))
    f = fit(N, D, loss, n_boot=60, seed=0)
    iv = f.intervals()
    assert iv["alpha"][0] <= TRUE.alpha <= iv["alpha"][1] and iv["beta"][0] <= TRUE.beta <= iv["beta"][1]
    p = f.predict(2e7, 7.5e6)  # 10x the largest ladder compute
    truth = float(TRUE.loss(2e7, 7.5e6))
    assert p["loss_lo"] <= truth <= p["loss_hi"]
    assert p["loss"] == pytest.approx(truth, rel=0.02)
    again = Fit.from_dict(json.loads(json.dumps(f.to_dict())))
    assert again.predict(2e7, 7.5e6) == p  # fit.json round-trips


def test_compute_optimal_split_matches_brute_force():
    """Guards Law.optimal's closed form (Hoffmann et al. eq. 4) against a dense search along
    6ND = C, and its exponents: N ~ C^(beta/(alpha+beta))."""
    for c in (1e15, 1e18, 1e21):
        n, d = TRUE.optimal(c)
        assert 6 * n * d == pytest.approx(c)
        ns = np.geomspace(n / 100, n * 100, 20001)
        best = ns[np.argmin(TRUE.loss(ns, c / (6 * ns)))]
        assert n == pytest.approx(best, rel=2e-3)
    n1, n2 = TRUE.optimal(1e18)[0], TRUE.optimal(1e20)[0]
    assert np.log(n2 / n1) / np.log(100) == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta))
    with pytest.raises(ValueError, match="no compute-optimal split"):
        Law(E=2.0, A=0.0, alpha=0.3, B=100.0, beta=0.3).optimal(1e18)


def test_fit_refuses_runs_that_cannot_determine_it():
    """Guards a fit 'succeeding' on too few runs or on runs that vary only N or only D."""
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_law(N[:4], D[:4], TRUE.loss(N[:4], D[:4]))
    with pytest.raises(ValueError, match="2 model sizes"):
        fit_law(np.full(6, 1e6), D[:6], TRUE.loss(1e6, D[:6]))


def _ladder_cfg(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), sizes=[1, 2], budgets=3, tokens=1280, seq_len=32, micro_batch=4,
                eval_tokens=512, dtype="fp32", device="cpu")
    base.update(kw)
    return LadderConfig(**base)


@pytest.mark.slow
def test_tiny_ladder_end_to_end(shards_dir, tmp_path, capsys):
    """Guards the whole path a person runs: 2 sizes x 3 token budgets of ordinary pretraining runs,
    a re-run that trains nothing, `scale fit` (law, fit.json, plot), `scale predict` by N and D, by
    FLOPs and for a bigger check run made with `scale run`, whose measured loss is compared."""
    # One thread: ~300 tiny steps, where two threads on a busy 2-core machine spend most of a step waiting on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _tiny_ladder_end_to_end(shards_dir, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _tiny_ladder_end_to_end(shards_dir, tmp_path, capsys):
    lad = tmp_path / "ladder"
    ladder(_ladder_cfg(shards_dir, lad))
    plan = json.loads((lad / "ladder.json").read_text())
    assert [r["tokens"] for r in plan["runs"]] == [1280, 3840, 11520] * 2 and plan["compute_span"] >= 30
    stamps = {p: p.stat().st_mtime for p in lad.glob("*/model.safetensors")}
    ladder(_ladder_cfg(shards_dir, lad))  # finished runs are skipped, not retrained
    assert {p: p.stat().st_mtime for p in lad.glob("*/model.safetensors")} == stamps
    runs = collect_runs(lad)
    assert len(runs) == 6 and len({r["n_params"] for r in runs}) == 2
    big = runs[-1]
    assert big["loss"] < runs[0]["loss"]
    for r in runs:  # each size trained at its rate of the ladder's rule
        k = r["shape"][0] // 2
        assert ckpt_io.load_train_state(Path(r["path"]))["config"]["lr"] == pytest.approx(3e-3 * k**-0.5)

    check = tmp_path / "check"
    assert cli_main(["scale", "run", str(lad), "--size", "2", "--tokens", str(2 * 11520), "--out", str(check), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli_main(["scale", "fit", str(lad), "--check", str(check), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "L(N, D) = E + A / N^alpha + B / D^beta" in out and "check check: 2.0x the ladder's largest compute" in out
    assert (lad / "fit.png").stat().st_size > 5000
    saved = json.loads((lad / "fit.json").read_text())
    assert len(saved["runs"]) == 6 and len(saved["bootstrap"]) == 20 and saved["checks"][0]["name"] == "check"
    f = load_fit(lad)
    assert f.predict(big["n_params"], big["tokens"])["loss"] == pytest.approx(float(f.law.loss(big["n_params"], big["tokens"])))

    assert cli_main(["scale", "predict", str(lad), "--params", "1e6", "--tokens", "1e5"]) == 0
    assert "predicted loss" in capsys.readouterr().out
    assert cli_main(["scale", "predict", str(lad / "fit.json"), "--run", str(check)]) == 0
    assert "measured" in capsys.readouterr().out
    if f.law.A > 0 and f.law.B > 0:
        assert cli_main(["scale", "predict", str(lad), "--flops", "1e12"]) == 0
        assert "compute-optimal N" in capsys.readouterr().out

    # Bad input, each named: too few runs, another tokenizer, another data folder, another ladder in the folder.
    few = tmp_path / "few"
    few.mkdir()
    for r in runs[:2]:
        shutil.copytree(r["path"], few / r["name"])
    assert cli_main(["scale", "fit", str(few)]) == 2
    assert "2 finished runs; a fit of L(N, D) needs at least 5" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    shutil.copytree(lad, mixed)
    tj = mixed / runs[0]["name"] / "tokenizer.json"
    tj.write_text(tj.read_text() + " ")
    with pytest.raises(ValueError, match="different tokenizer"):
        fit_dir(mixed, n_boot=0, plot=False)
    tj.write_text(tj.read_text()[:-1])
    meta = mixed / runs[1]["name"] / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "data": "/elsewhere"}))
    with pytest.raises(ValueError, match="different data"):
        fit_dir(mixed, n_boot=0, plot=False)
    with pytest.raises(ValueError, match="different ladder"):
        ladder(_ladder_cfg(shards_dir, lad, lr=1e-3))
    assert cli_main(["scale", "predict", str(tmp_path / "few")]) == 2
    assert "no fit" in capsys.readouterr().err


def test_size_lr_rule():
    """Guards the learning rate per size: lr * k^-lr_exponent, and one rate for every size in a plan
    written before the rule existed (so its runs and check runs keep the rate they trained at)."""
    assert size_lr({"lr": 3e-3, "lr_exponent": 0.5}, 4) == pytest.approx(1.5e-3)
    assert size_lr({"lr": 3e-3, "lr_exponent": 1.0}, 3) == pytest.approx(1e-3)
    assert size_lr({"lr": 3e-3}, 5) == 3e-3


def test_ladder_config_errors(shards_dir, tmp_path):
    """Guards ladders that cannot give a fit: too few runs, too narrow a compute range, too few steps."""
    with pytest.raises(ValueError, match="at least 5"):
        _ladder_cfg(shards_dir, tmp_path / "a", sizes=[1, 2], budgets=2)
    with pytest.raises(ValueError, match="2 model sizes"):
        _ladder_cfg(shards_dir, tmp_path / "a", sizes=[1], budgets=5)
    with pytest.raises(ValueError, match="30x"):
        ladder(_ladder_cfg(shards_dir, tmp_path / "b", sizes=[3, 4], budgets=3))
    with pytest.raises(ValueError, match="smallest run 2 steps"):
        ladder(_ladder_cfg(shards_dir, tmp_path / "c", tokens=256))
    with pytest.raises(ValueError, match="data is required"):
        LadderConfig()


def test_plans_for_tiers(capsys):
    """Guards the hardware plans: the chosen model is the lowest predicted loss among those that
    fit the device memory, FSDP divides weights, gradients and AdamW state (4 + 4 + 8 bytes per
    parameter) by the devices, a tier where nothing fits and an unknown tier are named errors, and
    `speedrun --tier 8gpu --dry-run` plans from the fit chatforge ships."""
    from chatforge.pipelines.scale import TIERS, Tier, memory_gb, model_config, plan_run
    from chatforge.model import preset
    from chatforge.pipelines.speedrun import SpeedrunConfig

    f = Fit(law=TRUE)
    p = plan_run(f, TIERS["8gpu"], 24 * 3600, 8192)
    fits = [r for r in p["rows"] if r["fits"]]
    assert p["best"] is min(fits, key=lambda r: r["loss"])
    assert p["flops_per_s"] == pytest.approx(8 * 989e12 * 0.40)
    for r in p["rows"]:
        assert r["flops"] == pytest.approx(24 * 3600 * p["flops_per_s"])  # every candidate gets the same compute
    big = next(r for r in p["rows"] if r["model"] == "gpt3-175b")
    assert not big["fits"] and big["micro_batch"] == 1
    m1, m8 = memory_gb(preset("gpt3-1.3b", vocab_size=8192), 1, 1, 2048), memory_gb(preset("gpt3-1.3b", vocab_size=8192), 8, 1, 2048)
    assert m1["optimizer"] == pytest.approx(2 * m1["weights"]) and m1["optimizer"] == pytest.approx(8 * m8["optimizer"])
    assert m1["activations"] == m8["activations"]
    assert memory_gb(model_config(1, 8192), 1, 16, 256)["total"] < 1
    tiny = Tier(**{**TIERS["1gpu"].__dict__, "memory_gb": 0.01})
    with pytest.raises(ValueError, match="no candidate model fits 0 GB"):
        plan_run(f, tiny, 3600, 8192)
    with pytest.raises(ValueError, match="known tiers: cpu, 1gpu, 8gpu"):
        SpeedrunConfig(tier="2gpu")
    with pytest.raises(ValueError, match="expected 'auto' or one of"):
        SpeedrunConfig(preset="huge")
    with pytest.raises(ValueError, match="--dry-run"):
        SpeedrunConfig(tier="1gpu")
    assert cli_main(["speedrun", "--tier", "8gpu", "--dry-run", "--minutes", "600"]) == 0
    out = capsys.readouterr().out
    assert "sizing from the shipped fit" in out and "<- chosen" in out and "GB/device" in out


def test_speedrun_trains_the_chosen_size_at_the_fits_rate(tmp_path, monkeypatch):
    """Guards `speedrun --preset auto`: the size a fit picks trains at the learning rate its ladder
    used for that size (lr * k^-lr_exponent from the fit's info), and an explicit --lr wins."""
    from chatforge.config import save_json
    from chatforge.pipelines import scale, speedrun

    monkeypatch.setattr(scale, "measure_seconds_per_token", lambda *a, **k: 1e-5)  # a machine on which size 3 is best
    path = tmp_path / "fit.json"
    save_json(Fit(law=TRUE, info={"lr": 3e-3, "lr_exponent": 0.5}).to_dict(), path)
    cfg = speedrun.SpeedrunConfig(out=str(tmp_path / "run"), fit=str(path), device="cpu")
    model, tokens, why = speedrun.size_pretraining(cfg, 600)
    k = model["n_layer"] // 2
    assert k > 1 and model["lr"] == pytest.approx(3e-3 * k**-0.5) and any("x k^-0.5" in line for line in why)
    model, _, _ = speedrun.size_pretraining(speedrun.SpeedrunConfig(out=str(tmp_path / "run"), fit=str(path), lr=5e-4, device="cpu"), 600)
    assert model["lr"] == 5e-4
