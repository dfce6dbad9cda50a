"""SFT throughput: chatforge's SFT step vs TRL's SFTTrainer, same tiny Llama, data and batch.

Both train the same Llama config (chatforge's GPT and HF's LlamaForCausalLM, mapped field by
field) from the same init on the same single-turn conversations, loss on the answer only, with
fp32 weights + bf16 autocast (or fp32 where the CPU has no native bf16: --dtype), AdamW, grad
clipping, 2 threads, in one process. Two layouts:
- padded: one conversation per row, padded to the longest in the batch (TRL's default);
- packed: conversations packed into rows of --seq tokens without attention across them
  (chatforge: block-diagonal mask; TRL: packing=True, BFD, position ids, which transformers
  turns into the same block-diagonal mask for sdpa).
Throughput counts real (non-padding) tokens, from each system's own batches. Rounds alternate
(chatforge, TRL, chatforge, TRL...) so machine noise hits both; the median round counts.

Data: the default SFT set (`chatforge data sft-default`) when built, else a generated arithmetic
set; the tokenizer is a byte-level BPE trained here on the same text.
Run: python benchmarks/sft_throughput.py [--size cpu-10m] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from train_throughput import hf_model  # one field-by-field Llama mapping (a script's folder is on sys.path)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    from chatforge.data.chat import read_conversations
    from chatforge.data.sft_default import default_sft_dir

    d = default_sft_dir() / "train"
    if d.is_dir():
        convs = [c.messages for c in read_conversations([d]) if len(c.messages) == 2]
    else:
        rng = random.Random(seed)
        convs = []
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            convs.append([{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
    random.Random(seed).shuffle(convs)
    return convs[:n]


def hf_tokenizer(tok):
    """The same BPE as a transformers tokenizer with the same ChatML template (TRL needs one)."""
    from transformers import PreTrainedTokenizerFast

    from chatforge.tokenizer import CHATML_JINJA, EOT_DOC, IM_END

    t = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=IM_END, pad_token=EOT_DOC)
    t.chat_template = CHATML_JINJA
    return t


class ChatforgeRunner:
    def __init__(self, model, data, seq, batch, pack, lr, dtype):
        from chatforge.data.chat import ChatBatches
        from chatforge.train import common as C
        from chatforge.train.sft import SFTConfig, SFTLoss

        self.C = C
        self.module = SFTLoss(model, None)
        self.opt = C.make_optimizer(model, lr, 0.0)
        self.batches = ChatBatches(data, seq, pack, batch, 1, seed=0)
        self.cfg = SFTConfig(base="-", data=["-"], dtype=dtype, grad_clip=1.0)
        self.dist = C.Dist()
        self.step = 0

    def run(self, steps: int) -> tuple[float, int]:
        from chatforge.train.sft import step_with_mix

        tokens = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y, *rest = self.batches.get(self.step, 0)
            pos, mask = rest if rest else (None, None)
            step_with_mix(self.module, [(x, y, pos, mask, None, None)], self.opt, self.dist, self.cfg)
            tokens += self.batches.positions(self.step, 0)
            self.step += 1
        return time.perf_counter() - t0, tokens


class TRLRunner:
    def __init__(self, model, tokenizer, convs, seq, batch, pack, lr, out, dtype):
        import datasets
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        datasets.disable_progress_bars()
        ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
        self.args = SFTConfig(
            output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=lr,
            weight_decay=0.0, max_grad_norm=1.0, max_length=seq, packing=pack, bf16=dtype == "bf16", use_cpu=True,
            logging_steps=10_000, save_strategy="no", report_to="none", dataloader_num_workers=0, max_steps=1,
            lr_scheduler_type="constant", seed=0, dataset_num_proc=1, disable_tqdm=True,
            gradient_checkpointing=False,  # TRL's SFTConfig turns it on by default; chatforge does not recompute
        )
        self.trainer = SFTTrainer(model=model, args=self.args, train_dataset=ds, processing_class=tokenizer)
        self.counts: list[int] = []
        collate = self.trainer.data_collator

        def counting(features):
            batch = collate(features)
            # Real tokens: attention_mask when padded; every position of a packed (padding-free) row.
            am = batch.get("attention_mask")
            self.counts.append(int(am.sum()) if am is not None else int(batch["input_ids"].numel()))
            return batch

        self.trainer.data_collator = counting

    def run(self, steps: int) -> tuple[float, int]:
        """Time `steps` optimizer steps of a train() call: the clock starts at the end of its
        first step (which builds the optimizer and dataloader) and stops at the end of the last."""
        from transformers import TrainerCallback

        self.args.max_steps = steps + 1
        self.counts.clear()
        marks: list[float] = []

        class Mark(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                marks.append(time.perf_counter())

        m = Mark()
        self.trainer.add_callback(m)
        self.trainer.train()
        self.trainer.remove_callback(m)
        # One collated batch per step; the batches of steps 2..steps+1 are the timed ones.
        return marks[-1] - marks[0], sum(self.counts[1 : steps + 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="cpu-10m")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--seq", type=int, default=256, help="row length (packing) and max length")
    ap.add_argument("--conversations", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=["padded", "packed"])
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="autocast dtype for both; auto = bf16 where the CPU runs it natively (dtypes.py), else fp32")
    a = ap.parse_args()
    from chatforge import dtypes

    a.dtype = dtypes.resolve(a.dtype)
    torch.set_num_threads(a.threads)

    import tempfile

    from chatforge.data.chat import Conversation, tokenize
    from chatforge.model import GPT, preset
    from chatforge.tokenizer import train_tokenizer

    convs = conversations(a.conversations)
    texts = [m["content"] for c in convs for m in c]
    tok = train_tokenizer(iter(texts), a.vocab)
    cfg = preset(a.size, vocab_size=64 * ((tok.vocab_size + 63) // 64), max_seq_len=a.seq)
    data = tokenize([Conversation(c, "bench") for c in convs], tok, a.seq + 1)
    print(f"{len(convs)} conversations, {data.tokens:,} tokens ({data.tokens / len(convs):.0f}/conversation), "
          f"model {a.size} (L{cfg.n_layer} d{cfg.d_model}, vocab {cfg.vocab_size}), batch {a.batch} rows, seq {a.seq}, {a.threads} threads")
    results = {}
    for layout in a.layouts:
        pack = layout == "packed"
        torch.manual_seed(0)
        ours = GPT(cfg)
        ours.init_weights(0)
        theirs = hf_model(cfg)
        theirs.load_state_dict(hf_state(ours), strict=False)
        with tempfile.TemporaryDirectory() as tmp:
            cf = ChatforgeRunner(ours, data, a.seq, a.batch, pack, 1e-4, a.dtype)
            trl = TRLRunner(theirs, hf_tokenizer(tok), convs, a.seq, a.batch, pack, 1e-4, tmp, a.dtype)
            cf.run(2)  # warmup
            rates = {"chatforge": [], "trl": []}
            for r in range(a.rounds):
                dt, n = cf.run(a.steps)
                rates["chatforge"].append(n / dt)
                dt, n = trl.run(a.steps)
                rates["trl"].append(n / dt)
                print(f"  {layout} round {r + 1}: chatforge {rates['chatforge'][-1]:,.0f} tok/s, TRL {rates['trl'][-1]:,.0f} tok/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        results[layout] = {**med, "ratio": med["chatforge"] / med["trl"]}
        print(f"{layout}: chatforge {med['chatforge']:,.0f} tok/s, TRL SFTTrainer {med['trl']:,.0f} tok/s -> {results[layout]['ratio']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


def hf_state(model) -> dict:
    """chatforge GPT weights under HF Llama names (fused q|k|v and gate|up split back)."""
    c = model.cfg
    s = model.state_dict()
    out = {"model.embed_tokens.weight": s["tok_emb.weight"], "model.norm.weight": s["norm_f.weight"]}
    q, k = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = s[p + "attn.qkv.weight"].split([q, k, k])
        gate, up = s[p + "mlp.fc.weight"].chunk(2)
        out.update({
            h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk, h + "self_attn.v_proj.weight": wv,
            h + "self_attn.o_proj.weight": s[p + "attn.proj.weight"], h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up, h + "mlp.down_proj.weight": s[p + "mlp.proj.weight"],
            h + "input_layernorm.weight": s[p + "norm1.weight"], h + "post_attention_layernorm.weight": s[p + "norm2.weight"],
        })
    return {k: v.clone() for k, v in out.items()}


if __name__ == "__main__":
    main()
