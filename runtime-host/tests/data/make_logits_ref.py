#!/usr/bin/env python3
"""Independent reference forward pass of SmolLM2-135M-Instruct (Llama architecture) in numpy, for
runtime-host/tests/logits.rs. Weights are dequantized with gguf-py (llama.cpp's own Python package), not with
kvq's code; the pass runs in float64, and again in float32 and with kvq's 16-bit activation quantization so that
the test's tolerances come from the network's own sensitivity (see logits.rs).

    pip install numpy gguf==0.19.0
    python3 make_logits_ref.py SmolLM2-135M-Instruct.Q4_1.gguf > logits_ref.json

The KV cache is modelled as kvq's `f16` cache with prefill chunks of 64 tokens: keys (after RoPE) and values
of earlier chunks are read back rounded to float16; within a chunk they are used at full precision.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

CHUNK = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    r = GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    cfg = dict(
        n_layer=f("llama.block_count"), n_embd=f("llama.embedding_length"), n_head=f("llama.attention.head_count"),
        n_kv=f("llama.attention.head_count_kv"), base=f("llama.rope.freq_base"),
        eps=f("llama.attention.layer_norm_rms_epsilon"),
    )
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim > 1 or len(t.shape) > 1 else a
    return cfg, w


def q16(x):
    """kvq's 16-bit activation quantization per block of 32: d = max|x| / 32767, q = round(x / d)."""
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 32767.0
    q = np.where(d > 0, np.round(b / np.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


def forward(cfg, w, ids, dt, quant_act):
    n_embd, n_head, n_kv = cfg["n_embd"], cfg["n_head"], cfg["n_kv"]
    d = n_embd // n_head
    cast = lambda a: a.astype(dt)
    mm = lambda W, x: cast((q16(x) if quant_act else x) @ cast(W).T)
    def norm(x, g):
        ms = (x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True)
        return cast(x * (1.0 / np.sqrt(ms + cfg["eps"])) * g)
    n = len(ids)
    x = cast(w["token_embd.weight"][ids])
    pos = np.arange(n)[:, None]
    inv = cfg["base"] ** (-2.0 * np.arange(d // 2) / d)
    ang = pos * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    def rope(t, heads):
        t = t.reshape(n, heads, d // 2, 2).astype(np.float64)
        a, b = t[..., 0], t[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return cast(np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(n, heads * d))
    # Which earlier positions are read from the f16 cache: those in an earlier chunk.
    chunk = np.arange(n) // CHUNK
    for l in range(cfg["n_layer"]):
        p = f"blk.{l}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope(mm(w[p + "attn_q.weight"], h), n_head)
        k = rope(mm(w[p + "attn_k.weight"], h), n_kv)
        v = mm(w[p + "attn_v.weight"], h)
        k16, v16 = cast(k.astype(np.float16)), cast(v.astype(np.float16))
        out = np.zeros((n, n_head * d), dtype=dt)
        g = n_head // n_kv
        for hq in range(n_head):
            hk = hq // g
            qs = q[:, hq * d:(hq + 1) * d]
            for i in range(n):
                j = np.arange(i + 1)
                same = chunk[j] == chunk[i]
                kk = np.where(same[:, None], k[j, hk * d:(hk + 1) * d], k16[j, hk * d:(hk + 1) * d])
                vv = np.where(same[:, None], v[j, hk * d:(hk + 1) * d], v16[j, hk * d:(hk + 1) * d])
                s = cast(kk @ qs[i]) / dt(np.sqrt(d))
                e = np.exp(s - s.max())
                out[i, hq * d:(hq + 1) * d] = cast((e / e.sum()) @ vv)
        x = cast(x + mm(w[p + "attn_output.weight"], out))
        h = norm(x, w[p + "ffn_norm.weight"])
        gt, up = mm(w[p + "ffn_gate.weight"], h), mm(w[p + "ffn_up.weight"], h)
        x = cast(x + mm(w[p + "ffn_down.weight"], cast(gt / (1 + np.exp(-gt)) * up)))
    h = norm(x, w["output_norm.weight"])
    out_w = w.get("output.weight", w["token_embd.weight"])
    return ((q16(h) if quant_act else h) @ cast(out_w).T).astype(np.float64)


def ref_row(pos, l64, l32, lq16, sample):
    """One checked position: the f64 logits at the sampled ids and the top 16, and the f32 and 16-bit runs'
    largest deviations from them (the tests' tolerances)."""
    top = np.argsort(-l64)[:16]
    return {
        "pos": pos,
        "top_ids": top.tolist(),
        "logits": l64[sample].tolist(),
        "top_logits": l64[top].tolist(),
        "f32_dev": float(np.abs(l32 - l64).max()),
        "q16_dev": float(np.abs(lq16 - l64).max()),
        "q16_argmax": int(np.argmax(lq16)),
    }


def main():
    cfg, w = load(sys.argv[1])
    tok = json.load(open(os.path.join(HERE, "tokenizer_ref.json")))["cases"]
    by = lambda start: next(c["ids"] for c in tok if c["parse_special"] and c["text"].startswith(start))
    prompts = {
        "chatml": by("<|im_start|>system\nYou a"),
        "prose": by("It is a truth universally"),
        "code": by("fn main() {\n    let x: V"),
        # 181 tokens: three prefill chunks of 64 (the last partial), so cache reads cross chunks.
        "long": by("It is a truth universally") + by("The quick brown fox jumps") + by("The year 1813 saw the pub")
        + by("fn main() {\n    let x: V") + by("1234567890 3.14159 -42 1,"),
    }
    vocab = w["token_embd.weight"].shape[0]
    sample = list(range(0, vocab, 61))
    out = {"chunk": CHUNK, "sample_ids": sample, "prompts": []}
    for name, ids in prompts.items():
        l64 = forward(cfg, w, ids, np.float64, False)
        l32 = forward(cfg, w, ids, np.float32, False)
        lq16 = forward(cfg, w, ids, np.float64, True)
        rows = [ref_row(p, l64[p], l32[p], lq16[p], sample) for p in sorted({len(ids) // 2, len(ids) - 1})]
        out["prompts"].append({"name": name, "ids": ids, "rows": rows})
        print(name, len(ids), [(r["f32_dev"], r["q16_dev"]) for r in rows], file=sys.stderr)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
