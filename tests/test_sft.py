"""SFT: conversation files, loss masks, packing, the training stage, resume, the eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge import checkpoint as ckpt_io
from chatforge.data.chat import ChatBatches, collate, pack_rows, read_conversations, tokenize, val_batches
from chatforge.model import GPT, preset
from chatforge.tokenizer import CHATML_JINJA, ChatSpec, Tokenizer
from chatforge.train import common as C
from chatforge.train.sft import SAMPLE_PROMPTS, SFTConfig, main
from conftest import assert_close_weights, run_killed

QA = [
    ("What is 2 + 3?", "5"),
    ("Hello!", "Hi, how can I help you?"),
    ("床前明月光的下一句是什么？", "疑是地上霜。"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("学而时习之的下一句？", "不亦说乎？"),
    ("Name a fox.", "The quick brown fox."),
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = []
        if i % 3 == 0:
            turns.append({"role": "system", "content": "You are terse."})
        for _ in range(1 + i % 2):
            q, a = QA[rng.integers(len(QA))]
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": turns})
    return out


def assistant_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


# ---- loss masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "jinja"])
def test_mask_is_exactly_assistant_spans(tok, template):
    """Guards training on the wrong tokens: the mask must cover every assistant turn's content and
    its end-of-turn token, and nothing of system/user turns or role headers, for single and
    multi-turn chats, with a system prompt, for the native ChatML and a Jinja template."""
    t = tok if template == "chatml" else Tokenizer(tok.hf, ChatSpec(chat_template=CHATML_JINJA))
    cases = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "床前明月光的下一句是什么？"},
            {"role": "assistant", "content": "疑是地上霜。"},
        ],
    ]
    for messages in cases:
        ids, mask = t.render(messages)
        # Expected by hand: the rendered text with only assistant content + <|im_end|> kept.
        want = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert assistant_text(t, ids, mask) == want
        # The masked tokens form one contiguous run per assistant turn.
        runs = sum(1 for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1]))
        assert runs == sum(m["role"] == "assistant" for m in messages)
        assert t.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_targets_follow_the_mask(tok):
    """Guards an off-by-one between the mask and the shifted targets: target t is token t+1 and is
    kept exactly when token t+1 is in the mask."""
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    ids, mask = tok.render(messages)
    data = tokenize([_conv(messages)], tok, 1000)
    x, y = collate(data, [[0]], pack=False)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [i if m else -100 for i, m in zip(ids[1:], mask[1:])]
    assert tok.decode([i for i in y[0].tolist() if i != -100]) == "Hi.<|im_end|>"


def _conv(messages):
    from chatforge.data.chat import Conversation

    return Conversation(messages, "test")


# ---- reading and validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "line 2: invalid JSON"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', r"line 2: messages\[0\].role: 'bot'"),
        ('{"messages": []}', "line 2: messages: expected a non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant turn"),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', r"line 2: messages\[0\].content: expected a string"),
        ('{"text": "plain"}', "line 2: expected a 'messages' list"),
        ('{"prompt": "hi", "completion": null}', "line 2: completion: expected a string"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    """Guards bad records being skipped or reported without a location (design.md: nothing is
    silently skipped)."""
    good = json.dumps({"prompt": "hi", "completion": "hello"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(ValueError, match=match) as e:
        read_conversations([path])
    assert str(path) in str(e.value)


def test_formats_agree(tmp_path):
    """Guards the JSONL, prompt/completion, parquet and `datasets` folder readers disagreeing on
    the same conversations (the arrow folder is read with pyarrow alone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = chats(5)
    write_jsonl(tmp_path / "a.jsonl", recs)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    hf = tmp_path / "hf"
    hf.mkdir()
    table = pa.Table.from_pylist(recs)
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    want = [r["messages"] for r in recs]
    for src in (tmp_path / "a.jsonl", tmp_path / "a.parquet", hf):
        assert [c.messages for c in read_conversations([src])] == want
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 2 + 3?", "completion": "5", "metadata": {"answer": "5"}}])
    (c,) = read_conversations([pc])
    assert c.messages == [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert c.meta == {"answer": "5"}


def test_datasets_save_to_disk(tmp_path):
    """Guards the reader against the real `datasets` layout (DatasetDict folders included)."""
    datasets = pytest.importorskip("datasets")
    recs = chats(4)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dd"))
    assert [c.messages for c in read_conversations([tmp_path / "dd"])] == [r["messages"] for r in recs]


def test_truncation_is_counted(tok):
    """Guards over-long conversations silently vanishing or overflowing the row."""
    long = [{"role": "user", "content": "hi " * 5}, {"role": "assistant", "content": "ok " * 50}]
    only_prompt = [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    data = tokenize([_conv(long), _conv(only_prompt), _conv(short)], tok, 64)
    assert (data.truncated, data.dropped, len(data)) == (2, 1, 2)
    assert max(len(i) for i in data.ids) == 64


# ---- packing ---------------------------------------------------------------------------------


def tiny_model(tok, block="llama", seed=0):
    model = GPT(preset("cpu-tiny", vocab_size=64 * ((tok.vocab_size + 63) // 64), block=block, max_seq_len=256))
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_packing_does_not_leak(tok, block):
    """Guards attention or positions leaking across packed conversations: every conversation's
    logits are the same packed into one row as computed alone."""
    model = tiny_model(tok, block)
    data = tokenize([_conv(r["messages"]) for r in chats(6)], tok, 256)
    rows = pack_rows([len(i) for i in data.ids], list(range(len(data))), 256, pack=True)
    assert len(rows[0]) >= 3, "the test needs several conversations in a row"
    x, y, pos, mask = collate(data, rows, pack=True)
    with torch.no_grad():
        packed = model(x, pos, mask)
        at = 0
        for i in rows[0]:
            n = len(data.ids[i]) - 1
            alone = model(torch.from_numpy(data.ids[i][:-1].astype(np.int64))[None])
            torch.testing.assert_close(packed[0, at : at + n], alone[0], rtol=1e-4, atol=1e-5)
            at += n
    # Padded (unpacked) rows give the same logits too, with plain causal attention.
    xp, yp = collate(data, [[i] for i in rows[0]], pack=False)
    with torch.no_grad():
        padded = model(xp)
    for b, i in enumerate(rows[0]):
        n = len(data.ids[i]) - 1
        alone = model(torch.from_numpy(data.ids[i][:-1].astype(np.int64))[None])
        torch.testing.assert_close(padded[b, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_packed_loss_equals_unpacked(tok):
    """Guards packing changing the objective: the summed loss and target count are the same."""
    model = tiny_model(tok)
    data = tokenize([_conv(r["messages"]) for r in chats(12)], tok, 128)
    with torch.no_grad():
        sums = []
        for pack in (True, False):
            s = n = 0
            for batch in val_batches(data, 128, pack, batch=3):
                x, y, *rest = batch
                ls, c = C.token_loss_sum(model(x, *rest), y)
                s, n = s + ls, n + c
            sums.append((float(s), int(n)))
    assert sums[0][1] == sums[1][1] == data.target_tokens
    assert sums[0][0] == pytest.approx(sums[1][0], rel=1e-5)


@pytest.mark.parametrize("pack", [True, False])
def test_sft_loss_only_at_targets(tok, pack):
    """Guards the SFT loss's shortcut (output head only where there is a target) changing the
    loss or its gradient against the plain full-logits cross-entropy."""
    from chatforge.train.sft import SFTLoss

    model = tiny_model(tok).train()
    data = tokenize([_conv(r["messages"]) for r in chats(8)], tok, 128)
    x, y, *rest = next(iter(val_batches(data, 128, pack, batch=4)))
    fast, _ = SFTLoss(model, None)(x, y, *rest)
    fast.backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, n = C.token_loss_sum(model(x, *rest), y)
    full.backward()
    assert int(n) > 0 and float(fast.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    for a, p in zip(g_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_batches_depend_on_step_only(tok):
    """Guards a data position that exact resume cannot restore: the batch of a step is a pure
    function of (seed, step, micro), and every conversation is seen once per epoch."""
    data = tokenize([_conv(r["messages"]) for r in chats(40)], tok, 64)
    a = ChatBatches(data, 64, True, 2, 1, seed=3)
    b = ChatBatches(data, 64, True, 2, 1, seed=3)
    for step in (7, 0, 3):
        for ta, tb in zip(a.get(step, 0), b.get(step, 0)):
            assert torch.equal(ta, tb)
    per_epoch = a.rows_per_epoch()
    seen = sorted(i for g in range(per_epoch) for i in a._global_row(g))
    assert seen == list(range(len(data)))
    two = ChatBatches(data, 64, True, 1, 1, seed=3, rank=1, world=2)
    assert two.rows(5, 0) == [a.rows(5, 0)[1]]


# ---- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("base") / "base"
    ckpt_io.save(d, tiny_model(tok), tok, {"stage": "pretrain", "parent": None})
    return d


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    return write_jsonl(d / "train.jsonl", chats(60)), write_jsonl(d / "val.jsonl", chats(12, seed=1))


def sft_cfg(base, files, out, **kw):
    c = dict(
        base=str(base), data=[str(files[0])], val_data=[str(files[1])], out=str(out), seq_len=64, micro_batch=4,
        max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10, save_every=10, log_every=1, dtype="fp32", device="cpu",
        peak_flops=1e11, sample_prompts=["Hello!"], sample_tokens=4,
    )
    c.update(kw)
    return SFTConfig(**c)


def records(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out) if "loss" in r]


def test_compiled_sft_step_matches_eager(base_ckpt, chat_files, tmp_path):
    """Guards the compiled SFT step (--compile on; auto picks it for long runs): with LoRA and
    packed rows it trains to the eager run's losses. Compiled, the rows are padded to seq_len and
    the loss runs over every position (no boolean indexing), so the graph has one static shape:
    the varying row lengths once made inductor's dynamic-shape graph fail a stride check."""
    kw = dict(max_steps=6, save_every=100, eval_every=100, lora_rank=4)
    eager = main(sft_cfg(base_ckpt, chat_files, tmp_path / "eager", compile="off", **kw))
    compiled = main(sft_cfg(base_ckpt, chat_files, tmp_path / "compiled", compile="on", **kw))
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4, abs=1e-4)


def test_sft_learns(base_ckpt, chat_files, tmp_path):
    """Guards an SFT loop that does not learn (wrong targets, mask, schedule): the training loss
    falls and the validation loss ends well below the base model's."""
    out = main(sft_cfg(base_ckpt, chat_files, tmp_path / "sft", max_steps=25, save_every=25))
    ls = losses(out)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 1.0
    vals = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 25 and meta["conversations"]["train"] == 60
    assert (out / "loss.png").is_file()
    ckpt_io.load(out)  # a normal checkpoint the engine and `chatforge chat` can load


def test_sft_resume_exact(base_ckpt, chat_files, tmp_path, monkeypatch):
    """Guards exact resume (shared machinery): kill after the step-5 save, resume, compare losses."""
    kw = dict(max_steps=10, save_every=5, eval_every=5, sample_prompts=[])
    ref = main(sft_cfg(base_ckpt, chat_files, tmp_path / "ref", **kw))
    # steps 6..8 run after the save at step 5, then the process "dies"
    run_killed(monkeypatch, C, "train_step", 8, lambda: main(sft_cfg(base_ckpt, chat_files, tmp_path / "run", **kw)))
    run = main(sft_cfg(base_ckpt, chat_files, tmp_path / "run", resume=True, **kw))
    assert losses(run) == losses(ref)
    assert [r for r in records(run) if "val_loss" in r] == [r for r in records(ref) if "val_loss" in r]


def test_time_budget_is_decided_across_ranks(base_ckpt, chat_files, tmp_path, monkeypatch):
    """Guards finding 6: SFT checked its time budget on each rank's own clock (pretraining asks
    C.any_rank), so under torchrun one rank could stop while another ran the next step's
    collectives and hung. Here the other rank's clock has run out (any_rank says so at once):
    this rank must stop after its first step too, although its own budget is far from spent."""
    asked = []

    def other_rank_is_out(flag, dist):
        asked.append(flag)
        return True

    monkeypatch.setattr(C, "any_rank", other_rank_is_out)
    out = main(sft_cfg(base_ckpt, chat_files, tmp_path / "sft", max_steps=20, time_budget_s=3600.0, sample_prompts=[]))
    assert asked and asked[0] is False  # this rank's own clock had time left
    assert json.loads((out / "meta.json").read_text())["step"] == 1


def test_lm_mix(base_ckpt, chat_files, shards_dir, tmp_path):
    """Guards the GPT-1 mix: the logged loss is L_sft + lambda * L_lm with each term normalised by
    its own tokens."""
    out = main(sft_cfg(base_ckpt, chat_files, tmp_path / "mix", max_steps=3, lm_data=str(shards_dir), lm_coef=0.5, sample_prompts=[]))
    for r in records(out):
        if "lm_loss" in r:
            assert r["loss"] == pytest.approx(r["sft_loss"] + 0.5 * r["lm_loss"], rel=1e-5)
            assert 0 < r["lm_loss"] < 10


def test_bad_sft_configs(base_ckpt, chat_files, tmp_path):
    with pytest.raises(ValueError, match="base is required"):
        SFTConfig(data=["x"])
    with pytest.raises(ValueError, match="merge only applies to LoRA"):
        sft_cfg(base_ckpt, chat_files, tmp_path, merge=True)
    with pytest.raises(ValueError, match="lm_data and lm_coef"):
        sft_cfg(base_ckpt, chat_files, tmp_path, lm_coef=0.5)
    with pytest.raises(ValueError, match="longer than the model's context"):
        main(sft_cfg(base_ckpt, chat_files, tmp_path / "x", seq_len=4096))
    with pytest.raises(ValueError, match="not a multiple"):
        main(sft_cfg(base_ckpt, chat_files, tmp_path / "y", batch_rows=6))


# ---- the default demonstration set -------------------------------------------------------------


def test_generated_items_answer_their_question():
    """Guards generated questions and answers drifting apart (a date formatted one way in the
    question and computed another way in the answer, a wrong unit factor, an operator mix-up):
    every answer is recomputed here from the question text by an independent route."""
    import datetime
    import random
    import re

    from chatforge.data.sft_default import src_arithmetic, src_dates, src_units

    rng = random.Random(0)
    for it in src_arithmetic("en", rng, n=300):
        q, a = it.messages[0]["content"], it.messages[1]["content"]
        x, op, y = re.search(r"(\d+) (\+|-|\*|plus|minus|times|x) (\d+)", q).groups()
        want = {"+": int.__add__, "plus": int.__add__, "-": int.__sub__, "minus": int.__sub__}.get(op, int.__mul__)(int(x), int(y))
        assert a == it.meta["answer"] == str(want), q
    for it in src_arithmetic("zh", rng, n=300):
        x, op, y = re.search(r"(\d+)(加|减|乘以|乘|\+|-|×)(\d+)", it.messages[0]["content"]).groups()
        want = int(x) + int(y) if op in "加+" else int(x) - int(y) if op in "减-" else int(x) * int(y)
        assert it.meta["answer"] == str(want)
    factors = {"centimeters": 100, "grams": 1000, "seconds": 60, "inches": 12, "months": 12}
    for it in src_units("en", rng):
        m = re.search(r"(\d+) (\w+)", it.messages[0]["content"].replace("How many ", "").split(" are in ")[-1])
        small = next((s for s in factors if s in it.messages[0]["content"].split(str(m.group(1)))[0] + it.messages[0]["content"][-14:]), None)
        if small and it.messages[0]["content"].startswith("How many " + small):
            assert int(it.meta["answer"]) == int(m.group(1)) * factors[small]
    seen = {"weekday": 0, "date-add": 0}
    for it in src_dates("en", rng, n=200):
        q, a = it.messages[0]["content"], it.meta["answer"]
        date = datetime.datetime.strptime(re.search(r"[A-Z][a-z]+ \d+, \d{4}", q).group(0), "%B %d, %Y").date() if "," in q else None
        if it.meta["task"] == "weekday":
            assert a == date.strftime("%A")
            seen["weekday"] += 1
        elif it.meta["task"] == "date-add":
            k = int(re.search(r"What date is (\d+) days after", q).group(1))
            assert datetime.datetime.strptime(a, "%B %d, %Y").date() - date == datetime.timedelta(days=k)
            seen["date-add"] += 1
    assert min(seen.values()) > 50
    zh = list(src_dates("zh", rng, n=50))
    assert zh[0].key == list(src_dates("en", rng, n=50))[0].key, "the same dates in both languages share a split"


def test_split_is_stable_and_shared():
    """Guards leakage between train and held-out: the split depends on the key only."""
    from chatforge.data.sft_default import split_of

    keys = [f"arith:+:{a}:{b}" for a in range(100) for b in range(100)]
    splits = [split_of(k, 10) for k in keys]
    assert splits == [split_of(k, 10) for k in keys]
    assert 0.08 < splits.count("heldout") / len(splits) < 0.12


def fake_packages(root):
    """Minimal copies of the package files the builder reads (WordNet, GCIDE, chinese-poetry, chatterbot)."""
    import gzip

    wn = root / "wn/usr/share/wordnet"
    wn.mkdir(parents=True)
    (wn / "cntlist.rev").write_text("dog%1:05:00:: 1 42\nhappy%3:00:00:: 1 30\nrare%3:00:00:: 1 2\n")
    (wn / "index.noun").write_text("  licence line\ndog n 1 1 @ 1 1 02084071  \n")
    (wn / "index.adj").write_text("happy a 1 1 & 1 1 01148283  \nrare a 1 1 & 1 1 01000001  \n")
    (wn / "index.verb").write_text("")
    (wn / "index.adv").write_text("")
    (wn / "data.noun").write_text(
        "  licence\n02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis that has been "
        'domesticated by man; "the dog barked all night"  \n')
    (wn / "data.adj").write_text("01148283 00 a 02 happy 0 felicitous 0 000 | enjoying or showing or marked by joy or pleasure  \n"
                                 "01000001 00 a 01 rare 0 000 | not often found  \n")
    (wn / "data.verb").write_text("")
    (wn / "data.adv").write_text("")
    gc = root / "gc/usr/share/dictd"
    gc.mkdir(parents=True)
    with gzip.open(gc / "gcide.dict.dz", "wt", encoding="utf-8") as f:
        f.write('Dog \\Dog\\, n. [AS. docga.]\n   A quadruped of the genus Canis. --Shak.\n   [1913 Webster]\n\n'
                'Happy \\Hap"py\\, a. [From {Hap}.]\n   1. Favored by {hap}; lucky; fortunate.\n   [1913 Webster]\n')
    cp = root / "cp/package/dist"
    (cp / "mengxue").mkdir(parents=True)
    (cp / "quantangshi").mkdir(parents=True)
    poem = {"chapter": "靜夜思", "subchapter": None, "author": "李白", "paragraphs": ["床前明月光，疑是地上霜，", "舉頭望明月，低頭思故鄉。"]}
    (cp / "mengxue/tangshisanbaishou.json").write_text(json.dumps({"title": "唐詩三百首", "content": [{"type": "五言絕句", "content": [poem]}]}, ensure_ascii=False))
    (cp / "quantangshi/poet.tang.0.json").write_text(json.dumps([{"title": "登鸛雀樓", "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。(一作：更上)"]}], ensure_ascii=False))
    cb = root / "cb/chatterbot_corpus/data"
    (cb / "english").mkdir(parents=True)
    (cb / "english/greetings.yml").write_text("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n  - How are you?\n- - What is 1 + 1?\n  - 2\n- - Lonely\n")
    return root


def test_sources_parse_real_layouts(tmp_path):
    """Guards the package parsers: WordNet's most frequent senses of common words, GCIDE's first
    definition without etymology or citation, Tang poems in simplified script with notes
    removed, chatterbot turns alternating user/assistant with a trailing question dropped."""
    import random

    from chatforge.data.sft_default import gcide_definitions, src_chatterbot, src_tang, src_wordnet, wordnet_common

    root = fake_packages(tmp_path)
    common = wordnet_common(root / "wn")
    assert [c[0] for c in common] == ["dog", "happy"]  # "rare" is below the frequency floor
    assert common[0] == ("dog", "noun", ["domestic dog", "Canis familiaris"], "a member of the genus Canis that has been domesticated by man")
    items = list(src_wordnet(root / "wn", random.Random(0)))
    syn = next(i for i in items if i.meta["task"] == "synonym" and "dog" in i.messages[0]["content"])
    assert syn.meta["answers"] == ["domestic dog", "Canis familiaris"]
    assert list(gcide_definitions(root / "gc", {"dog", "happy"})) == [
        ("dog", "n.", "A quadruped of the genus Canis."), ("happy", "a.", "Favored by hap; lucky; fortunate.")]
    tang = list(src_tang(root / "cp", random.Random(0)))
    nxt = {i.messages[0]["content"]: i.meta["answer"] for i in tang if i.meta["task"] == "next-line"}
    assert any("床前明月光" in q and a == "疑是地上霜" for q, a in nxt.items())
    assert "更上一层楼" in nxt.values() and not any("一作" in a for a in nxt.values())
    authors = {i.messages[0]["content"]: i.meta["answer"] for i in tang if i.meta["task"] == "poem-author"}
    assert any("静夜思" in q and a == "李白" for q, a in authors.items())
    convs = [i.messages for i in src_chatterbot(root / "cb", "en")]
    assert convs == [
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
        [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}],
    ]


# ---- exact-match evaluation ----------------------------------------------------------------------


def test_exact_match_scoring():
    """Guards the scorer: normalisation forgives case, width, quotes and final punctuation but not
    extra words; `contains` does not find '8' inside '18'."""
    from chatforge.eval.tasks import TaskItem, contains, is_exact, normalize, score

    assert normalize("  Sunday. ") == "sunday" and normalize("「疑是地上霜」。") == "疑是地上霜" and normalize("１２") == "12"
    assert is_exact("Paris.", ["paris"]) and not is_exact("The answer is Paris.", ["Paris"])
    assert contains("The answer is Paris.", ["Paris"]) and not contains("It is 18.", ["8"]) and contains("答案是8。", ["8"])
    items = [TaskItem([], ["8"], "en", "arithmetic", "x"), TaskItem([], ["8"], "en", "arithmetic", "x"), TaskItem([], ["李白"], "zh", "poem-author", "x")]
    s = score(items, ["8", "It is 8.", "李白"])
    assert s["overall"] == {"n": 3, "exact": 2 / 3, "contains": 1.0}
    assert s["by_task"]["en/arithmetic"]["exact"] == 0.5 and s["by_lang"]["zh"]["exact"] == 1.0


def test_eval_end_to_end(base_ckpt, tmp_path):
    """Guards the eval pipeline: items come from metadata, the prompt stops before the answer,
    and every item gets a response through the engine."""
    from chatforge.eval.tasks import TaskEvalConfig, load_items, main as eval_main

    recs = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}],
             "metadata": {"answer": str(i + 1), "lang": "en", "task": "arithmetic"}} for i in range(6)]
    recs.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})  # no answer: ignored
    f = write_jsonl(tmp_path / "h.jsonl", recs)
    items = load_items([str(f)], max_per_task=4)
    assert len(items) == 4 and all(it.messages[-1]["role"] == "user" for it in items)
    res = eval_main(TaskEvalConfig(model=str(base_ckpt), data=[str(f)], max_new_tokens=3, batch=4, dtype="fp32", out=str(tmp_path / "r.json")))
    assert res["overall"]["n"] == 6
    assert len(json.loads((tmp_path / "r.json").read_text())["items"]) == 6


@pytest.mark.slow
def test_sft_fsdp_matches_one_process(base_ckpt, chat_files, tmp_path):
    """Guards FSDP in SFT (hidden() and head() outside forward, registered with FSDP): 2 gloo
    processes with the model sharded give 1 process's losses with accumulation, and the
    consolidated checkpoint's weights."""
    from test_reward import run_cli

    common = ["sft", "--base", str(base_ckpt), "--data", str(chat_files[0]), "--val-data", str(chat_files[1]), "--seq-len", "64",
              "--micro-batch", "2", "--batch-rows", "4", "--max-steps", "6", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "3",
              "--save-every", "3", "--log-every", "1", "--dtype", "fp32", "--device", "cpu", "--peak-flops", "1e11"]
    run_cli(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    run_cli(common + ["--out", str(tmp_path / "two"), "--fsdp", "on"], 2, tmp_path)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert_close_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_sft_fsdp_uneven_validation_share(base_ckpt, chat_files, tmp_path):
    """Guards SFT evaluation under FSDP when the held-out rows split unevenly: 5 conversations
    (one per row) in batches of 2 are 2 batches on rank 0 and 1 on rank 1, and every forward of a
    sharded model is a collective, so rank 1 runs a stand-in batch that counts nothing
    (data/loader.rank_batches) instead of leaving rank 0 waiting (a hang, here a failure after the
    timeout). The validation losses are 1 process's over the same rows, and the samples, which
    the KV-cache engine cannot make from sharded weights, come from every rank in lockstep."""
    from test_reward import run_cli

    val = write_jsonl(tmp_path / "val.jsonl", chats(5, seed=1))
    common = ["sft", "--base", str(base_ckpt), "--data", str(chat_files[0]), "--val-data", str(val), "--seq-len", "64",
              "--micro-batch", "2", "--batch-rows", "4", "--max-steps", "2", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "1",
              "--save-every", "2", "--log-every", "1", "--sample-tokens", "4", "--dtype", "fp32", "--device", "cpu", "--peak-flops", "1e11"]
    run_cli(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    err = run_cli(common + ["--out", str(tmp_path / "two"), "--fsdp", "on"], 2, tmp_path, timeout=120).stderr
    a, b = ([(r["step"], r["val_loss"]) for r in records(tmp_path / d) if "val_loss" in r] for d in ("one", "two"))
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 1, 2]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5, abs=1e-6)
    assert err.count("sample |") == 2 * len(SAMPLE_PROMPTS)  # at step 1 and at the end
