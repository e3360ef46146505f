//! The gradient of the language-model loss with respect to every layer's keys and values, by a backward
//! pass through the whole model: KVQuant's Fisher information (`(dL/dk)^2`, `(dL/dv)^2` per element),
//! which weights the k-means of its codebooks.
//!
//! The pass runs in f32 over the weights dequantized ([`Model::dense`]), with dense matrix products
//! (ndarray over matrixmultiply). The forward pass keeps what the nonlinear steps need on the way back
//! (norm inputs, queries, keys and values, the gate and up projections); attention probabilities are
//! recomputed head by head. Linear steps need no saved input, since only activation gradients are formed,
//! never weight gradients. The loss is the mean next-token cross-entropy over the sequence, as
//! `kvq perplexity` scores it; keys are the ones the cache is handed (after RoPE), and the gradient of any
//! orthogonal basis the cache stores them in is the same change of basis applied to this one.
//!
//! The pass covers every architecture [`Model`] runs: Llama and Qwen2 (biases need no gradient), and
//! Gemma 3 (query and key norms, post-norms, the GELU gate, sliding-window layers, logit soft-capping).
//! `tests/grad.rs` checks it against central finite differences of the loss on the real models.

use crate::model::{Arch, Model, gelu, rope, silu};
use anyhow::{Context, Result, ensure};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, s};
use rayon::prelude::*;

/// One layer's projections, dequantized, `[rows][cols]`.
struct DenseLayer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// A model's weights in f32 for the backward pass.
pub struct Dense<'m> {
    model: &'m Model,
    layers: Vec<DenseLayer>,
    out: Vec<f32>,
}

/// A change of one key or value element (after RoPE) in the forward pass, for finite differences.
#[derive(Clone, Copy, Debug)]
pub struct Nudge {
    /// Layer.
    pub layer: usize,
    /// Keys (else values).
    pub keys: bool,
    /// Index into the layer's `[t][kv_heads * head_dim]` keys or values.
    pub index: usize,
    /// Added to the element.
    pub delta: f32,
}

/// What one layer's keys and values were in a pass, and the loss's gradient with respect to them.
#[derive(Clone, Debug, Default)]
pub struct LayerGrads {
    /// Keys as the cache is handed them, `[t][kv_heads * head_dim]`.
    pub k: Vec<f32>,
    /// Values, the same layout.
    pub v: Vec<f32>,
    /// `dL/dk`.
    pub gk: Vec<f32>,
    /// `dL/dv`.
    pub gv: Vec<f32>,
    /// `max |q|` per query channel `[n_head * head_dim]` over the pass.
    pub qmax: Vec<f32>,
}

/// A forward and backward pass over one sequence.
#[derive(Clone, Debug)]
pub struct Pass {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// Per layer.
    pub layers: Vec<LayerGrads>,
}

/// What the backward pass needs of one layer's forward pass (empty where the architecture has no use).
#[derive(Default)]
struct Saved {
    x: Vec<f32>,
    qpre: Vec<f32>,
    kpre: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    oattn: Vec<f32>,
    xmid: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    offn: Vec<f32>,
}

/// An activation function or its derivative.
type Act = fn(f32) -> f32;

/// What the forward pass hands the backward pass: the last hidden states, each layer's saved values and
/// `max |q|` per layer.
struct Forward {
    x: Vec<f32>,
    saved: Vec<Saved>,
    qmax: Vec<Vec<f32>>,
}

/// `out (+)= a · b` for row-major `a` `[m][k]` and `b` given as a view.
fn mm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, out: &mut [f32], acc: bool) -> Result<()> {
    let mut c = ArrayViewMut2::from_shape((a.nrows(), b.ncols()), out).context("matrix shape")?;
    general_mat_mul(1.0, &a, &b, if acc { 1.0 } else { 0.0 }, &mut c);
    Ok(())
}

/// A row-major `[rows][cols]` view of `x`.
fn view(x: &[f32], rows: usize, cols: usize) -> Result<ArrayView2<'_, f32>> {
    ArrayView2::from_shape((rows, cols), x).context("matrix shape")
}

/// `y = x · W^T` for `x` `[n][cols]`, `w` `[rows][cols]`.
fn linear(x: &[f32], w: &[f32], cols: usize) -> Result<Vec<f32>> {
    let (n, rows) = (x.len() / cols, w.len() / cols);
    let mut y = vec![0f32; n * rows];
    mm(view(x, n, cols)?, view(w, rows, cols)?.t(), &mut y, false)?;
    Ok(y)
}

/// `dx (+)= dy · W` for `dy` `[n][rows]`, `w` `[rows][cols]`.
fn linear_back(dy: &[f32], w: &[f32], cols: usize, dx: &mut [f32], acc: bool) -> Result<()> {
    let rows = w.len() / cols;
    let n = dy.len() / rows;
    mm(view(dy, n, rows)?, view(w, rows, cols)?, dx, acc)
}

/// RMSNorm of each `w.len()`-wide piece of `x` (mean square in f64, as the forward pass computes it).
fn norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(w.len()).zip(x.par_chunks(w.len())).for_each(|(o, xr)| {
        crate::model::rmsnorm(xr, w, eps, o);
    });
    out
}

/// The gradient through [`norm`]: `dx = s (w dy) - x s^3 sum(x w dy) / n`, `s = 1/sqrt(mean(x^2) + eps)`.
fn norm_back(x: &[f32], w: &[f32], eps: f32, dy: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(n).zip(x.par_chunks(n)).zip(dy.par_chunks(n)).for_each(|((d, xr), g)| {
        let ms = xr.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + f64::from(eps)).sqrt();
        let a: f64 = xr.iter().zip(w).zip(g).map(|((x, w), g)| f64::from(*x * *w * *g)).sum();
        let c = s * s * s * a / n as f64;
        for (((o, &x), &w), &g) in d.iter_mut().zip(xr).zip(w).zip(g) {
            *o = (s * f64::from(w * g) - f64::from(x) * c) as f32;
        }
    });
    dx
}

/// The derivative of SiLU.
fn silu_grad(x: f32) -> f32 {
    let sg = 1.0 / (1.0 + (-x).exp());
    sg * (1.0 + x * (1.0 - sg))
}

/// The derivative of [`gelu`] (tanh approximation).
fn gelu_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let th = (C * x * (1.0 + 0.044_715 * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044_715 * x * x)
}

impl<'m> Dense<'m> {
    /// Dequantizes `model`'s weights (about four bytes per parameter).
    ///
    /// # Errors
    /// Too little memory.
    pub fn new(model: &'m Model) -> Result<Self> {
        let layers = model
            .layers()
            .iter()
            .map(|l| {
                Ok(DenseLayer {
                    wq: model.dense(&l.wq)?,
                    wk: model.dense(&l.wk)?,
                    wv: model.dense(&l.wv)?,
                    wo: model.dense(&l.wo)?,
                    gate: model.dense(&l.gate)?,
                    up: model.dense(&l.up)?,
                    down: model.dense(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = model.dense(model.output().0)?;
        Ok(Self { model, layers, out })
    }

    /// The loss over `tokens` with `nudge` applied (forward only).
    ///
    /// # Errors
    /// As [`Dense::pass`].
    pub fn loss(&self, tokens: &[u32], nudge: Option<Nudge>) -> Result<f64> {
        let f = self.forward(tokens, nudge)?;
        Ok(self.head(&f.x, tokens, false)?.0)
    }

    /// The forward and backward pass over `tokens` (at least two).
    ///
    /// # Errors
    /// A token outside the vocabulary, fewer than two tokens, a non-finite activation, too little memory.
    pub fn pass(&self, tokens: &[u32]) -> Result<Pass> {
        let Forward { x: xf, saved, mut qmax } = self.forward(tokens, None)?;
        let (loss, dhn) = self.head(&xf, tokens, true)?;
        let c = &self.model.cfg;
        let (e, d) = (c.n_embd, c.head_dim);
        let (qd, kvd) = (c.n_head * d, c.n_kv_head * d);
        let n = tokens.len();
        let mut dx = norm_back(&xf, self.model.output().1, c.eps, &dhn);
        let tables = self.tables(n, true);
        let mut out: Vec<LayerGrads> = Vec::with_capacity(c.n_layer);
        for (li, (w, mut sv)) in self.layers.iter().zip(saved).enumerate().rev() {
            let layer = &self.model.layers()[li];
            // x = xmid + post(down · (act(g) * u))
            let df = match &layer.post_ffn_norm {
                Some(pw) => norm_back(&sv.offn, pw, c.eps, &dx),
                None => dx.clone(),
            };
            let mut da = vec![0f32; n * c.n_ff];
            linear_back(&df, &w.down, c.n_ff, &mut da, false)?;
            let (act, act_grad): (Act, Act) =
                if c.arch == Arch::Gemma3 { (gelu, gelu_grad) } else { (silu, silu_grad) };
            let mut dg = vec![0f32; n * c.n_ff];
            let mut du = vec![0f32; n * c.n_ff];
            for i in 0..n * c.n_ff {
                dg[i] = da[i] * sv.u[i] * act_grad(sv.g[i]);
                du[i] = da[i] * act(sv.g[i]);
            }
            let mut dh = vec![0f32; n * e];
            linear_back(&dg, &w.gate, e, &mut dh, false)?;
            linear_back(&du, &w.up, e, &mut dh, true)?;
            let mut dxmid = norm_back(&sv.xmid, &layer.ffn_norm, c.eps, &dh);
            dxmid.iter_mut().zip(&dx).for_each(|(a, b)| *a += b);
            // xmid = x + post(wo · attn(q, k, v))
            let dout = match &layer.post_attn_norm {
                Some(pw) => norm_back(&sv.oattn, pw, c.eps, &dxmid),
                None => dxmid.clone(),
            };
            let mut datt = vec![0f32; n * qd];
            linear_back(&dout, &w.wo, qd, &mut datt, false)?;
            let (mut dq, mut dk, dv) = self.attention_back(li, &sv, &datt, n)?;
            // dL/dk as the cache is handed keys, before it is turned back through RoPE below.
            let gk = dk.clone();
            let tab = &tables[usize::from(c.is_local(li))];
            for (t, table) in tab.iter().enumerate() {
                rope(&mut dq[t * qd..(t + 1) * qd], d, table, c.arch);
                rope(&mut dk[t * kvd..(t + 1) * kvd], d, table, c.arch);
            }
            if let Some(qn) = &layer.q_norm {
                dq = norm_back(&sv.qpre, qn, c.eps, &dq);
            }
            if let Some(kn) = &layer.k_norm {
                dk = norm_back(&sv.kpre, kn, c.eps, &dk);
            }
            let mut dh = vec![0f32; n * e];
            linear_back(&dq, &w.wq, e, &mut dh, false)?;
            linear_back(&dk, &w.wk, e, &mut dh, true)?;
            linear_back(&dv, &w.wv, e, &mut dh, true)?;
            dx = norm_back(&sv.x, &layer.attn_norm, c.eps, &dh);
            dx.iter_mut().zip(&dxmid).for_each(|(a, b)| *a += b);
            let qmax = std::mem::take(&mut qmax[li]);
            out.push(LayerGrads {
                k: std::mem::take(&mut sv.k),
                v: std::mem::take(&mut sv.v),
                gk,
                gv: dv,
                qmax,
            });
        }
        out.reverse();
        Ok(Pass { loss, layers: out })
    }

    /// RoPE tables per position for global `[0]` and local `[1]` layers; `back` negates the angles.
    fn tables(&self, n: usize, back: bool) -> [Vec<Vec<(f64, f64)>>; 2] {
        let m = self.model;
        let global = (0..m.cfg.n_layer).find(|&l| !m.cfg.is_local(l)).unwrap_or(0);
        let local = (0..m.cfg.n_layer).find(|&l| m.cfg.is_local(l)).unwrap_or(global);
        let of = |li: usize| -> Vec<Vec<(f64, f64)>> {
            (0..n)
                .map(|p| {
                    let mut t = m.layer_rope_angles(li, p);
                    if back {
                        t.iter_mut().for_each(|(_, s)| *s = -*s);
                    }
                    t
                })
                .collect()
        };
        [of(global), of(local)]
    }

    /// The forward pass: the last hidden states, what each layer keeps, and `max |q|` per layer.
    fn forward(&self, tokens: &[u32], nudge: Option<Nudge>) -> Result<Forward> {
        let m = self.model;
        let c = &m.cfg;
        let n = tokens.len();
        ensure!(n >= 2, "a gradient needs at least two tokens");
        let (e, d) = (c.n_embd, c.head_dim);
        let (qd, kvd) = (c.n_head * d, c.n_kv_head * d);
        let mut x = vec![0f32; n * e];
        for (t, &tok) in tokens.iter().enumerate() {
            m.embed(tok, &mut x[t * e..(t + 1) * e])?;
        }
        let tables = self.tables(n, false);
        let mut saved = Vec::with_capacity(c.n_layer);
        let mut qmax = Vec::with_capacity(c.n_layer);
        for (li, (w, layer)) in self.layers.iter().zip(m.layers()).enumerate() {
            let mut sv = Saved::default();
            let h = norm(&x, &layer.attn_norm, c.eps);
            let (mut q, mut k, mut v) = (linear(&h, &w.wq, e)?, linear(&h, &w.wk, e)?, linear(&h, &w.wv, e)?);
            for (buf, b) in [(&mut q, &layer.bq), (&mut k, &layer.bk), (&mut v, &layer.bv)] {
                if let Some(b) = b {
                    for row in buf.chunks_exact_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
                    }
                }
            }
            if let Some(qn) = &layer.q_norm {
                sv.qpre = q;
                q = norm(&sv.qpre, qn, c.eps);
            }
            if let Some(kn) = &layer.k_norm {
                sv.kpre = k;
                k = norm(&sv.kpre, kn, c.eps);
            }
            for (t, table) in tables[usize::from(c.is_local(li))].iter().enumerate() {
                rope(&mut q[t * qd..(t + 1) * qd], d, table, c.arch);
                rope(&mut k[t * kvd..(t + 1) * kvd], d, table, c.arch);
            }
            if let Some(nu) = nudge.filter(|nu| nu.layer == li) {
                let buf = if nu.keys { &mut k } else { &mut v };
                ensure!(nu.index < buf.len(), "nudge index {} outside the layer's {}", nu.index, buf.len());
                buf[nu.index] += nu.delta;
            }
            let mut qm = vec![0f32; qd];
            for row in q.chunks_exact(qd) {
                qm.iter_mut().zip(row).for_each(|(a, b)| *a = a.max(b.abs()));
            }
            qmax.push(qm);
            sv.q = q;
            sv.k = k;
            sv.v = v;
            let att = self.attention(li, &sv, n)?;
            let mut o = linear(&att, &w.wo, qd)?;
            if let Some(pw) = &layer.post_attn_norm {
                sv.oattn = o;
                o = norm(&sv.oattn, pw, c.eps);
            }
            sv.x = x;
            let xmid: Vec<f32> = sv.x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let h2 = norm(&xmid, &layer.ffn_norm, c.eps);
            sv.g = linear(&h2, &w.gate, e)?;
            sv.u = linear(&h2, &w.up, e)?;
            let act = if c.arch == Arch::Gemma3 { gelu } else { silu };
            let a: Vec<f32> = sv.g.iter().zip(&sv.u).map(|(g, u)| act(*g) * u).collect();
            let mut f = linear(&a, &w.down, c.n_ff)?;
            if let Some(pw) = &layer.post_ffn_norm {
                sv.offn = f;
                f = norm(&sv.offn, pw, c.eps);
            }
            x = xmid.iter().zip(&f).map(|(a, b)| a + b).collect();
            sv.xmid = xmid;
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                anyhow::bail!("layer {li}: activation {i} is {} (NaN/Inf) in the gradient pass", x[i]);
            }
            saved.push(sv);
        }
        Ok(Forward { x, saved, qmax })
    }

    /// Attention probabilities of query head `hq` over `n` tokens, `[t][s]` (causal, and within the
    /// window on local layers).
    fn probs(&self, li: usize, sv: &Saved, hq: usize, n: usize) -> Result<Vec<f32>> {
        let c = &self.model.cfg;
        let d = c.head_dim;
        let hk = hq / (c.n_head / c.n_kv_head);
        let q = view(&sv.q, n, c.n_head * d)?;
        let k = view(&sv.k, n, c.n_kv_head * d)?;
        let mut p = vec![0f32; n * n];
        mm(q.slice(s![.., hq * d..(hq + 1) * d]), k.slice(s![.., hk * d..(hk + 1) * d]).t(), &mut p, false)?;
        let (scale, window) = (c.attn_scale, if c.is_local(li) { c.window } else { 0 });
        p.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
            let lo = if window > 0 { (t + 1).saturating_sub(window) } else { 0 };
            let mx = row[lo..=t].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
            let mut sum = 0f64;
            for r in &mut row[lo..=t] {
                *r = (*r * scale - mx).exp();
                sum += f64::from(*r);
            }
            let inv = (1.0 / sum) as f32;
            row[lo..=t].iter_mut().for_each(|r| *r *= inv);
            row[..lo].fill(0.0);
            row[t + 1..].fill(0.0);
        });
        Ok(p)
    }

    /// Attention of layer `li`'s saved queries, keys and values, `[t][n_head * head_dim]`.
    fn attention(&self, li: usize, sv: &Saved, n: usize) -> Result<Vec<f32>> {
        let c = &self.model.cfg;
        let (d, qd, kvd) = (c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let ratio = c.n_head / c.n_kv_head;
        let mut att = vec![0f32; n * qd];
        let v = view(&sv.v, n, kvd)?;
        for hq in 0..c.n_head {
            let p = self.probs(li, sv, hq, n)?;
            let hk = hq / ratio;
            let mut a = ArrayViewMut2::from_shape((n, qd), &mut att[..]).context("matrix shape")?;
            let mut a = a.slice_mut(s![.., hq * d..(hq + 1) * d]);
            general_mat_mul(1.0, &view(&p, n, n)?, &v.slice(s![.., hk * d..(hk + 1) * d]), 0.0, &mut a);
        }
        Ok(att)
    }

    /// The gradients of attention's queries, keys and values from the output's `datt`.
    fn attention_back(
        &self,
        li: usize,
        sv: &Saved,
        datt: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let c = &self.model.cfg;
        let (d, qd, kvd) = (c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let ratio = c.n_head / c.n_kv_head;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let (q, k, v) = (view(&sv.q, n, qd)?, view(&sv.k, n, kvd)?, view(&sv.v, n, kvd)?);
        let go = view(datt, n, qd)?;
        let mut dp = vec![0f32; n * n];
        for hq in 0..c.n_head {
            let hk = hq / ratio;
            let (qc, kc) = (hq * d..(hq + 1) * d, hk * d..(hk + 1) * d);
            let p = self.probs(li, sv, hq, n)?;
            let dout = go.slice(s![.., qc.clone()]);
            mm(dout, v.slice(s![.., kc.clone()]).t(), &mut dp, false)?;
            // dS = P (dP - rowsum(P dP)), with the logits' scale folded in.
            let scale = c.attn_scale;
            dp.par_chunks_mut(n).zip(p.par_chunks(n)).for_each(|(g, pr)| {
                let dot: f64 = g.iter().zip(pr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                for (a, &b) in g.iter_mut().zip(pr) {
                    *a = b * (*a - dot as f32) * scale;
                }
            });
            let (pv, ds) = (view(&p, n, n)?, view(&dp, n, n)?);
            let mut dqv = ArrayViewMut2::from_shape((n, qd), &mut dq[..]).context("matrix shape")?;
            general_mat_mul(
                1.0,
                &ds,
                &k.slice(s![.., kc.clone()]),
                0.0,
                &mut dqv.slice_mut(s![.., qc.clone()]),
            );
            let mut dkv = ArrayViewMut2::from_shape((n, kvd), &mut dk[..]).context("matrix shape")?;
            general_mat_mul(1.0, &ds.t(), &q.slice(s![.., qc]), 1.0, &mut dkv.slice_mut(s![.., kc.clone()]));
            let mut dvv = ArrayViewMut2::from_shape((n, kvd), &mut dv[..]).context("matrix shape")?;
            general_mat_mul(1.0, &pv.t(), &dout, 1.0, &mut dvv.slice_mut(s![.., kc]));
        }
        Ok((dq, dk, dv))
    }

    /// The loss over the last hidden states `x` and, with `grad`, its gradient with respect to the final
    /// norm's output.
    fn head(&self, x: &[f32], tokens: &[u32], grad: bool) -> Result<(f64, Vec<f32>)> {
        let m = self.model;
        let c = &m.cfg;
        let (e, vocab) = (c.n_embd, c.n_vocab);
        // Every token is in the vocabulary: the forward pass embedded them all.
        let n = tokens.len();
        let hn = norm(x, m.output().1, c.eps);
        let mut dhn = vec![0f32; n * e];
        let mut loss = 0f64;
        let scored = (n - 1) as f64;
        const BLOCK: usize = 64;
        let mut logits = vec![0f32; BLOCK * vocab];
        for t0 in (0..n).step_by(BLOCK) {
            let rows = BLOCK.min(n - t0);
            let l = &mut logits[..rows * vocab];
            mm(view(&hn[t0 * e..(t0 + rows) * e], rows, e)?, view(&self.out, vocab, e)?.t(), l, false)?;
            let parts: Vec<f64> = l
                .par_chunks_mut(vocab)
                .enumerate()
                .map(|(j, row)| {
                    let t = t0 + j;
                    if t + 1 >= n {
                        row.fill(0.0);
                        return 0.0;
                    }
                    let target = tokens[t + 1] as usize;
                    let capped = |z: f32| c.logit_softcap.map_or(z, |cap| (z / cap).tanh() * cap);
                    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &z| a.max(capped(z)));
                    let sum: f64 = row.iter().map(|&z| f64::from(capped(z) - mx).exp()).sum();
                    let lse = f64::from(mx) + sum.ln();
                    let nll = lse - f64::from(capped(row[target]));
                    if grad {
                        for (i, z) in row.iter_mut().enumerate() {
                            let cz = capped(*z);
                            let mut g = (f64::from(cz) - lse).exp() - if i == target { 1.0 } else { 0.0 };
                            g /= scored;
                            if let Some(cap) = c.logit_softcap {
                                let th = f64::from(*z / cap).tanh();
                                g *= 1.0 - th * th;
                            }
                            *z = g as f32;
                        }
                    }
                    nll
                })
                .collect();
            loss += parts.iter().sum::<f64>();
            if grad {
                mm(
                    view(l, rows, vocab)?,
                    view(&self.out, vocab, e)?,
                    &mut dhn[t0 * e..(t0 + rows) * e],
                    false,
                )?;
            }
        }
        Ok((loss / scored, dhn))
    }
}
