#!/usr/bin/env python3
"""Independent reference forward pass of Gemma 3 270M (gemma3 architecture) in numpy, for
runtime-host/tests/gemma3.rs. Weights are dequantized with gguf-py (llama.cpp's own Python package), not with
kvq's code; the pass runs in float64, and again in float32 and with kvq's 16-bit activation quantization, so
that the test's tolerances come from the network's own sensitivity (as make_logits_ref.py does for SmolLM2).

    pip install numpy gguf==0.19.0
    python3 make_gemma3_ref.py gemma-3-270m-q4_k_m.gguf IDS.json > gemma3_ref.json

IDS.json holds {"prompts": {name: [token ids]}} (the committed file's ids came from llama.cpp's
llama-tokenize, see make_gemma3_tok_ref.py). The graph follows llama.cpp's src/models/gemma3.cpp: embedding
times sqrt(n_embd); per layer attn_norm, Q/K/V, RMS norm of every Q and K head, NEOX RoPE (base 10,000 on
local layers, rope.freq_base on global ones, every sixth layer from the sixth), queries times 1/sqrt(head_dim),
softmax attention (local layers see the last sliding_window positions, the current one included),
attn_output, post_attention_norm, residual; ffn_norm, down(gelu_tanh(gate) * up), post_ffw_norm, residual;
output_norm and the tied embedding. The GGUF stores every norm weight as 1 + w, used as is.

The KV cache is modelled as kvq's: global layers hold f16 keys (after RoPE) and values, read back rounded
to float16 from earlier prefill chunks and at full precision within a chunk (the test feeds the prompt up to
each checked position in turn, in chunks of 64 from where each feed starts); local layers take a chunk token
by token, so every key and value they read is rounded to float16.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from make_logits_ref import q16, ref_row

CHUNK = 64


def load(path):
    r = GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    cfg = dict(
        n_layer=f("gemma3.block_count"), n_embd=f("gemma3.embedding_length"),
        n_head=f("gemma3.attention.head_count"), n_kv=f("gemma3.attention.head_count_kv"),
        d=f("gemma3.attention.key_length"), base=f("gemma3.rope.freq_base"), base_local=10000.0,
        eps=f("gemma3.attention.layer_norm_rms_epsilon"), window=f("gemma3.attention.sliding_window"),
    )
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else a.reshape(-1)
    return cfg, w


def forward(cfg, w, ids, rows, dt, quant_act):
    e, nh, nkv, d = cfg["n_embd"], cfg["n_head"], cfg["n_kv"], cfg["d"]
    cast = lambda a: a.astype(dt)
    mm = lambda W, x: cast((q16(x) if quant_act else x) @ cast(W).T)

    def norm(x, g):
        ms = (x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True)
        return cast(x * (1.0 / np.sqrt(ms + cfg["eps"])) * g)

    n = len(ids)
    x = cast(w["token_embd.weight"][ids] * dt(np.sqrt(e)))
    pos = np.arange(n)[:, None]

    def rope(t, heads, base):
        inv = base ** (-2.0 * np.arange(d // 2) / d)
        ang = pos * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        t = t.reshape(n, heads, d).astype(np.float64)
        a, b = t[..., : d // 2], t[..., d // 2:]
        return cast(np.concatenate([a * c - b * s, a * s + b * c], axis=-1).reshape(n, heads * d))

    # kvq is fed up to each row in turn (Session::feed, chunks of 64 from where each feed starts).
    chunk = np.zeros(n, dtype=np.int64)
    cid, start = 0, 0
    for r in rows:
        for i in range(start, r + 1):
            chunk[i] = cid + (i - start) // CHUNK
        cid, start = chunk[r] + 1, r + 1
    for l in range(cfg["n_layer"]):
        p = f"blk.{l}."
        local = l % 6 < 5
        h = norm(x, w[p + "attn_norm.weight"])
        q = mm(w[p + "attn_q.weight"], h).reshape(n, nh, d)
        k = mm(w[p + "attn_k.weight"], h).reshape(n, nkv, d)
        v = mm(w[p + "attn_v.weight"], h)
        q = norm(q, w[p + "attn_q_norm.weight"]).reshape(n, nh * d)
        k = norm(k, w[p + "attn_k_norm.weight"]).reshape(n, nkv * d)
        base = cfg["base_local"] if local else cfg["base"]
        q, k = rope(q, nh, base), rope(k, nkv, base)
        k16, v16 = cast(k.astype(np.float16)), cast(v.astype(np.float16))
        out = np.zeros((n, nh * d), dtype=dt)
        g = nh // nkv
        for hq in range(nh):
            hk = hq // g
            qs = q[:, hq * d:(hq + 1) * d]
            for i in range(n):
                lo = max(0, i - cfg["window"] + 1) if local else 0
                j = np.arange(lo, i + 1)
                same = (chunk[j] == chunk[i]) & (not local)
                kk = np.where(same[:, None], k[j, hk * d:(hk + 1) * d], k16[j, hk * d:(hk + 1) * d])
                vv = np.where(same[:, None], v[j, hk * d:(hk + 1) * d], v16[j, hk * d:(hk + 1) * d])
                s = cast(kk @ qs[i]) / dt(np.sqrt(d))
                ex = np.exp(s - s.max())
                out[i, hq * d:(hq + 1) * d] = cast((ex / ex.sum()) @ vv)
        a = norm(mm(w[p + "attn_output.weight"], out), w[p + "post_attention_norm.weight"])
        x = cast(x + a)
        h = norm(x, w[p + "ffn_norm.weight"])
        gt, up = mm(w[p + "ffn_gate.weight"], h), mm(w[p + "ffn_up.weight"], h)
        gelu = 0.5 * gt * (1 + np.tanh(np.sqrt(2 / np.pi) * gt * (1 + 0.044715 * gt * gt)))
        f = norm(mm(w[p + "ffn_down.weight"], cast(gelu * up)), w[p + "post_ffw_norm.weight"])
        x = cast(x + f)
    h = norm(x[rows], w["output_norm.weight"])
    return ((q16(h) if quant_act else h) @ cast(w["token_embd.weight"]).T).astype(np.float64)


def main():
    cfg, w = load(sys.argv[1])
    prompts = json.load(open(sys.argv[2]))["prompts"]
    vocab = w["token_embd.weight"].shape[0]
    sample = list(range(0, vocab, 257))
    out = {"chunk": CHUNK, "sample_ids": sample, "prompts": []}
    for name, ids in prompts.items():
        pos = sorted({len(ids) // 2, len(ids) - 1})
        l64 = forward(cfg, w, ids, pos, np.float64, False)
        l32 = forward(cfg, w, ids, pos, np.float32, False)
        lq16 = forward(cfg, w, ids, pos, np.float64, True)
        rows = [ref_row(p, l64[r], l32[r], lq16[r], sample) for r, p in enumerate(pos)]
        out["prompts"].append({"name": name, "ids": ids, "rows": rows})
        print(name, len(ids), [(r["f32_dev"], r["q16_dev"]) for r in rows], file=sys.stderr)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
