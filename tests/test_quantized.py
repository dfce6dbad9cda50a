"""`chatforge quantize`: int8/int4 checkpoints (layout in checkpoint.py) load as ordinary float
weights, reproduce their codes when quantized again (so exact int8/int4 decode copies are
possible), and run in the engine; checkpoint.weight_format names the rounding a checkpoint carries."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatforge import checkpoint
from chatforge.engine import SamplingParams
from chatforge.model import GPT, GPTConfig
from chatforge.quantize import int4_groups, int8_weights
from chatforge.sample import sample_tokens


def _tiny(tok, block="llama", seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(vocab_size=576, n_layer=2, n_head=4, n_kv_head=2 if block == "llama" else 0, d_model=64,
                              max_seq_len=64, block=block, tie_embeddings=False), **kw})
    m = GPT(cfg)
    m.init_weights(seed)
    with torch.no_grad():  # init_weights zeroes some matrices and biases: make every tensor matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _by_hand(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout documented in checkpoint.py, decoded independently of checkpoint.dequantize_state."""
    out = {}
    for k, v in stored.items():
        if k.endswith((".scale", ".min")):
            continue
        if v.dtype == torch.int8:
            out[k] = v.float() * stored[k + ".scale"].float()[:, None]
        elif v.dtype == torch.uint8:
            q = torch.empty(v.shape[0], v.shape[1] * 2)
            q[:, 0::2], q[:, 1::2] = (v & 15).float(), (v >> 4).float()
            s = stored[k + ".scale"].float().repeat_interleave(32, dim=1)
            lo = stored[k + ".min"].float().repeat_interleave(32, dim=1)
            out[k] = q * s + lo
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_quantize_checkpoint_layout_and_codes(tmp_path, tok, fmt, block):
    """Guards the stored layout (dtypes, which tensors stay fp32, the int8 embedding and output layer
    of int4 files), dequantization on load, the error bound of each format, and codes reproduced
    exactly when the loaded weights are quantized again (the property exact decode copies need)."""
    m = _tiny(tok, block, d_ff=96 if block == "llama" else 0)  # llama: mlp.proj has in=96, a multiple of 32
    checkpoint.save(tmp_path / "ck", m, tok, {"stage": "test"})
    out = checkpoint.quantize_checkpoint(tmp_path / "ck", tmp_path / "q", fmt)
    stored = load_file(str(out / "model.safetensors"))
    ck = checkpoint.load(out)
    assert ck.meta["weights"] == fmt and ck.meta["stage"] == "quantize" and checkpoint.weight_format(out) == fmt
    assert checkpoint.weight_format(tmp_path / "ck") is None
    loaded = ck.model.state_dict()
    assert all(v.dtype == torch.float32 for v in loaded.values())
    for k, v in m.state_dict().items():
        if v.ndim == 1 or k == "pos_emb.weight":
            assert stored[k].dtype == torch.float32 and torch.equal(loaded[k], v), k
            continue
        w = loaded[k]
        assert torch.equal(w, _by_hand(stored)[k]), k
        if fmt == "int4" and k.startswith("blocks."):
            assert stored[k].dtype == torch.uint8 and stored[k].shape == (v.shape[0], v.shape[1] // 2), k
            q, scale, lo = int4_groups(w)
            q0 = torch.stack([stored[k] & 15, stored[k] >> 4], dim=-1).reshape(v.shape)
            assert torch.equal(q, q0), k  # the engine's int4 copies recompute exactly these codes
            step = ((v.reshape(v.shape[0], -1, 32).amax(-1) - v.reshape(v.shape[0], -1, 32).amin(-1)) / 15)
            err = (w - v).abs().reshape(v.shape[0], -1, 32).amax(-1)
            assert (err <= step * 0.5 + 1e-3 * v.abs().max()).all(), k  # half a step, plus fp16 scales
        else:  # int8, and the embedding/output layer of an int4 file
            assert stored[k].dtype == torch.int8, k
            q, scale = int8_weights(w)
            assert torch.equal(q, stored[k]), k
            assert ((w - v).abs() <= v.abs().amax(1, keepdim=True) / 127 / 2 * 1.001).all(), k


def test_quantized_engine_and_cli(tmp_path, tok, capsys):
    """Guards a quantized checkpoint being an ordinary one for the engine and the CLI: greedy tokens
    equal a plain recompute with the dequantized fp32 weights, the int4 file is smaller than int8,
    and bad input exits 2 with a message naming it."""
    from chatforge.chat import load_engine
    from chatforge.cli import main

    checkpoint.save(tmp_path / "ck", _tiny(tok, d_ff=128), tok, {})
    sizes = {}
    for fmt in ("int8", "int4"):
        assert main(["quantize", str(tmp_path / "ck"), "--to", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert f"({fmt})" in capsys.readouterr().out
        sizes[fmt] = (tmp_path / fmt / "model.safetensors").stat().st_size
        ref_model = _tiny(tok, d_ff=128)
        ref_model.load_state_dict(_by_hand(load_file(str(tmp_path / fmt / "model.safetensors"))))
        prompt = tok.encode("The quick brown fox 床前明月光")
        ref = sample_tokens(ref_model, prompt, 12, temperature=0)
        engine = load_engine(str(tmp_path / fmt), dtype="fp32", decode_weights="same")
        sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
        assert [ev.token_id for ev in engine.generate([prompt], sp) if ev.token_id is not None] == ref, fmt
        assert checkpoint.exact_int4(tmp_path / fmt) == (fmt == "int4")
    # the default mode decodes an int4 checkpoint on int4 copies (the same weights): the same tokens
    engine = load_engine(str(tmp_path / "int4"))
    assert engine.fast.decode == torch.quint4x2
    assert [ev.token_id for ev in engine.generate([prompt], sp) if ev.token_id is not None] == ref
    assert sizes["int4"] < sizes["int8"] < 0.3 * (tmp_path / "ck" / "model.safetensors").stat().st_size

    assert main(["quantize", str(tmp_path / "nope"), "--to", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    stored = load_file(str(tmp_path / "int4" / "model.safetensors"))
    del stored["blocks.0.attn.qkv.weight.min"]
    save_file(stored, str(tmp_path / "int4" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: int4 matrix blocks.0.attn.qkv.weight \(128, 32\) needs "
                                         r"blocks.0.attn.qkv.weight.scale and blocks.0.attn.qkv.weight.min of shape \(128, 2\)"):
        checkpoint.load(tmp_path / "int4")
    with pytest.raises(ValueError, match="weights='int3'; expected one of int8, int4"):
        checkpoint.quantize_state({}, "int3")


def test_weight_format_of_gguf_imports(tmp_path, tok):
    """Guards `weight_format` on GGUF imports: all-Q4_0/Q4_1 block matrices are "int4" (whatever the
    embedding/output layer), all-Q8_0 "int8", anything else None; older import metas (one type
    list for the whole file, as the cached SmolLM2 import has) are read the same way."""
    from chatforge.convert.gguf import export_gguf, import_gguf

    checkpoint.save(tmp_path / "ck", _tiny(tok), tok, {})
    for dtype, fmt in (("q4_0", "int4"), ("q4_1", "int4"), ("q8_0", "int8"), ("f16", None)):
        f = export_gguf(tmp_path / "ck", tmp_path / f"{dtype}.gguf", dtype)
        assert checkpoint.weight_format(import_gguf(f, tmp_path / dtype)) == fmt, dtype
    old = {"format": "gguf"}
    assert checkpoint.weight_format({**old, "quantization": ["F32", "Q4_1", "Q8_0"]}) == "int4"  # SmolLM2's file
    assert checkpoint.weight_format({**old, "quantization": ["F32", "Q8_0"]}) == "int8"
    assert checkpoint.weight_format({**old, "quantization": ["F32", "Q4_K", "Q6_K"]}) is None
    assert checkpoint.weight_format({**old, "quantization": ["F32", "Q4_1", "Q8_0"], "block_quantization": ["Q4_1", "Q6_K"]}) is None
    # int4 copies reproduce Q4_1 blocks (a minimum and a scale per group), not Q4_0's symmetric ones
    assert checkpoint.exact_int4({"format": "gguf", "block_quantization": ["Q4_1"]})
    assert not checkpoint.exact_int4({"format": "gguf", "block_quantization": ["Q4_0"]})
    assert not checkpoint.exact_int4({**old, "quantization": ["F32", "Q4_1", "Q8_0"]})  # older imports: types not per matrix
