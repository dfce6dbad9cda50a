"""eval fidelity: every inference mode measured against the fp32 reference; the default mode within bounds."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge import checkpoint, dtypes
from chatforge.engine import Engine, SamplingParams
from chatforge.engine.cache import native_decode_attention
from chatforge.eval import fidelity
from chatforge.model import GPT, GPTConfig

from conftest import EN, ZH, corpus_docs

# The default inference mode must stay this close to fp32 (issue: mean KL <= 0.005 nats, 24-token greedy agreement >= 95%).
MAX_MEAN_KLD, MIN_AGREE24 = 0.005, 0.95


def sharp_model(tok, seed=0) -> GPT:
    """A tiny llama-block model scaled so that its next-token distributions resemble a trained
    model's (entropy ~3 nats, bf16 rounding flips ~3% of top-1 tokens): a freshly initialised
    model's are nearly uniform and would pass any bound."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256, tie_embeddings=False)
    m = GPT(cfg)
    m.init_weights(seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
        for b in m.blocks:
            b.mlp.proj.weight.mul_(4)
            b.attn.proj.weight.mul_(4)
    return m.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("fidelity")
    ck = checkpoint.save(root / "ckpt", sharp_model(tok), tok, {"stage": "test"})
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in corpus_docs(200, seed=3)), encoding="utf-8")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i, q in enumerate(EN + ZH):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(i)}],
                                "metadata": {"answer": str(i), "lang": "zh" if q in ZH else "en", "task": f"t{i % 3}"}},
                               ensure_ascii=False) + "\n")
    return ck, text, prompts


@pytest.mark.parametrize("kv_cache", ["same", "auto"])
def test_score_decode_path_is_what_decode_steps_compute(tok, kv_cache):
    """Guards Engine.score(decode_path=True) against measuring something other than the decode
    steps: the engine's own greedy tokens, teacher-forced, are the argmax of that path's logits and
    their logprobs match, with bf16 decode copies whose rounding differs from the prefill path, and
    with keys and values kept in fp16 (auto, where the project's kernels are built) or not."""
    m = sharp_model(tok)
    eng = Engine(m, tok, max_batch=1, decode_weights="bf16", kv_cache=kv_cache)
    prompt = tok.encode("The")  # short: nearly every key/value comes from a decode step
    out, lps = [], []
    for ev in eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=True)):
        out.append(ev.token_id)
        lps.append(ev.logprob)
    logits = eng.score(torch.tensor([prompt + out]), decode_path=True)[0]
    lp = torch.log_softmax(logits, -1)
    steps = range(len(prompt), len(prompt) + len(out) - 1)  # decode steps (the first token comes from the prefill)
    assert [int(logits[t].argmax()) for t in steps] == out[1:]
    prefill = eng.score(torch.tensor([prompt + out]))[0]
    assert torch.allclose(prefill, m(torch.tensor([prompt + out]))[0], atol=1e-4 if eng.kv_dtype == torch.float32 else 2e-2)
    # The engine's decode steps attended to the prompt's keys from the (fp32) prefill, score's
    # decode path to bf16-copy keys everywhere: close, but the prefill path must be much further.
    err = lambda lp: max(abs(float(lp[t, out[i + 1]]) - lps[i + 1]) for i, t in enumerate(steps))
    assert err(lp) < 0.25 * err(torch.log_softmax(prefill, -1))


def test_fidelity_table_and_default_mode_bounds(setup, tmp_path, capsys):
    """The table has a row per mode with the bounds' quantities; the default mode ("auto") is
    within the bounds; bf16 activations move this model measurably; the JSON holds the answers."""
    ck, text, prompts = setup
    cfg = fidelity.FidelityConfig(model=str(ck), text=[str(text)], prompts=[str(prompts)], modes=["fp32", "bf16", "fp32+int8", "auto"],
                                  min_tokens=1500, window=128, n_prompts=9, max_new_tokens=32, speed_tokens=8, out=str(tmp_path / "f.json"))
    result = fidelity.main(cfg)
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"fp32 reference", "fp32", "bf16", "fp32+int8", "auto"}
    for r in rows.values():
        assert {"mean_kld", "p99_kld", "top1", "agree24", "agree32", "exact", "decode_tok_s"} <= set(r)
    assert rows["fp32"]["mean_kld"] < 1e-6 and rows["fp32"]["agree32"] == 1.0  # packed fp32: same arithmetic up to summation order
    assert rows["bf16"]["mean_kld"] > 1e-4  # the test model is sensitive enough to see rounding
    assert set(rows["fp32+int8"]["paths"]) == {"prefill", "decode"}  # decode copies are measured on the decode path
    assert rows["fp32+int8"]["paths"]["decode"]["mean_kld"] > rows["fp32+int8"]["paths"]["prefill"]["mean_kld"]
    if native_decode_attention(torch.device("cpu"), torch.float32):  # copies on the CPU's fp32 path keep an fp16 cache
        assert "fp16 keys and values" in rows["fp32+int8"]["describe"] and "fp16 keys" not in rows["fp32"]["describe"]
    auto = rows["auto"]
    assert auto["mean_kld"] <= MAX_MEAN_KLD and auto["agree24"] >= MIN_AGREE24
    saved = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
    assert saved["tokens"] >= 1500 and len(saved["reference_answers"]) == 9 and len(saved["rows"][1]["answers"]) == 9
    assert "| auto (default) |" in capsys.readouterr().out


def test_unavailable_mode_is_a_row_not_a_crash(setup, monkeypatch):
    """A mode whose kernel this machine lacks is reported as unavailable, and the rest still run."""
    ck, text, prompts = setup
    import chatforge.quantize as q

    def no_kernel(fmt, device):
        raise ValueError(f"torch has no {fmt} kernel here")

    monkeypatch.setattr(q, "check_kernel", no_kernel)
    cfg = fidelity.FidelityConfig(model=str(ck), text=[str(text)], prompts=[str(prompts)], modes=["fp32+int4", "fp32"],
                                  min_tokens=300, window=64, n_prompts=3, max_new_tokens=24, speed_tokens=4)
    rows = {r["mode"]: r for r in fidelity.main(cfg)["rows"]}
    assert "int4 kernel" in rows["fp32+int4"]["unavailable"] and "mean_kld" in rows["fp32"]


def test_bad_input_names_it(setup, tmp_path, tok):
    ck, text, prompts = setup
    with pytest.raises(ValueError, match="unknown fidelity mode 'int3'"):
        fidelity.FidelityConfig(model=str(ck), modes=["int3"])
    fidelity.FidelityConfig(model=str(ck), modes=["auto+fp32kv", "fp32+int4+fp32kv+compiled", "auto+compiled"])
    with pytest.raises(ValueError, match="unknown fidelity mode 'auto\\+compiled\\+fp32kv'"):
        fidelity.FidelityConfig(model=str(ck), modes=["auto+compiled+fp32kv"])
    with pytest.raises(ValueError, match="fewer than --min-tokens 100000"):
        fidelity.main(fidelity.FidelityConfig(model=str(ck), text=[str(text)], prompts=[str(prompts)], min_tokens=100000, window=64))
    short = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="missing.txt: no such file"):
        fidelity.main(fidelity.FidelityConfig(model=str(ck), text=[str(short)], prompts=[str(prompts)]))
    from chatforge.tokenizer import train_tokenizer

    other_tok = train_tokenizer(iter(["completely different words here"] * 50 + corpus_docs(20)), vocab_size=300)
    other = checkpoint.save(tmp_path / "other", sharp_model(other_tok), other_tok, {"stage": "test"})
    with pytest.raises(ValueError, match="tokenizer or vocabulary differs"):
        fidelity.main(fidelity.FidelityConfig(model=str(ck), text=[str(text)], prompts=[str(prompts)], modes=[f"ckpt:{other}"],
                                              min_tokens=300, window=64, n_prompts=3, max_new_tokens=24))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_emulated_quantized_linear_is_the_kernel(fmt, act):
    """Guards the decode-path scoring of int8/int4 copies (an fp32 matmul on their dequantized
    weights, since the kernels crawl at thousands of rows) against computing something else."""
    from chatforge import quantize as q

    torch.manual_seed(0)
    w, b, x = torch.randn(64, 96) * 0.05, torch.randn(64) * 0.1, torch.randn(5, 96)
    if fmt == "int8":
        qw, scale = q.int8_weights(w)
        kernel = q.int8_linear(x, qw, scale.to(act), b)
        deq = q.int8_dequantized(w, act)
    else:
        packed, sz = q.int4_weights(w)
        kernel = q.int4_linear(x, packed, sz.to(act), b)
        deq = q.int4_dequantized(w, act)
    emulated = q.emulated_linear(x, deq, b, act)
    tol = 1e-5 if act == torch.float32 else 1e-2  # bf16 outputs: one rounding step apart at most
    assert (kernel - emulated).abs().max() <= tol * kernel.abs().max()
    assert (deq - w).abs().max() < (0.05 if fmt == "int4" else 0.01) * w.abs().max() * 4
