//! Next-token sampling: greedy, or temperature with top-k and top-p (nucleus) from a seeded generator.

/// Sampling settings.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    /// Softmax temperature; 0 means greedy.
    pub temp: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    rng: Rng,
}

/// A small seeded generator (SplitMix64): the same sequence for the same seed on every machine, for sampling
/// and for the evaluation's generated tasks.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Sampler {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temp: 0.0, top_k: 0, top_p: 1.0, rng: Rng::new(0) }
    }

    /// Temperature sampling seeded with `seed`.
    pub fn new(temp: f32, top_k: usize, top_p: f32, seed: u64) -> Self {
        Self { temp, top_k, top_p, rng: Rng::new(seed) }
    }

    /// Picks a token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temp <= 0.0 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let max = f64::from(logits[idx[0]]);
        let mut p: Vec<f64> =
            idx.iter().map(|&i| ((f64::from(logits[i]) - max) / f64::from(self.temp)).exp()).collect();
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        let mut cum = 0.0;
        let mut keep = p.len();
        for (i, x) in p.iter().enumerate() {
            cum += x;
            if cum >= f64::from(self.top_p) {
                keep = i + 1;
                break;
            }
        }
        let total: f64 = p[..keep].iter().sum();
        let mut r = self.rng.uniform() * total;
        for (i, x) in p[..keep].iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return idx[i] as u32;
            }
        }
        idx[keep - 1] as u32
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let l = [0.0, 3.0, 1.0, 2.9];
        assert_eq!(Sampler::greedy().sample(&l), 1);
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(5.0, 1, 1.0, 7);
        assert!((0..50).all(|_| s.sample(&l) == 1));
        // top_p small keeps only the most likely.
        let mut s = Sampler::new(1.0, 0, 0.01, 7);
        assert!((0..50).all(|_| s.sample(&l) == 1));
        // With everything allowed, the two likely tokens both appear and the unlikely rarely.
        let mut s = Sampler::new(1.0, 0, 1.0, 7);
        let picks: Vec<u32> = (0..2000).map(|_| s.sample(&l)).collect();
        let c = |t| picks.iter().filter(|&&p| p == t).count();
        assert!(c(1) > 700 && c(3) > 600 && c(0) < 100, "{} {} {}", c(1), c(3), c(0));
        // Seeded: the same sequence twice.
        let (mut a, mut b) = (Sampler::new(1.0, 0, 1.0, 3), Sampler::new(1.0, 0, 1.0, 3));
        assert!((0..100).all(|_| a.sample(&l) == b.sample(&l)));
    }
}
