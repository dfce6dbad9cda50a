"""Import/export against Hugging Face transformers (the reference) on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge import checkpoint  # noqa: E402
from chatforge.convert.gguf import export_gguf, import_gguf  # noqa: E402
from chatforge.convert.hf import export_hf, import_hf  # noqa: E402
from chatforge.model import GPT, GPTConfig  # noqa: E402


def _hf_tiny(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():  # random biases so a dropped q/k/v bias would show
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return m


def _hf_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_hf_import_logit_parity(tmp_path, tok, kind):
    """Guards name mapping, Conv1D transposes, fused q|k|v and gate|up, Qwen2 biases, RoPE layout."""
    ref = _hf_tiny(kind, tok.vocab_size)
    ref.save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    ck = checkpoint.load(import_hf(tmp_path / "hf", tmp_path / "ck"))
    ids = torch.tensor([tok.encode("The capital of France is Paris. 床前明月光")])
    ours = ck.model(ids)
    theirs = _hf_logits(ref, ids)
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("block", ["llama", "gpt2"])
def test_round_trip_hf(tmp_path, tok, block):
    """Guards export_hf writing a folder transformers misreads, and import undoing it exactly."""
    cfg = GPTConfig(vocab_size=576, n_layer=2, n_head=4, n_kv_head=2 if block == "llama" else 0, d_model=32, max_seq_len=64, block=block)
    m = GPT(cfg)
    m.init_weights(3)
    checkpoint.save(tmp_path / "ck", m, tok, {"stage": "test"})
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello 世界 42"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        base = m.eval()(ids)
        assert (base - _hf_logits(hf, ids)).abs().max() < 1e-4
        back = checkpoint.load(import_hf(tmp_path / "hf", tmp_path / "ck2"))
        assert (back.model(ids) - base).abs().max() < 1e-5
    assert back.tokenizer.render([{"role": "user", "content": "hi"}], True) == tok.render([{"role": "user", "content": "hi"}], True)


def test_round_trip_gguf(tmp_path, tok):
    """Guards the GGUF q/k permutation, tokenizer metadata and f16/q8_0 tensors."""
    cfg = GPTConfig(vocab_size=576, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, tie_embeddings=False)
    m = GPT(cfg)
    m.init_weights(4)
    checkpoint.save(tmp_path / "ck", m, tok, {})
    ids = torch.tensor([tok.encode("round trip 往返 🎉")])
    with torch.no_grad():
        base = m.eval()(ids)
        for dtype, tol in (("f16", 2e-3), ("q8_0", 3e-2)):
            f = export_gguf(tmp_path / "ck", tmp_path / f"m-{dtype}.gguf", dtype)
            back = checkpoint.load(import_gguf(f, tmp_path / f"back-{dtype}"))
            assert (back.model(ids) - base).abs().max() < tol, dtype
            assert back.tokenizer.encode("round trip 往返 🎉 123") == tok.encode("round trip 往返 🎉 123")
            assert back.tokenizer.eot_id == tok.eot_id


def test_gguf_refuses_gpt2_blocks(tmp_path, tok):
    cfg = GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=16, max_seq_len=16, block="gpt2")
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    with pytest.raises(ValueError, match="llama architecture"):
        export_gguf(tmp_path / "ck", tmp_path / "x.gguf")


def test_gguf_bad_inputs(tmp_path, tok):
    """Guards unsupported architectures and truncated files failing with tracebacks instead of messages."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "neox.gguf"), "gptneox")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gptneox' is not supported; supported: llama, qwen2"):
        import_gguf(tmp_path / "neox.gguf", tmp_path / "o")

    cfg = GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / "ok.gguf")
    data = f.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
        import_gguf(tmp_path / "junk.gguf", tmp_path / "o3")


def test_hf_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        import_hf(tmp_path, tmp_path / "o")


def test_llama_cpp_loads_export(tmp_path, tok):
    """Guards GGUF exports that llama.cpp refuses or reads differently (metadata, tokenizer, q/k order)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (a benchmark dependency; builds from source)")
    cfg = GPTConfig(vocab_size=576, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)
    m = GPT(cfg)
    m.init_weights(5)
    checkpoint.save(tmp_path / "ck", m, tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(f), n_threads=2, n_ctx=64, logits_all=True, verbose=False)
    text = "Hello 世界 12345 🎉"
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = m.eval()(torch.tensor([ids]))[0]
    assert (ours - theirs).abs().max() < 5e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
