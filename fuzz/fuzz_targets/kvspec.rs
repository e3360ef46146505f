//! The `--kv` grammar over arbitrary text and shapes: a spec parses or is refused with a message, and a
//! parsed one gives a cache configuration or an error, whatever the sizes; a configuration that validates
//! has a layout whose size is computed without overflow.

#![no_main]

use arbitrary::Arbitrary;
use kvq_core::cache::Overflow;
use kvq_core::transform::{Pairing, Rope};
use kvq_host::kvspec::KvSpec;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    spec: String,
    kv_heads: u16,
    head_dim: u16,
    capacity: u64,
    slide: bool,
    key_norm: bool,
}

fuzz_target!(|inp: Input| {
    let Ok(spec) = KvSpec::parse(&inp.spec) else { return };
    let Ok(spec) = spec.for_model(inp.key_norm) else { return };
    let overflow = if inp.slide { Overflow::Slide } else { Overflow::Stop };
    let rope = Rope { base: 10_000.0, pairing: Pairing::Halves };
    let Ok(cfg) = spec.config(
        usize::from(inp.kv_heads),
        usize::from(inp.head_dim),
        inp.capacity as usize,
        overflow,
        rope,
    ) else {
        return;
    };
    if cfg.validate().is_ok() {
        let _ = cfg.layout();
    }
});
