//! kvq on a Cortex-M4F: one real layer of SmolLM2-135M (its queries, keys and values over a real text,
//! from `kvq dump-qkv`, included at build time) streamed token by token through `kvq-core`'s caches in a
//! `static` arena sized by the cache's `const fn` layout, for each policy of [`stream`].
//!
//! It prints, per policy, the tokens streamed, the arena's bytes, the bits per element held, the largest
//! context of that policy that fits the board's 4 MiB of SRAM (one layer), the hash of the outputs every
//! 64 tokens and at the end; then it exits 0 through semihosting (non-zero on an error or a panic). The
//! host test (`kvq-tests`) runs the same stream and requires the same hashes.
//!
//! With `--features defmt` it also logs each policy's start and result through defmt over semihosting:
//! the defmt frames then own standard output (`defmt-print -e ELF` or `kvq-tests` decode them) and the
//! result lines move to standard error, as semihosting text still.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use cortex_m::peripheral::{SYST, syst::SystClkSource};
use cortex_m_rt::entry;
use embedded_alloc::LlffHeap as Heap;
use semihosting::eprintln;
use static_cell::ConstStaticCell;

#[cfg(feature = "defmt")]
use defmt_semihosting as _;

/// Prints a result line: on standard output, or on standard error where defmt's frames own the output.
macro_rules! say {
    ($($t:tt)*) => {{
        #[cfg(not(feature = "defmt"))]
        semihosting::println!($($t)*);
        #[cfg(feature = "defmt")]
        semihosting::eprintln!($($t)*);
    }};
}

mod stream;
include!(concat!(env!("OUT_DIR"), "/shape.rs"));

/// The stream: per token its query, key and value rows (`f32`, little-endian).
static QKV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qkv.bin"));

/// The board's SRAM, for the largest context each policy fits.
const SRAM_BYTES: usize = 4 << 20;

/// The cache arena, as large as the largest policy's layout needs (computed at compile time).
static ARENA: ConstStaticCell<[u32; stream::arena_words(&SHAPE)]> =
    ConstStaticCell::new([0; stream::arena_words(&SHAPE)]);
/// Attention scratch.
static SCRATCH: ConstStaticCell<[f32; stream::scratch_len(&SHAPE)]> =
    ConstStaticCell::new([0.0; stream::scratch_len(&SHAPE)]);

#[global_allocator]
static HEAP: Heap = Heap::empty();

/// Heap for what a device application allocates around the cache: here the token rows staged from the
/// included stream.
const HEAP_BYTES: usize = 16 * 1024;

fn read_row(t: usize, offset: usize, out: &mut [f32]) {
    let per = SHAPE.q_heads * SHAPE.head_dim + 2 * SHAPE.kv_heads * SHAPE.head_dim;
    let (at, n) = ((t * per + offset) * 4, out.len());
    for (o, w) in out.iter_mut().zip(QKV[at..at + 4 * n].chunks_exact(4)) {
        *o = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
}

#[entry]
fn main() -> ! {
    // SAFETY: called once, before any allocation; the heap's memory is the macro's own static.
    #[allow(unsafe_code)]
    unsafe {
        embedded_alloc::init!(HEAP, HEAP_BYTES);
    }
    // SysTick on the core clock (25 MHz on mps2-an386), free-running over its 24 bits: under QEMU's
    // `-icount shift=0` the virtual clock advances 1 ns per instruction, so one tick is 40 instructions.
    let Some(mut p) = cortex_m::Peripherals::take() else {
        eprintln!("kvq-fw: core peripherals taken twice");
        semihosting::process::exit(3);
    };
    p.SYST.set_clock_source(SystClkSource::Core);
    p.SYST.set_reload(0x00FF_FFFF);
    p.SYST.clear_current();
    p.SYST.enable_counter();
    let arena = ARENA.take();
    let scratch = SCRATCH.take();
    let s = SHAPE;
    let (qd, kd) = (s.q_heads * s.head_dim, s.kv_heads * s.head_dim);
    let (mut q, mut k, mut v, mut out) =
        (vec![0.0f32; qd], vec![0.0f32; kd], vec![0.0f32; kd], vec![0.0f32; qd]);
    let mut received = vec![0.0f32; stream::received_len(&s)];
    say!(
        "kvq-fw stream layer={} tokens={} q_heads={} kv_heads={} head_dim={} arena_bytes={}",
        LAYER,
        TOKENS,
        s.q_heads,
        s.kv_heads,
        s.head_dim,
        arena.len() * 4
    );
    for i in 0..stream::POLICIES {
        let (name, _) = stream::policy(i, &s, stream::stream_capacity(i, &s));
        #[cfg(feature = "defmt")]
        defmt::info!("policy {=str}: streaming {=usize} tokens", name, TOKENS);
        let b = stream::Buffers {
            q: &mut q,
            k: &mut k,
            v: &mut v,
            out: &mut out,
            scratch: &mut scratch[..],
            received: &mut received,
        };
        // Ticks from a token's rows being staged to its output, per token, all and the last 64.
        let start = core::cell::Cell::new(0u32);
        let (mut ticks, mut tail, mut n) = (0u64, 0u64, 0usize);
        let fill = |t: usize, q: &mut [f32], k: &mut [f32], v: &mut [f32]| {
            read_row(t, 0, q);
            read_row(t, qd, k);
            read_row(t, qd + kd, v);
            start.set(SYST::get_current());
        };
        let time = |_: &[f32]| {
            let dt = u64::from(start.get().wrapping_sub(SYST::get_current()) & 0x00FF_FFFF);
            ticks += dt;
            if n >= TOKENS.saturating_sub(64) {
                tail += dt;
            }
            n += 1;
        };
        let tables = match stream::calibrated(i) {
            None => &[][..],
            Some(preset) => match CALIB.iter().find(|(p, _)| *p == preset) {
                Some((_, t)) => *t,
                None => {
                    eprintln!("kvq-fw error policy={name}: the stream holds no {preset} tables");
                    semihosting::process::exit(2);
                }
            },
        };
        let report = stream::run(i, &s, &mut arena[..], tables, b, fill, time, |t, h| {
            say!("kvq-fw step policy={name} t={t} hash={h:016x}");
        });
        say!(
            "kvq-fw ticks policy={name} per_token={} last64_per_token={}",
            ticks / TOKENS as u64,
            tail / 64.min(TOKENS) as u64
        );
        match report {
            Ok(r) => {
                let max = stream::max_context(i, &s, SRAM_BYTES);
                say!(
                    "kvq-fw done policy={name} tokens={} held={} arena_bytes={} bits_per_element={:.3} max_context_sram={max} hash={:016x}",
                    r.tokens,
                    r.held,
                    r.arena_bytes,
                    r.bits_per_element,
                    r.hash
                );
                #[cfg(feature = "defmt")]
                defmt::info!(
                    "policy {=str}: {=usize} tokens, {=usize} held in {=usize} arena bytes, {=f32} bits per element, {=usize} tokens fit 4 MiB, hash {=u64:x}",
                    name,
                    r.tokens,
                    r.held,
                    r.arena_bytes,
                    r.bits_per_element as f32,
                    max,
                    r.hash
                );
            }
            Err(e) => {
                eprintln!("kvq-fw error policy={name}: {e}");
                semihosting::process::exit(2);
            }
        }
    }
    say!("kvq-fw ok");
    semihosting::process::exit(0)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    eprintln!("kvq-fw panic: {info}");
    semihosting::process::exit(101)
}
