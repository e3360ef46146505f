#!/usr/bin/env python3
"""Reference dequantization of every weight type kvq reads, by gguf-py (llama.cpp's Python package), for
runtime-host/tests/dequant.rs.

    pip install numpy gguf==0.19.0
    python3 make_dequant_ref.py > dequant_ref.json

Blocks are random bytes from a fixed seed, with each block's f16 scales replaced by moderate finite values
(random f16 bit patterns would be NaN or huge).
"""
import json

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

rng = np.random.default_rng(1234)


def f16_bytes(v):
    return np.array([v], dtype=np.float16).tobytes()


# (type, block bytes, offsets of f16 fields within a block)
TYPES = [
    (T.F32, 4, []), (T.F16, 2, [0]), (T.BF16, 2, []), (T.Q8_0, 34, [0]), (T.Q4_0, 18, [0]),
    (T.Q4_1, 20, [0, 2]), (T.Q5_0, 22, [0]), (T.Q4_K, 144, [0, 2]), (T.Q6_K, 210, [208]),
]
out = []
for ty, bb, f16s in TYPES:
    nblocks = 2 if bb > 100 else 8
    raw = bytearray(rng.integers(0, 256, size=nblocks * bb, dtype=np.uint8).tobytes())
    for b in range(nblocks):
        for off in f16s:
            raw[b * bb + off:b * bb + off + 2] = f16_bytes(rng.uniform(-0.05, 0.05))
        if ty == T.F32:
            raw[b * bb:b * bb + 4] = np.array([rng.normal()], dtype=np.float32).tobytes()
        if ty == T.BF16:
            raw[b * bb:b * bb + 2] = np.array([rng.normal()], dtype=np.float32).tobytes()[2:4]
    vals = dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), ty).astype(np.float32).reshape(-1)
    out.append({"type": ty.name, "bytes": bytes(raw).hex(), "values": [float(v) for v in vals]})
print(json.dumps(out))
