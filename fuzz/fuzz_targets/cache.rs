//! The cache over random configurations (from the `--kv` grammar, uncalibrated formats) and random tokens,
//! NaN and infinities included: `Cache::new` over an arena its layout sizes, `append` accepting finite
//! tokens and refusing others without changing what is held, `dequantize` and decode attention giving
//! finite numbers.

#![no_main]

use arbitrary::Arbitrary;
use kvq_core::attention::{self, Kernel};
use kvq_core::cache::{Cache, Overflow, Stream};
use kvq_core::transform::{Pairing, Rope};
use kvq_host::kvspec::KvSpec;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    spec: u8,
    knobs: String,
    kv_heads: u8,
    dim: u8,
    capacity: u16,
    slide: bool,
    chunks: Vec<(u8, i8, u8)>,
    q: Vec<i8>,
}

const BASES: [&str; 8] =
    ["f16", "kivi2", "kivi4", "kivi8", "kvq2", "kvq3", "kivi2:s=4:rot=kv", "kivi2:k=1:v=t"];

fuzz_target!(|inp: Input| {
    let text = format!("{}{}", BASES[usize::from(inp.spec) % BASES.len()], inp.knobs);
    let Ok(spec) = KvSpec::parse(&text) else { return };
    if spec.needs_calibration() {
        return;
    }
    let kv_heads = 1 + usize::from(inp.kv_heads % 4);
    let d = [8, 16, 32, 64, 128][usize::from(inp.dim) % 5];
    let capacity = 1 + usize::from(inp.capacity % 1024);
    let overflow = if inp.slide { Overflow::Slide } else { Overflow::Stop };
    let rope = Rope { base: 10_000.0, pairing: Pairing::Halves };
    let Ok(cfg) = spec.config(kv_heads, d, capacity, overflow, rope) else { return };
    let Ok(layout) = cfg.layout() else { return };
    if layout.total_words > 1 << 22 {
        return;
    }
    let mut arena = vec![0u32; layout.total_words];
    let Ok(mut cache) = Cache::new(cfg, &mut arena) else { return };
    let hd = kv_heads * d;
    for &(n, v, special) in inp.chunks.iter().take(64) {
        let n = 1 + usize::from(n % 48);
        let mut k: Vec<f32> = (0..n * hd).map(|i| f32::from(v) * ((i % 7) as f32 - 3.0) / 16.0).collect();
        let vals: Vec<f32> = (0..n * hd).map(|i| f32::from(v) * ((i % 5) as f32 - 2.0) / 8.0).collect();
        let bad = match special % 8 {
            0 => Some(f32::NAN),
            1 => Some(f32::INFINITY),
            2 => Some(1e30),
            _ => None,
        };
        if let Some(b) = bad {
            let at = usize::from(special) % k.len();
            k[at] = b;
        }
        let held = cache.held();
        match cache.append(&k, &vals) {
            Ok(()) => {}
            Err(_) => {
                assert_eq!(cache.held(), held, "a refused append changes nothing");
                continue;
            }
        }
    }
    if cache.held() == 0 {
        return;
    }
    let mut out = vec![0f32; cache.held() * d];
    for h in 0..kv_heads {
        for s in [Stream::Keys, Stream::Values] {
            let n = cache.dequantize(s, h, &mut out).expect("dequantize what is held");
            assert!(out[..n * d].iter().all(|x| x.is_finite()), "finite {s:?}");
        }
    }
    let q_heads = kv_heads * 2;
    let q: Vec<f32> =
        (0..q_heads * d).map(|i| f32::from(inp.q.get(i).copied().unwrap_or(1)) / 32.0).collect();
    let mut o = vec![0f32; q_heads * d];
    let mut scratch = vec![0f32; cfg.decode_scratch_len(q_heads)];
    for kernel in [Kernel::PORTABLE, Kernel::detect()] {
        attention::decode(&cache, &q, q_heads, 1.0 / (d as f32).sqrt(), &mut o, &mut scratch, kernel)
            .expect("decode over a cache that holds tokens");
        assert!(o.iter().all(|x| x.is_finite()), "finite attention");
    }
});
