"""Byte-level BPE tokenizer and THE chat template.

Why HF `tokenizers` (not rustbpe + tiktoken): one library trains a byte-level BPE fast (Rust,
multi-threaded), encodes it, and reads/writes the ecosystem's `tokenizer.json`, so a tokenizer
chatforge trains and a tokenizer imported from SmolLM2 or Qwen2 are the same kind of object, and an
exported checkpoint is readable by transformers, vLLM and llama.cpp's converters. rustbpe only
trains; encoding would then need a second library and a second file format.

A tokenizer directory holds `tokenizer.json` (the HF format) and `tokenizer_config.json`
(HF's file name; chatforge reads `chat_template`, `bos_token`, `eos_token`, `eot_token`).

`render(messages, add_generation_prompt) -> (ids, loss_mask)` is the only code that knows a chat
format. SFT, the reward model, PPO, the engine and the server all call it. Templates:
- "chatml": `<|im_start|>{role}\\n{content}<|im_end|>\\n`, chatforge's own and the format of
  SmolLM2/Qwen; built natively, so the loss mask is exact by construction;
- any other string is a Jinja template declared by an imported model (HF's `chat_template`),
  rendered in a sandbox; the loss mask comes from rendering growing prefixes of the conversation.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOT_DOC = "<|endoftext|>"  # separates documents in pretraining shards
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
N_RESERVED = 8  # spare special tokens so later features need no new vocabulary
SPECIAL_TOKENS = [EOT_DOC, IM_START, IM_END] + [f"<|reserved_{i}|>" for i in range(N_RESERVED)]
ROLES = ("system", "user", "assistant")

# Pre-tokenisation of GPT-4's cl100k (also Llama 3's, "llama-bpe" in GGUF files, so exported
# models tokenise identically in llama.cpp): letter runs (a run of Han characters is one "word",
# which BPE then splits), numbers in groups of at most 3 digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
GGUF_PRE = "llama-bpe"  # the name llama.cpp knows SPLIT_PATTERN by

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ChatSpec:
    """What the tokenizer needs to know beyond tokenizer.json (stored as tokenizer_config.json)."""

    chat_template: str = "chatml"  # "chatml" or a Jinja template string from an imported model
    bos_token: str | None = None  # prepended to every document / conversation when set (Llama 2 style)
    eos_token: str = EOT_DOC  # end of a document
    eot_token: str = IM_END  # end of an assistant turn: generation stops here
    extra: dict = field(default_factory=dict)  # other keys of an imported tokenizer_config.json, kept verbatim


def check_messages(messages: object, where: str = "messages") -> list[dict]:
    """Validate a chat: a non-empty list of {"role", "content"} with known roles and string content."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role: {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
    return messages


class Tokenizer:
    """A byte-level BPE tokenizer with a chat template. Text in user content is never parsed for
    special tokens: typing "<|im_end|>" into a chat cannot end a turn."""

    def __init__(self, hf: HFTokenizer, spec: ChatSpec | None = None):
        self.hf = hf
        self.spec = spec or ChatSpec()
        self._plain = HFTokenizer.from_str(hf.to_str())  # same vocabulary, special tokens read as text
        self._plain.encode_special_tokens = True
        for name in ("eos_token", "eot_token"):
            tok = getattr(self.spec, name)
            if self.hf.token_to_id(tok) is None:
                raise ValueError(f"tokenizer: {name} {tok!r} is not in the vocabulary")
        if self.spec.bos_token is not None and self.hf.token_to_id(self.spec.bos_token) is None:
            raise ValueError(f"tokenizer: bos_token {self.spec.bos_token!r} is not in the vocabulary")

    # ---- basic encode / decode -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def eos_id(self) -> int:
        return self.token_id(self.spec.eos_token)

    @property
    def eot_id(self) -> int:
        return self.token_id(self.spec.eot_token)

    @property
    def bos_id(self) -> int | None:
        return None if self.spec.bos_token is None else self.token_id(self.spec.bos_token)

    def stop_ids(self) -> list[int]:
        """Tokens that end a generation: end of turn and end of document."""
        return sorted({self.eot_id, self.eos_id})

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings inside `text` are encoded as ordinary text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw UTF-8 bytes of one token (OpenAI's logprob `bytes`), also for a token that is
        half a character, which `decode` would turn into U+FFFD."""
        piece = self.hf.id_to_token(token_id)
        table = byte_decoder()
        if piece is not None and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.decode([token_id]).encode("utf-8"))

    # ---- chat ------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask that is 1 exactly on assistant content and
        the end-of-turn token that closes it (what SFT trains on), 0 elsewhere."""
        check_messages(messages)
        if self.spec.chat_template == "chatml":
            return self._render_chatml(messages, add_generation_prompt)
        return self._render_jinja(messages, add_generation_prompt)

    def _render_chatml(self, messages, add_generation_prompt):
        ids: list[int] = [] if self.bos_id is None else [self.bos_id]
        mask: list[int] = [0] * len(ids)
        start, end, nl = self.token_id(IM_START), self.token_id(IM_END), self.encode("\n")
        for m in messages:
            head = m["role"] + "\n"
            # Header and content are one text segment so ids equal the reference tokenizer's on the
            # whole rendered string; offsets tell which tokens are content.
            enc = self._plain.encode(head + m["content"], add_special_tokens=False)
            is_asst = int(m["role"] == "assistant")
            ids.append(start)
            mask.append(0)
            for tid, (a, _) in zip(enc.ids, enc.offsets):
                ids.append(tid)
                mask.append(is_asst if a >= len(head) else 0)
            ids.append(end)
            mask.append(is_asst)
            ids += nl
            mask += [0] * len(nl)
        if add_generation_prompt:
            gen = [start] + self.encode("assistant\n")
            ids += gen
            mask += [0] * len(gen)
        return ids, mask

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the template's text (for display and for Jinja templates)."""
        check_messages(messages)
        template = CHATML_JINJA if self.spec.chat_template == "chatml" else self.spec.chat_template
        return _compiled_template(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.spec.bos_token or "",
            eos_token=self.spec.eos_token,
        )

    def _render_jinja(self, messages, add_generation_prompt):
        text = self.render_text(messages, add_generation_prompt)
        # Assistant spans: the characters that message i adds after the prompt that precedes it.
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_text(messages[:i], add_generation_prompt=True) if i else ""
            after = self.render_text(messages[: i + 1])
            if not text.startswith(after) or not after.startswith(before):
                raise ValueError("chat template is not prefix-stable; cannot derive the assistant loss mask")
            spans.append((len(before), len(after.rstrip("\n"))))
        enc = self.hf.encode(text, add_special_tokens=False)  # template text: special tokens are real
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
        return enc.ids, mask

    # ---- files -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / "tokenizer.json"))
        cfg = dict(self.spec.extra)
        cfg.update(
            chat_template=self.spec.chat_template,
            bos_token=self.spec.bos_token,
            eos_token=self.spec.eos_token,
            eot_token=self.spec.eot_token,
        )
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: no tokenizer.json here (train one with `chatforge tokenizer train`)")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error names the problem, not the file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        spec = ChatSpec()
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            known = {"chat_template", "bos_token", "eos_token", "eot_token"}
            spec = ChatSpec(
                chat_template=cfg.get("chat_template") or "chatml",
                bos_token=_token_str(cfg.get("bos_token")),
                eos_token=_token_str(cfg.get("eos_token")) or EOT_DOC,
                eot_token=_token_str(cfg.get("eot_token")) or _token_str(cfg.get("eos_token")) or IM_END,
                extra={k: v for k, v in cfg.items() if k not in known},
            )
        return cls(hf, spec)


def _token_str(v) -> str | None:
    """HF configs store special tokens as strings or as {"content": ...} objects."""
    if isinstance(v, dict):
        return v.get("content")
    return v


@functools.cache
def byte_decoder() -> dict[str, int]:
    """Printable character -> byte: the inverse of the GPT-2 byte table that byte-level BPE
    vocabularies spell their tokens in (bytes that print as themselves keep their character; the
    others map to 256, 257, ... in byte order)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    """Compiling a template takes milliseconds; SFT renders each conversation several times."""
    return _jinja_env().from_string(template)


def _jinja_env():
    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = raise_exception
    return env


def empty_bpe() -> HFTokenizer:
    """An untrained byte-level BPE with chatforge's pre-tokeniser and decoder."""
    tok = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts, with chatforge's special tokens reserved
    at ids 0..len(SPECIAL_TOKENS)-1 and all 256 byte symbols in the vocabulary (so every string
    encodes, and decodes back exactly)."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the 256 byte symbols + {len(SPECIAL_TOKENS)} special tokens; use at least {floor}"
        )
    tok = empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, ChatSpec())
