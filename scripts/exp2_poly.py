#!/usr/bin/env python3
"""Fits the degree-5 polynomial for 2^f, f in [-1/2, 1/2], that `core/src/attention/avx2.rs::exp8` uses.

The constant term is fixed to 1 (so exp(0) = 1 exactly); the other five coefficients minimize the
largest relative error, by iteratively reweighted least squares on Chebyshev nodes (a Lawson-style
approximation of the minimax fit). Prints the coefficients as f32 (c1..c5, the order `exp8` lists them
from c5 down) and two errors: of the polynomial in exact arithmetic, and of its Horner evaluation in
f32 on a fine grid (the rounding of each step included, without FMA's single rounding, so an upper
estimate).

    pip install numpy && python3 scripts/exp2_poly.py

Output on 2026-11-23 (numpy 2.4):
    coefficients c1..c5: [0.6931469440460205, 0.24022242426872253, 0.055507440119981766,
                          0.009671512059867382, 0.001326172612607479]
    max relative error, exact arithmetic: 9.22e-08
    max relative error, f32 Horner: 1.86e-07
"""

import numpy as np

DEGREE = 5
NODES = 4000

k = np.arange(NODES)
f = 0.5 * np.cos(np.pi * (k + 0.5) / NODES)
y = 2.0**f
A = np.stack([f**j for j in range(1, DEGREE + 1)], axis=1) / y[:, None]
b = (y - 1.0) / y
w = np.ones(NODES)
best = None
for _ in range(60):
    c, *_ = np.linalg.lstsq(A * w[:, None], b * w, rcond=None)
    p = 1.0 + sum(c[j - 1] * f**j for j in range(1, DEGREE + 1))
    err = np.abs(p / y - 1.0)
    w = w * (1.0 + err / err.max()) ** 2
    if best is None or err.max() < best[0]:
        best = (err.max(), c.copy())

err, c = best
c32 = [np.float32(x) for x in c]
print("coefficients c1..c5:", [float(x) for x in c32])
print(f"max relative error, exact arithmetic: {err:.3g}")

g = np.linspace(-0.5, 0.5, 200_001).astype(np.float32)
p = c32[-1]
for cj in reversed(c32[:-1]):
    p = p * g + cj
p = p * g + np.float32(1.0)
rel = np.abs(p.astype(np.float64) / 2.0 ** g.astype(np.float64) - 1.0)
print(f"max relative error, f32 Horner: {rel.max():.3g}")
