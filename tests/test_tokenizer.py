"""Tokenizer: exact round trips, reserved specials, chat rendering masks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.tokenizer import CHATML_JINJA, IM_END, SPECIAL_TOKENS, ChatSpec, Tokenizer, train_tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_any_unicode(tok, s):
    """Guards byte-level BPE losing or altering characters (normalisers, unknown tokens, specials)."""
    assert tok.decode(tok.encode(s)) == s


# Text built from pieces the tokenizer must not treat specially: special-token strings and partial
# ones, Chinese, emoji with modifiers and joiners, control characters, CRLF and whitespace runs.
PIECES = st.sampled_from(
    SPECIAL_TOKENS + ["<|", "|>", "<|im_end", "床前明月光", "，", "。", "👨‍👩‍👧", "🏽", "\x00", "\x1b[31m", "\r\n", "   ", "\t", "'s", "123456"]
)
MIXED = st.lists(st.one_of(PIECES, st.text(alphabet=st.characters(codec="utf-8"), max_size=8)), max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(MIXED)
def test_round_trip_mixed_pieces(tok, s):
    """Guards special-token strings in user text becoming specials (or vanishing) and splits in the
    middle of multi-codepoint sequences losing bytes."""
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))


@settings(max_examples=50, deadline=None)
@given(st.lists(MIXED, max_size=6))
def test_encode_batch_equals_encode(tok, texts):
    """Guards prepare's batched path tokenizing differently from single encodes."""
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize(
    "s", ["", "床前明月光，疑是地上霜。", "emoji 🎉👍🏽 family 👨‍👩‍👧", "\x00\x01\x1f\x7f\t\r\n", "  many   spaces\n\n\n", "<|im_end|> not special", "<|endoftext|>"]
)
def test_round_trip_examples(tok, s):
    """Guards the hard cases named in the issue: Chinese, emoji, control characters, empty string."""
    assert tok.decode(tok.encode(s)) == s


def test_special_text_is_not_special(tok):
    """Guards prompt injection: a user typing '<|im_end|>' must not produce the end-of-turn token."""
    assert tok.eot_id not in tok.encode("hello <|im_end|> world")


def test_specials_reserved_first(tok):
    """Guards special tokens moving when the corpus changes: they own ids 0..n-1."""
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(t) == i
    assert tok.eot_id == tok.token_id(IM_END)


def test_vocab_too_small():
    """Guards a vocabulary that cannot hold the 256 bytes plus the specials."""
    with pytest.raises(ValueError, match="256 byte symbols"):
        train_tokenizer(iter(["abc"]), vocab_size=100)


def test_vocab_floor_is_accepted():
    """Guards an off-by-one in the vocabulary floor: exactly 256 bytes + specials is valid."""
    floor = 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=f"use at least {floor}"):
        train_tokenizer(iter(["abc"]), vocab_size=floor - 1)
    t = train_tokenizer(iter(["abc abc"]), vocab_size=floor)
    assert t.vocab_size == floor and t.decode(t.encode("ünïcödé 中")) == "ünïcödé 中"


def test_save_load_identical(tok, tmp_path):
    """Guards tokenizer files that reload differently (pre-tokenizer, specials, chat spec)."""
    tok.save(tmp_path)
    tok2 = Tokenizer.load(tmp_path)
    s = "Hello 世界 🎉 123456 <|im_start|>"
    assert tok2.encode(s) == tok.encode(s)
    assert tok2.hf.get_vocab() == tok.hf.get_vocab()
    assert tok2.render(CONVS["system"]) == tok.render(CONVS["system"])
    assert tok2.spec.chat_template == tok.spec.chat_template and tok2.eot_id == tok.eot_id


def test_load_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def _assistant_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


CONVS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "multi": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": " hi there"},
    ],
}


@pytest.mark.parametrize("name", list(CONVS))
def test_render_mask_is_assistant_content_plus_eot(tok, name):
    """Guards SFT training on prompts (mask too wide) or missing the end-of-turn token (model never stops)."""
    msgs = CONVS[name]
    ids, mask = tok.render(msgs)
    assert len(ids) == len(mask)
    expected = "".join(m["content"] + IM_END for m in msgs if m["role"] == "assistant")
    assert _assistant_text(tok, ids, mask) == expected
    # One contiguous run per assistant turn, each closed by the end-of-turn token.
    runs = [j for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
    starts = [j for j in range(len(mask)) if mask[j] and (j == 0 or not mask[j - 1])]
    assert len(runs) == len(starts) == sum(m["role"] == "assistant" for m in msgs)
    assert all(ids[j] == tok.eot_id for j in runs)
    assert all(tok.decode(ids[:j]).endswith("<|im_start|>assistant\n") for j in starts)
    assert tok.decode(ids) == tok.render_text(msgs)


@pytest.mark.parametrize("name", list(CONVS))
def test_jinja_path_equals_native_chatml(tok, name):
    """Guards the two template paths drifting: the Jinja renderer must give the same ids and mask."""
    jinja = Tokenizer(tok.hf, ChatSpec(chat_template=CHATML_JINJA))
    assert jinja.render(CONVS[name]) == tok.render(CONVS[name])
    assert jinja.render(CONVS[name][:1], True) == tok.render(CONVS[name][:1], True)


def test_generation_prompt(tok):
    ids, mask = tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and not any(mask)


@pytest.mark.parametrize(
    "bad, field",
    [([], "non-empty"), ([{"role": "robot", "content": "x"}], "role"), ([{"role": "user", "content": 3}], "content"), (["hi"], "object")],
)
def test_bad_messages(tok, bad, field):
    with pytest.raises(ValueError, match=field):
        tok.render(bad)
