#!/usr/bin/env python3
"""A tiny synthetic Qwen2 GGUF (random weights; Q8_0, F16 and F32 tensors; Q/K/V biases; separate output)
and its logits from an independent numpy forward pass, for runtime-host/tests/qwen2.rs. No real Qwen2 model
is available offline; this checks the architecture's differences from Llama (half-split RoPE, biases).

    pip install numpy==2.4.6 gguf==0.19.0
    python3 make_qwen2_ref.py [OUT_DIR]   # writes OUT_DIR/qwen2-tiny.gguf and OUT_DIR/qwen2_ref.json

The committed qwen2_ref.json was written with OUT_DIR = this directory; the GGUF is not committed: the
test (tests/qwen2.rs) runs this script again into kvq's cache directory and checks that the file it gets
has the sha256 recorded in the JSON (the generator is seeded, so the bytes are the same every time).
"""
import hashlib
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else HERE
rng = np.random.default_rng(7)
N_EMBD, N_HEAD, N_KV, N_FF, N_LAYER, VOCAB, BASE, EPS = 64, 4, 2, 128, 2, 96, 10000.0, 1e-6
D = N_EMBD // N_HEAD

GGUF = os.path.join(OUT, "qwen2-tiny.gguf")
w = gguf.GGUFWriter(GGUF, "qwen2")
w.add_block_count(N_LAYER)
w.add_context_length(256)
w.add_embedding_length(N_EMBD)
w.add_feed_forward_length(N_FF)
w.add_head_count(N_HEAD)
w.add_head_count_kv(N_KV)
w.add_rope_freq_base(BASE)
w.add_layer_norm_rms_eps(EPS)
W = {}


def put(name, shape, ty, scale, offset=0.0):
    a = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    if ty == T.Q8_0:
        q = quantize(a, ty)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=ty)
        W[name] = dequantize(q, ty).astype(np.float64).reshape(shape)
    elif ty == T.F16:
        w.add_tensor(name, a.astype(np.float16))
        W[name] = a.astype(np.float16).astype(np.float64)
    else:
        w.add_tensor(name, a)
        W[name] = a.astype(np.float64)


put("token_embd.weight", (VOCAB, N_EMBD), T.F32, 1.0)
for l in range(N_LAYER):
    p = f"blk.{l}."
    put(p + "attn_norm.weight", (N_EMBD,), T.F32, 0.2, 1.0)
    put(p + "attn_q.weight", (N_HEAD * D, N_EMBD), T.Q8_0, 0.2)
    put(p + "attn_k.weight", (N_KV * D, N_EMBD), T.Q8_0, 0.2)
    put(p + "attn_v.weight", (N_KV * D, N_EMBD), T.F16, 0.2)
    put(p + "attn_q.bias", (N_HEAD * D,), T.F32, 0.5)
    put(p + "attn_k.bias", (N_KV * D,), T.F32, 0.5)
    put(p + "attn_v.bias", (N_KV * D,), T.F32, 0.5)
    put(p + "attn_output.weight", (N_EMBD, N_HEAD * D), T.F16, 0.15)
    put(p + "ffn_norm.weight", (N_EMBD,), T.F32, 0.2, 1.0)
    put(p + "ffn_gate.weight", (N_FF, N_EMBD), T.Q8_0, 0.15)
    put(p + "ffn_up.weight", (N_FF, N_EMBD), T.F16, 0.15)
    put(p + "ffn_down.weight", (N_EMBD, N_FF), T.Q8_0, 0.1)
put("output_norm.weight", (N_EMBD,), T.F32, 0.2, 1.0)
put("output.weight", (VOCAB, N_EMBD), T.F16, 0.3)


def forward(ids, dt):
    c = lambda a: np.asarray(a, dtype=dt)
    def norm(x, g):
        ms = (x.astype(np.float64) ** 2).mean(-1, keepdims=True)
        return c(x / np.sqrt(ms + EPS) * g)
    n = len(ids)
    x = c(W["token_embd.weight"][ids])
    inv = BASE ** (-2.0 * np.arange(D // 2) / D)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    def rope(t, h):
        t = t.reshape(n, h, D).astype(np.float64)
        a, b = t[..., : D // 2], t[..., D // 2:]
        return c(np.concatenate([a * cos - b * sin, a * sin + b * cos], -1).reshape(n, h * D))
    for l in range(N_LAYER):
        p = f"blk.{l}."
        h = norm(x, W[p + "attn_norm.weight"])
        q = rope(h @ c(W[p + "attn_q.weight"]).T + c(W[p + "attn_q.bias"]), N_HEAD)
        k = rope(h @ c(W[p + "attn_k.weight"]).T + c(W[p + "attn_k.bias"]), N_KV)
        v = c(h @ c(W[p + "attn_v.weight"]).T + c(W[p + "attn_v.bias"]))
        out = np.zeros((n, N_HEAD * D), dtype=dt)
        for hq in range(N_HEAD):
            hk = hq // (N_HEAD // N_KV)
            for i in range(n):
                s = c(k[: i + 1, hk * D:(hk + 1) * D] @ q[i, hq * D:(hq + 1) * D]) / dt(np.sqrt(D))
                e = np.exp(s - s.max())
                out[i, hq * D:(hq + 1) * D] = c((e / e.sum()) @ v[: i + 1, hk * D:(hk + 1) * D])
        x = c(x + out @ c(W[p + "attn_output.weight"]).T)
        h = norm(x, W[p + "ffn_norm.weight"])
        g, u = c(h @ c(W[p + "ffn_gate.weight"]).T), c(h @ c(W[p + "ffn_up.weight"]).T)
        x = c(x + c(g / (1 + np.exp(-g)) * u) @ c(W[p + "ffn_down.weight"]).T)
    return (norm(x, W["output_norm.weight"]) @ c(W["output.weight"]).T).astype(np.float64)


w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
ids = [int(t) for t in rng.integers(0, VOCAB, size=24)]
l64, l32 = forward(ids, np.float64), forward(ids, np.float32)
sha = hashlib.sha256(open(GGUF, "rb").read()).hexdigest()
json.dump({"gguf_sha256": sha, "ids": ids, "logits": l64.tolist(), "f32_dev": float(np.abs(l32 - l64).max())},
          open(os.path.join(OUT, "qwen2_ref.json"), "w"))
print("f32_dev", np.abs(l32 - l64).max(), "logit range", l64.min(), l64.max())
