"""`chatforge speedrun` picks up where it stopped: finished stages are skipped, an interrupted
training stage resumes from its last checkpoint, and a finished one is not run again."""

from __future__ import annotations

import json

from chatforge.pipelines import scale
from chatforge.pipelines import speedrun as S
from chatforge.train import common as C
from chatforge.train import pretrain as P
from conftest import corpus_docs, run_killed


def _losses(folder):
    return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_speedrun_skips_finished_stages_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    """Guards the README's promise (finding 7: it had no test). A tiny speedrun (until=pretrain,
    a small corpus in place of the default one, 20 steps) is killed during pretraining after its
    step-8 save; run again, it neither rebuilds the mix, tokenizer or shards nor measures a step
    again, and pretraining continues at step 9 with the losses an uninterrupted run logs; a third
    run skips pretraining too."""
    corpus = tmp_path / "corpus"
    for name, seed in (("en", 1), ("zh", 2)):
        (corpus / name).mkdir(parents=True)
        (corpus / name / "docs.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                                          for d in corpus_docs(600, seed=seed)))
    monkeypatch.setattr(S, "build_default_corpus", lambda: corpus)
    # 10 s per step of 4 x 32 tokens -> the 20-step floor in a 4-minute budget
    monkeypatch.setattr(scale, "measure_seconds_per_token", lambda *a, **k: 10.0 / (4 * 32))
    monkeypatch.setattr(P, "sample_tokens", lambda *a, **k: [])  # the printed samples are most of a tiny run's time
    kw = dict(minutes=4.0, until="pretrain", chars_per_source=100_000, vocab_size=512, preset="cpu-tiny", seq_len=32, micro_batch=4,
              device="cpu")

    ref = S.main(S.SpeedrunConfig(out=str(tmp_path / "ref"), **kw))
    assert [s for s, _ in _losses(ref / "base")][-1] == 20

    run = tmp_path / "run"
    # steps 9..11 run after the save at step 8, then the process "dies"
    run_killed(monkeypatch, C, "train_step", 11, lambda: S.main(S.SpeedrunConfig(out=str(run), **kw)))
    assert not (run / ".done-pretrain").exists() and (run / "base" / "train_state.pt").is_file()

    def must_not_run(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} ran again")
        return fail

    for mod, name in ((S, "prepare"), (S, "train_tokenizer_on_files"), (S, "mix_corpus"), (scale, "measure_seconds_per_token")):
        monkeypatch.setattr(mod, name, must_not_run(name))
    S.main(S.SpeedrunConfig(out=str(run), **kw))
    assert (run / ".done-pretrain").is_file()
    steps = [s for s, _ in _losses(run / "base")]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # resumed at 9: no step logged twice, none missing
    assert _losses(run / "base") == _losses(ref / "base")  # the resumed run is the uninterrupted one

    monkeypatch.setattr(S, "pretrain", must_not_run("pretraining"))
    S.main(S.SpeedrunConfig(out=str(run), **kw))
    assert json.loads((run / "report.json").read_text())["base"] == json.loads((ref / "report.json").read_text())["base"]
