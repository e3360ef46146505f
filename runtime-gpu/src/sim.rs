//! The attention kernels' work decomposition, reproduced on the host: the same splits, the same 32-token
//! tiles dealt to four warps, the same butterfly reductions, online softmax, warp merge and split merge,
//! in the same f32 operations (fused multiply-adds where the device fuses them). The tests check it
//! against kvq-core's attention within a bound derived from the summation orders, so what is tested
//! without a GPU is the decomposition itself; the device runs are checked against kvq-core the same way.

/// Warps a block runs.
pub const WARPS: usize = 4;
/// Tokens a warp takes at a time.
pub const TILE: usize = 32;

/// One block's result: per query head of the group, running max, sum and unnormalized output.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// Running max per head (`-inf` for an empty split).
    pub m: Vec<f32>,
    /// Sum of `exp(score - m)` per head.
    pub l: Vec<f32>,
    /// `[heads][d]` sums of `exp(score - m) * v`.
    pub o: Vec<f32>,
}

fn butterfly(v: &mut [f32; TILE], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut off = TILE / 2;
    while off > 0 {
        let prev = *v;
        for (i, x) in v.iter_mut().enumerate() {
            *x = op(prev[i], prev[i ^ off]);
        }
        off /= 2;
    }
    v[0]
}

/// Block `[t0, t1)` of `kvq_attend` for one KV head: `keys` and `values` are the head's rows
/// `[tokens][d]` (held tokens, then any chunk tokens), `qs` the group's `[g][d]` queries already scaled.
pub fn block(keys: &[f32], values: &[f32], qs: &[f32], d: usize, t0: usize, t1: usize) -> Partial {
    let g = qs.len() / d;
    let mut wm = vec![vec![f32::NEG_INFINITY; g]; WARPS];
    let mut wl = vec![vec![0.0f32; g]; WARPS];
    let mut wo = vec![vec![0.0f32; g * d]; WARPS];
    for w in 0..WARPS {
        let (m, sum, o) = (&mut wm[w], &mut wl[w], &mut wo[w]);
        let mut tile = t0 + w * TILE;
        while tile < t1 {
            let mut p = vec![[0.0f32; TILE]; g];
            for r in 0..g {
                let mut sc = [f32::NEG_INFINITY; TILE];
                for (lane, s) in sc.iter_mut().enumerate() {
                    let t = tile + lane;
                    if t < t1 {
                        let mut acc = 0.0f32;
                        for c in 0..d {
                            acc = qs[r * d + c].mul_add(keys[t * d + c], acc);
                        }
                        *s = acc;
                    }
                }
                let mut mx = sc;
                let tile_max = butterfly(&mut mx, f32::max);
                let mn = m[r].max(tile_max);
                let alpha = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - mn).exp() };
                for lane in 0..TILE {
                    p[r][lane] = if tile + lane < t1 { (sc[lane] - mn).exp() } else { 0.0 };
                }
                let mut ps = p[r];
                let tile_sum = butterfly(&mut ps, |a, b| a + b);
                sum[r] = sum[r].mul_add(alpha, tile_sum);
                m[r] = mn;
                for x in &mut o[r * d..(r + 1) * d] {
                    *x *= alpha;
                }
            }
            for j in 0..TILE.min(t1 - tile) {
                let v = &values[(tile + j) * d..][..d];
                for r in 0..g {
                    for (x, &vc) in o[r * d..(r + 1) * d].iter_mut().zip(v) {
                        *x = p[r][j].mul_add(vc, *x);
                    }
                }
            }
            tile += WARPS * TILE;
        }
    }
    let mut out = Partial { m: vec![f32::NEG_INFINITY; g], l: vec![0.0; g], o: vec![0.0; g * d] };
    for r in 0..g {
        let mx = (0..WARPS).fold(f32::NEG_INFINITY, |a, w| a.max(wm[w][r]));
        out.m[r] = mx;
        for c in 0..d {
            let (mut acc, mut l2) = (0.0f32, 0.0f32);
            for w in 0..WARPS {
                if wm[w][r] == f32::NEG_INFINITY {
                    continue;
                }
                let f = (wm[w][r] - mx).exp();
                acc = wo[w][r * d + c].mul_add(f, acc);
                l2 = wl[w][r].mul_add(f, l2);
            }
            out.o[r * d + c] = acc;
            out.l[r] = l2;
        }
    }
    out
}

/// `kvq_merge` over one query head's splits: `[d]` output.
pub fn merge(parts: &[Partial], r: usize, d: usize) -> Vec<f32> {
    let m = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.m[r]));
    (0..d)
        .map(|c| {
            let (mut l, mut o) = (0.0f32, 0.0f32);
            for p in parts {
                if p.m[r] == f32::NEG_INFINITY {
                    continue;
                }
                let w = (p.m[r] - m).exp();
                l = p.l[r].mul_add(w, l);
                o = p.o[r * d + c].mul_add(w, o);
            }
            o / l
        })
        .collect()
}

/// The whole decode (or one prefill position) for one KV head over its first `tokens` rows: `q` is the
/// group's `[g][d]` queries (unscaled), split into `split`-token blocks as the device splits them.
pub fn attend(
    keys: &[f32],
    values: &[f32],
    q: &[f32],
    scale: f32,
    d: usize,
    tokens: usize,
    split: usize,
) -> Vec<f32> {
    let qs: Vec<f32> = q.iter().map(|&x| x * scale).collect();
    let g = q.len() / d;
    let splits = tokens.div_ceil(split).max(1);
    let parts: Vec<Partial> =
        (0..splits).map(|s| block(keys, values, &qs, d, s * split, ((s + 1) * split).min(tokens))).collect();
    (0..g).flat_map(|r| merge(&parts, r, d)).collect()
}
