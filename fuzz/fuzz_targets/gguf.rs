//! The GGUF reader over arbitrary bytes: a header, metadata and tensor table parse or give an error; what
//! parses hands out only tensor bytes inside the file, and a tokenizer built from its metadata encodes.

#![no_main]

use kvq_host::gguf::Gguf;
use kvq_host::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    for t in &g.tensors {
        if let Ok(b) = g.tensor_bytes(data, t) {
            let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
            assert!(b.as_ptr() as usize >= start && b.as_ptr() as usize + b.len() <= end);
        }
    }
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let ids = tok.encode("Hello world <|im_start|> 123 \u{2581}é 🦀", true, true);
        let _ = tok.decode(&ids);
    }
});
