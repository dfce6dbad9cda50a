"""Hugging Face directories (config.json + *.safetensors + tokenizer.json) <-> chatforge checkpoints.

Supported: GPT-2 (`GPT2LMHeadModel`), Llama-style (`LlamaForCausalLM`, `MistralForCausalLM` without
sliding windows) and Qwen2 (`Qwen2ForCausalLM`, q/k/v biases). Exported folders load with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and are what vLLM serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from .. import checkpoint as ckpt_io
from ..config import load_json, save_json
from ..model import GPT, GPTConfig
from ..tokenizer import CHATML_JINJA, IM_END, ChatSpec, Tokenizer, _token_str
from . import names

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED = LLAMA_TYPES + ("gpt2",)


def config_from_hf(hc: dict, source: str) -> GPTConfig:
    """chatforge's config for a transformers config.json; refuses features our model would silently
    compute differently (other activations, scaled RoPE, sliding windows)."""
    mt = hc.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{source}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if mt == "gpt2":
        act = hc.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):  # chatforge's GPT-2 MLP uses tanh-approximated GELU
            raise ValueError(f"{source}: activation_function {act!r} is not supported; supported: gelu_new, gelu_pytorch_tanh")
        if hc.get("scale_attn_by_inverse_layer_idx") or not hc.get("scale_attn_weights", True):
            raise ValueError(f"{source}: non-standard attention scaling (scale_attn_*) is not supported")
        return GPTConfig(
            vocab_size=hc["vocab_size"], n_layer=hc["n_layer"], n_head=hc["n_head"], d_model=hc["n_embd"],
            d_ff=hc.get("n_inner") or 4 * hc["n_embd"], max_seq_len=hc["n_positions"], block="gpt2",
            norm_eps=hc.get("layer_norm_epsilon", 1e-5), tie_embeddings=hc.get("tie_word_embeddings", True),
        )
    # transformers < 5 writes rope_theta (+ rope_scaling); 5.x writes rope_parameters {rope_type, rope_theta}.
    rope = hc.get("rope_scaling") or hc.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE type {rope_type!r} ({rope}) is not supported (plain RoPE only)")
    if hc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hc['hidden_act']!r} is not supported; supported: silu")
    if (mt == "mistral" and hc.get("sliding_window")) or hc.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention is not supported")
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        raise ValueError(f"{source}: attention_bias/mlp_bias on all projections is not supported")
    theta = hc.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return GPTConfig(
        vocab_size=hc["vocab_size"], n_layer=hc["num_hidden_layers"], n_head=hc["num_attention_heads"],
        n_kv_head=hc.get("num_key_value_heads") or hc["num_attention_heads"], d_model=hc["hidden_size"],
        d_ff=hc["intermediate_size"], head_dim=hc.get("head_dim") or 0, max_seq_len=hc.get("max_position_embeddings", 2048),
        block="llama", norm_eps=hc.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        tie_embeddings=hc.get("tie_word_embeddings", False), qkv_bias=mt == "qwen2",
    )


def _tensor_getter(d: Path):
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors weights (PyTorch .bin files are not read: convert them to safetensors)")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                index[k] = f

    def get(name: str) -> torch.Tensor:
        if name not in index:
            alt = name.removeprefix("transformer.")
            if alt in index:
                name = alt
            else:
                raise ValueError(f"{d}: tensor {name!r} not found in the safetensors files")
        with safe_open(str(index[name]), framework="pt") as sf:
            return sf.get_tensor(name).float()

    return get


def tokenizer_from_hf(d: Path) -> Tokenizer:
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"{d}: no tokenizer.json (only fast-tokenizer folders are supported)")
    hf = HFTokenizer.from_file(str(tj))
    tc = load_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}

    template = tc.get("chat_template")
    if template is None and (d / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    eos = _token_str(tc.get("eos_token")) or "<|endoftext|>"
    doc = "<|endoftext|>" if hf.token_to_id("<|endoftext|>") is not None else eos
    eot = IM_END if hf.token_to_id(IM_END) is not None else eos
    bos = _token_str(tc.get("bos_token"))
    add_bos = tc.get("add_bos_token")
    if add_bos is None and bos is not None:  # Llama-3 style: tokenizer.json's post-processor prepends it
        add_bos = hf.encode("a", add_special_tokens=True).ids[:1] == [hf.token_to_id(bos)]
    bos = bos if add_bos else None
    keep = {k: v for k, v in tc.items() if k in ("model_max_length",)}
    return Tokenizer(hf, ChatSpec(chat_template=template or "chatml", bos_token=bos, eos_token=doc, eot_token=eot, extra=keep))


def import_hf(src: str | Path, out: str | Path) -> Path:
    d = Path(src)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d}: no config.json; expected a Hugging Face model folder")
    hc = load_json(d / "config.json")
    try:
        cfg = config_from_hf(hc, str(d / "config.json"))
    except KeyError as e:
        raise ValueError(f"{d / 'config.json'}: required key {e} is missing") from None
    get = _tensor_getter(d)
    sd = names.gpt2_to_ours(get, cfg) if cfg.block == "gpt2" else names.llama_to_ours(get, cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    ckpt_io.load_weights(model, sd, source=str(d))
    tok = tokenizer_from_hf(d)
    meta = {"stage": "import", "parent": None, "source": str(d.resolve()), "format": "hf", "architecture": hc.get("architectures", [hc["model_type"]])[0]}
    return ckpt_io.save(out, model, tok, meta)


def export_hf(ckpt_dir: str | Path, out: str | Path) -> Path:
    ck = ckpt_io.load(ckpt_dir)
    cfg = ck.config
    sd = {k: v.contiguous() for k, v in ck.model.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ck.tokenizer
    if cfg.block == "gpt2":
        hc = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }
        tensors = names.ours_to_gpt2(sd, cfg)
    else:
        mt, arch = ("qwen2", "Qwen2ForCausalLM") if cfg.qkv_bias else ("llama", "LlamaForCausalLM")
        hc = {
            "architectures": [arch], "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }
        tensors = names.ours_to_llama(sd, cfg)
    hc.update({"torch_dtype": "float32", "bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id})
    if cfg.tie_embeddings:
        # safetensors refuses shared tensors; HF re-ties the head from the config.
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_json(hc, out / "config.json")
    save_json({"eos_token_id": sorted(set(tok.stop_ids())), "bos_token_id": tok.bos_id}, out / "generation_config.json")
    tok.hf.save(str(out / "tokenizer.json"))
    tc = dict(tok.spec.extra)
    tc.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=CHATML_JINJA if tok.spec.chat_template == "chatml" else tok.spec.chat_template,
        bos_token=tok.spec.bos_token, eos_token=tok.spec.eot_token, pad_token=tok.spec.eos_token,
        add_bos_token=tok.spec.bos_token is not None, model_max_length=cfg.max_seq_len, clean_up_tokenization_spaces=False,
    )
    save_json(tc, out / "tokenizer_config.json")
    for name in ("log.jsonl", "loss.png"):
        if (Path(ckpt_dir) / name).is_file():
            shutil.copyfile(Path(ckpt_dir) / name, out / name)
    (out / "chatforge_meta.json").write_text(json.dumps(ck.meta, indent=2, ensure_ascii=False))
    return out
