//! A long chat through a sliding 2-bit cache on the real model: more than 20,000 tokens of ChatML turns
//! (user messages from a novel, greedy replies decoded token by token) through `kvq2` caches of 1,024
//! tokens that slide. Once the cache is full its live bytes stay inside the arena and stop growing (they
//! move only as a key group slides out and the residual window fills and flushes), the process's resident memory stays within a few
//! MiB of where it was then, the four sinks hold the very bits they held after the first
//! turn, and no step errs.

use kvq_core::cache::{Overflow, Stream};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Session};
use kvq_host::sample::Sampler;

const TOKENS: usize = 20_000;
const CAPACITY: usize = 1024;
/// Largest turn a user sends, in tokens.
const TURN: usize = 320;
/// Longest reply.
const REPLY: usize = 32;
/// Resident growth allowed after the cache first fills: the allocator's slack for the per-chunk
/// buffers, far below one more cache (about 5 MiB at this size) and the 80 MiB the tokens would take
/// at fp16 without sliding.
const RSS_SLACK: usize = 4 << 20;

fn rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(s.split_whitespace().nth(1)?.parse::<usize>().ok()? * 4096)
}

/// The sinks' stored keys, every layer and head, as bits.
fn sink_bits(s: &Session<'_>) -> Vec<u32> {
    let mut bits = Vec::new();
    for c in s.caches() {
        let cfg = c.config();
        let mut rows = vec![0f32; c.held() * cfg.head_dim];
        for h in 0..cfg.kv_heads {
            c.dequantize(Stream::Keys, h, &mut rows).unwrap();
            bits.extend(rows[..c.counts().sinks * cfg.head_dim].iter().map(|x| x.to_bits()));
        }
    }
    bits
}

#[test]
fn real_model_twenty_thousand_chat_tokens_through_a_sliding_two_bit_cache() {
    let (m, tok, text) = kvq_tests::default_model_and_text();
    let end = tok.id("<|im_end|>").expect("a ChatML model");
    let words: Vec<&str> = text.split_whitespace().collect();
    let cfg = m.cache_config(&KvSpec::parse("kvq2").unwrap(), CAPACITY, Overflow::Slide).unwrap();
    assert_eq!(cfg.sinks, 4);
    let arena: usize = cfg.arena_bytes() * m.cfg.n_layer;
    let mut arenas = model::arenas(&m, &cfg).unwrap();
    let mut s = Session::new(&m, cfg, &mut arenas).unwrap();
    let mut sampler = Sampler::greedy();
    let mut pending =
        tok.encode("<|im_start|>system\nYou are a helpful reader of novels.<|im_end|>\n", true, true);
    let (mut at, mut turns, mut replied) = (0usize, 0usize, 0usize);
    // (live bytes at the first full turn, resident bytes then); live bytes at every turn since.
    let mut full: Option<(usize, usize)> = None;
    let mut live = Vec::new();
    let step = cfg.slide_step();
    let mut sinks = None;
    while s.pos < TOKENS {
        // The next ~TURN tokens of the novel as the user's message.
        let mut msg = String::new();
        while at < words.len() && tok.encode(&msg, false, false).len() < TURN - 16 {
            msg.push_str(words[at]);
            msg.push(' ');
            at += 1;
        }
        if at >= words.len() {
            at = 0;
        }
        pending.extend(tok.encode(
            &format!("<|im_start|>user\nWhat happens here? {msg}<|im_end|>\n<|im_start|>assistant\n"),
            false,
            true,
        ));
        let mut logits = s.feed(&pending).unwrap_or_else(|e| panic!("turn {turns} at {}: {e:#}", s.pos));
        pending.clear();
        for _ in 0..REPLY {
            let id = sampler.sample(&logits);
            if id == end || Some(id) == tok.eos {
                break;
            }
            logits = s.feed(&[id]).unwrap_or_else(|e| panic!("turn {turns} at {}: {e:#}", s.pos));
            replied += 1;
        }
        pending.push(end);
        pending.extend(tok.encode("\n", false, false));
        turns += 1;
        assert!(s.held() <= CAPACITY);
        if sinks.is_none() {
            sinks = Some(sink_bits(&s));
        }
        let bytes = s.kv_bytes();
        assert!(bytes <= arena, "turn {turns}: {bytes} live bytes in an arena of {arena}");
        if full.is_none() && s.held() == CAPACITY {
            full = Some((bytes, rss().unwrap_or(0)));
        }
        if full.is_some() {
            assert!(s.held() + step > CAPACITY, "turn {turns}: {} held after sliding by {step}", s.held());
            live.push(bytes);
        }
    }
    let (bytes, rss0) = full.expect("the cache filled");
    // Sliding drops a key group at a time, so a full cache's live bytes cycle; they must not trend up.
    let (early, late) = live.split_at(live.len() / 2);
    let peak = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let (lo, hi) = (live.iter().copied().min().unwrap_or(0), peak(&live));
    assert!(peak(late) <= peak(early), "live bytes peaked at {} early, {} late", peak(early), peak(late));

    assert!(s.caches()[0].counts().base > TOKENS - 2 * CAPACITY, "tokens slid out");
    assert_eq!(sink_bits(&s), sinks.unwrap(), "the sinks kept their bits");
    assert!(replied >= turns, "the model replied ({replied} tokens over {turns} turns)");
    match rss() {
        Some(now) => {
            assert!(now <= rss0 + RSS_SLACK, "resident memory grew from {rss0} to {now} bytes");
            eprintln!(
                "soak: {} tokens in {turns} turns ({replied} decoded), {} held, KV {lo}..={hi} bytes (first full {bytes}, arena {arena}), resident {} -> {} MiB",
                s.pos,
                s.held(),
                rss0 >> 20,
                now >> 20
            );
        }
        None => eprintln!("soak: no /proc/self/statm here: resident memory not checked"),
    }
}
