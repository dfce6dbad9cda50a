"""GGUF files (llama.cpp's format) <-> chatforge checkpoints, through the `gguf` package's reader,
dequantizers, quantizers and writer.

Import reads the llama and qwen2 architectures and dequantizes F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K..Q6_K to fp32; the tokenizer (tokens, merges, special tokens, chat template)
comes from the file's metadata. Export writes the llama architecture (qwen2 when the checkpoint
has q/k/v biases) with matrices in one of EXPORT_DTYPES (Q4_K and Q6_K by our own quantizers,
kquants.py); GPT-2 block checkpoints are refused
(llama.cpp's gpt2 graph has learned position embeddings and LayerNorm biases we would have to map
separately; export those with `chatforge export hf`).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import quants
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .. import checkpoint as ckpt_io
from ..model import GPT, GPTConfig
from ..tokenizer import CHATML_JINJA, GGUF_PRE, IM_END, SPLIT_PATTERN, ChatSpec, Tokenizer
from . import kquants, names

ARCHITECTURES = ("llama", "qwen2")
# Written into an import's meta.json; bump it when import output changes so cached imports of
# known models (registry.py) are redone instead of served stale.
IMPORTER_VERSION = 2
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# --dtype of `chatforge export gguf` -> (ggml tensor type, general.file_type): the types the gguf
# package quantizes to, and Q4_K / Q6_K (kquants.py; file types of llama.cpp's Q4_K_S and Q6_K).
EXPORT_DTYPES = {
    "f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
    "q4_k": ("Q4_K", 14), "q6_k": ("Q6_K", 18),
}
# Files at 6 bits or fewer keep the output layer (the token embedding when tied) at Q6_K, as
# llama.cpp's quantizer does: its rounding moves every logit.
OUTPUT_BUMPED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
# Where a row does not split into 256-weight super-blocks, K-quants fall back as llama.cpp's do.
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# tokenizer.ggml.pre -> the pre-tokenizer splits before byte-level BPE (as llama.cpp applies them).
PRE_SPLITS = {
    "gpt2": [GPT2_PATTERN],
    "default": [GPT2_PATTERN],
    "smollm": [r"\p{N}", GPT2_PATTERN],  # digits one by one, then GPT-2's pattern
    "starcoder": [r"\p{N}", GPT2_PATTERN],
    "qwen2": [QWEN2_PATTERN],
    "llama-bpe": [SPLIT_PATTERN],
    "llama3": [SPLIT_PATTERN],
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def open_reader(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # truncated or not a GGUF: the reader raises assorted errors
        raise ValueError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def check_supported(reader, source: str) -> None:
    """Refuse, before any work, files whose architecture or tensor types we cannot read."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(QUANT_TYPES))
    if bad:
        raise ValueError(f"{source}: quantization type(s) {', '.join(bad)} are not supported; supported: {', '.join(QUANT_TYPES)}")


def _f32(v) -> float:
    """GGUF stores floats as f32: 1e-5 reads back as 9.99999974e-06; keep the short decimal."""
    return float(str(np.float32(v)))


def config_from_gguf(reader, source: str) -> GPTConfig:
    check_supported(reader, source)
    arch = _field(reader, "general.architecture")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731

    def need(key: str) -> int:
        v = g(key)
        if v is None:
            raise ValueError(f"{source}: metadata key {arch}.{key} is missing")
        return int(v)

    n_head = need("attention.head_count")
    d_model = need("embedding_length")
    head_dim = int(g("attention.key_length", d_model // n_head))
    rope_dims = g("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"{source}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, head_dim={head_dim}) is not supported")
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none") and float(g("rope.scaling.factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported (plain RoPE only)")
    tensor_names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return GPTConfig(
        vocab_size=len(tokens) if tokens else need("vocab_size"),
        n_layer=need("block_count"),
        n_head=n_head,
        n_kv_head=int(g("attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=need("feed_forward_length"),
        head_dim=head_dim,
        max_seq_len=int(g("context_length", 2048)),
        block="llama",
        norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(g("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
    )


def _dequantize(t, source: str) -> np.ndarray:
    name = t.tensor_type.name
    if name not in QUANT_TYPES:  # import_gguf checks the whole file first; this guards direct callers
        raise ValueError(f"{source}: tensor {t.name} has quantization type {name}; supported: {', '.join(QUANT_TYPES)}")
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions fastest-first
    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"{source}: cannot read tensor {t.name} ({type(e).__name__}: {e}); the file may be truncated") from None
    return np.asarray(data, dtype=np.float32).reshape(shape)


def tokenizer_from_gguf(reader, source: str) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_SPLITS)}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    hf.add_special_tokens(special)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = tokens[int(eos_id)] if eos_id is not None else "<|endoftext|>"
    doc = "<|endoftext|>" if hf.token_to_id("<|endoftext|>") is not None else eos
    eot = IM_END if hf.token_to_id(IM_END) is not None else eos
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    bos = tokens[int(bos_id)] if (add_bos and bos_id is not None) else None
    template = _field(reader, "tokenizer.chat_template") or "chatml"
    return Tokenizer(hf, ChatSpec(chat_template=template, bos_token=bos, eos_token=doc, eot_token=eot, extra={"gguf_pre": pre}))


def import_gguf(path: str | Path, out: str | Path) -> Path:
    src = str(path)
    reader = open_reader(path)
    cfg = config_from_gguf(reader, src)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{src}: tensor {name!r} is missing")
        return _dequantize(tensors[name], src)

    rope_permuted = _field(reader, "general.architecture") == "llama"
    sd = {"tok_emb.weight": get("token_embd.weight"), "norm_f.weight": get("output_norm.weight")}
    for i in range(cfg.n_layer):
        b, q = f"blk.{i}.", f"blocks.{i}."
        wq, wk, wv = get(b + "attn_q.weight"), get(b + "attn_k.weight"), get(b + "attn_v.weight")
        if rope_permuted:
            wq, wk = names.gguf_unpermute(wq, cfg.n_head), names.gguf_unpermute(wk, cfg.n_kv_head)
        sd[q + "attn.qkv.weight"] = np.concatenate([wq, wk, wv])
        if cfg.qkv_bias:
            sd[q + "attn.qkv.bias"] = np.concatenate([get(b + f"attn_{x}.bias") for x in "qkv"])
        sd[q + "attn.proj.weight"] = get(b + "attn_output.weight")
        sd[q + "norm1.weight"] = get(b + "attn_norm.weight")
        sd[q + "norm2.weight"] = get(b + "ffn_norm.weight")
        sd[q + "mlp.fc.weight"] = np.concatenate([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")])
        sd[q + "mlp.proj.weight"] = get(b + "ffn_down.weight")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    with torch.device("meta"):
        model = GPT(cfg)
    ckpt_io.load_weights(model, {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}, source=src)
    tok = tokenizer_from_gguf(reader, src)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    # the block matrices' types alone (checkpoint.weight_format reads them): files keep the
    # embedding and output layer at higher precision than the blocks
    block_types = sorted({t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2})
    meta = {
        "stage": "import", "parent": None, "source": str(Path(path).resolve()), "format": "gguf",
        "architecture": _field(reader, "general.architecture"), "name": _field(reader, "general.name"), "quantization": types,
        "block_quantization": block_types, "importer": IMPORTER_VERSION,
    }
    return ckpt_io.save(out, model, tok, meta)


def tensor_type(type_name: str, cols: int, output: bool) -> str:
    """The GGML type a matrix of `cols` columns gets in a `type_name` export, by llama.cpp's rules:
    the output layer (or tied embedding) of a file at <= 6 bits at Q6_K; a K-quant whose rows do not
    split into 256-weight super-blocks at K_FALLBACK's type (Q4_K -> Q5_0, Q6_K -> Q8_0); a type
    whose 32-weight blocks do not fit the rows at F16."""
    t = "Q6_K" if output and type_name in OUTPUT_BUMPED else type_name
    if t in K_FALLBACK and cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]:
        t = K_FALLBACK[t]
    if cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0]:
        t = "F16"
    return t


def quantize_matrix(arr: np.ndarray, type_name: str) -> np.ndarray:
    """(rows, cols) fp32 -> the bytes (or f16/f32 values) of one GGUF tensor of `type_name`."""
    if type_name == "F32":
        return arr
    if type_name == "F16":
        return arr.astype(np.float16)
    if type_name == "Q4_K":
        return kquants.quantize_q4_k(arr)
    if type_name == "Q6_K":
        return kquants.quantize_q6_k(arr)
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[type_name])


def export_gguf(ckpt_dir: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write a llama.cpp-loadable GGUF; matrices in `dtype`, norms and biases in f32 (as llama.cpp
    keeps them). As llama.cpp's own quantizer does, files at 6 bits or fewer (q4_0, q4_1, q5_0,
    q5_1, q4_k, q6_k) keep the output layer (the token embedding when tied) at Q6_K, K-quants fall
    back to Q5_0 (q4_k) or Q8_0 (q6_k) for matrices whose rows are not multiples of 256 (all but
    ffn_down in SmolLM2, d_model 576), and any matrix whose rows do not split into 32-weight blocks
    is written f16 (`tensor_type`)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}")
    ck = ckpt_io.load(ckpt_dir)
    cfg, tok = ck.config, ck.tokenizer
    if cfg.block != "llama":
        raise ValueError(f"{ckpt_dir}: GGUF export writes the llama architecture; this checkpoint has {cfg.block} blocks (export it with `chatforge export hf`)")
    arch = "qwen2" if cfg.qkv_bias else "llama"
    type_name, file_type = EXPORT_DTYPES[dtype]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(Path(ckpt_dir).name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    if type_name not in ("F32", "F16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, tok, cfg.vocab_size)

    sd = {k: v.float().numpy() for k, v in ck.model.state_dict().items()}

    def put(name: str, arr: np.ndarray, matrix: bool = True, output: bool = False) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not matrix or arr.ndim == 1:
            w.add_tensor(name, arr)  # norms and biases stay f32, as llama.cpp expects
            return
        t = tensor_type(type_name, arr.shape[-1], output)
        if t in ("F32", "F16"):
            w.add_tensor(name, quantize_matrix(arr, t))
        else:  # bytes; the writer derives the logical shape from the byte shape and type
            w.add_tensor(name, quantize_matrix(arr, t), raw_dtype=gguf.GGMLQuantizationType[t])

    put("token_embd.weight", sd["tok_emb.weight"], output=cfg.tie_embeddings)
    put("output_norm.weight", sd["norm_f.weight"], matrix=False)
    if not cfg.tie_embeddings:
        put("output.weight", sd["lm_head.weight"], output=True)
    for i in range(cfg.n_layer):
        b, q = f"blk.{i}.", f"blocks.{i}."
        wq, wk, wv = names.split_qkv(torch.from_numpy(sd[q + "attn.qkv.weight"]), cfg)
        wq, wk = wq.numpy(), wk.numpy()
        if arch == "llama":
            wq, wk = names.gguf_permute(wq, cfg.n_head), names.gguf_permute(wk, cfg.n_kv_head)
        put(b + "attn_q.weight", wq)
        put(b + "attn_k.weight", wk)
        put(b + "attn_v.weight", wv.numpy())
        if cfg.qkv_bias:
            for x, bias in zip("qkv", names.split_qkv(torch.from_numpy(sd[q + "attn.qkv.bias"]), cfg)):
                put(b + f"attn_{x}.bias", bias.numpy(), matrix=False)
        put(b + "attn_output.weight", sd[q + "attn.proj.weight"])
        put(b + "attn_norm.weight", sd[q + "norm1.weight"], matrix=False)
        put(b + "ffn_norm.weight", sd[q + "norm2.weight"], matrix=False)
        gate, up = names.split_fc(torch.from_numpy(sd[q + "mlp.fc.weight"]))
        put(b + "ffn_gate.weight", gate.numpy())
        put(b + "ffn_up.weight", up.numpy())
        put(b + "ffn_down.weight", sd[q + "mlp.proj.weight"])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_tokenizer(w, tok: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges and special tokens as llama.cpp's 'gpt2' tokenizer model."""
    spec = json.loads(tok.hf.to_str())
    vocab = spec["model"]["vocab"]
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    specials = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    by_id = {i: t for t, i in {**vocab, **added}.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # padding rows of the embedding become unused control tokens
        t = by_id.get(i, f"<|pad_{i}|>")
        tokens.append(t)
        types.append(3 if (t in specials or i not in by_id) else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    pre = tok.spec.extra.get("gguf_pre", GGUF_PRE)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.eot_id)
    w.add_add_bos_token(tok.bos_id is not None)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_pad_token_id(tok.eos_id)
    w.add_chat_template(CHATML_JINJA if tok.spec.chat_template == "chatml" else tok.spec.chat_template)
