//! The library's typed errors ([`kvq_host::error::Error`]) on the tiny models made in Rust: each carries
//! the values the caller gave, and none speaks in command-line flags (the binary adds those; `cli.rs`
//! checks its wording).

mod common;

use kvq_core::cache::Overflow;
use kvq_host::error::Error;
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Session};

fn tiny(arch: &str) -> Model {
    Model::load(&common::tiny_path(arch)).unwrap()
}

#[test]
fn spec_errors_name_the_spec_and_no_flag() {
    for (given, says) in [
        ("kivi3", "unknown preset"),
        ("kivi2:s=4:s=8", "s is given twice"),
        ("kivi2:g=banana", "is not a whole number"),
        ("kivi2:zz=1", "unknown knob"),
    ] {
        match KvSpec::parse(given) {
            Err(e @ Error::Spec { .. }) => {
                let Error::Spec { spec, reason, local } = &e else { unreachable!() };
                assert_eq!((spec.as_str(), *local), (given, false));
                assert!(reason.contains(says), "{given}: {reason}");
                assert!(!e.to_string().contains("--kv"), "{e}");
            }
            other => panic!("{given}: {other:?}"),
        }
    }
    // A spec that parses but does not fit the model's shape: per-token value groups of 48 do not divide 64.
    let m = tiny("llama");
    let e = m.cache_config(&KvSpec::parse("kivi2:vg=48").unwrap(), 256, Overflow::Stop).unwrap_err();
    assert!(matches!(&e, Error::Spec { spec, local: false, .. } if spec == "kivi2:vg=48"), "{e:?}");
    // Local-layer specs come back marked as such.
    let mut g = tiny("gemma3");
    let e = g.set_local_kv(&KvSpec::parse("kivi2:nuq=1").unwrap()).unwrap_err();
    assert!(
        matches!(&e, Error::Spec { local: true, reason, .. } if reason.contains("global layers only")),
        "{e:?}"
    );
    let mut l = tiny("llama");
    let e = l.set_local_kv(&KvSpec::parse("kivi4").unwrap()).unwrap_err();
    assert!(matches!(&e, Error::Spec { local: true, .. }), "{e:?}");
}

#[test]
fn session_errors_carry_their_numbers() {
    let m = tiny("qwen2");
    let cfg = m.cache_config(&KvSpec::parse("f16").unwrap(), 16, Overflow::Stop).unwrap();
    let mut arenas = model::arenas(&m, &cfg).unwrap();
    let mut s = Session::new(&m, cfg, &mut arenas).unwrap();
    s.feed(&[5; 10]).unwrap();
    match s.feed(&[5; 7]) {
        Err(Error::ContextFull { held: 10, capacity: 16, needed: 7 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.held(), 10, "a refused chunk leaves nothing in the cache");
    let vocab = m.cfg.n_vocab;
    match s.feed(&[vocab as u32]) {
        Err(Error::Token { id, vocab: v }) => assert_eq!((id as usize, v), (vocab, vocab)),
        other => panic!("{other:?}"),
    }
    // A directory and a file that is not GGUF.
    assert!(
        matches!(Model::load(&std::env::temp_dir()), Err(Error::Model(m)) if m.contains("is a directory"))
    );
    let junk = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kvq-not-gguf.bin");
    std::fs::write(&junk, b"not a model at all").unwrap();
    assert!(matches!(Model::load(&junk), Err(Error::Gguf { path, .. }) if path == junk));
    let missing = junk.with_extension("missing");
    assert!(matches!(Model::load(&missing), Err(Error::Io { path, .. }) if path == missing));
}
