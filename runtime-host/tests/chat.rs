//! `kvq chat`'s loop: driven as a library ([`kvq_host::chat::Chat`]) for the context rules on a tiny
//! model made in Rust (no download), and on the default model (real weights, the tests named `real_model`)
//! for answers, through a pipe and once through a pseudo-terminal for the keys a person presses.

mod common;

use kvq_core::cache::Overflow;
use kvq_host::chat::{Chat, End, Line, Turns, chat_config};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Session};
use kvq_host::sample::Sampler;
use kvq_host::tokenizer::Tokenizer;
use std::sync::atomic::AtomicBool;

const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// Runs `f` over a chat on `model` with `spec`, a `ctx`-token context and `overflow`.
fn with_chat(
    model: &Model,
    spec: &str,
    ctx: usize,
    overflow: Overflow,
    max_reply: usize,
    f: impl FnOnce(&mut Chat<'_>),
) {
    let tok = Tokenizer::from_gguf(&model.gguf).unwrap();
    let (fmt, _) = Turns::of(model, &tok).unwrap();
    let prefix = tok.encode(&fmt.system_prefix(SYSTEM), true, true).len();
    let cfg = model.cache_config(&KvSpec::parse(spec).unwrap(), ctx, overflow).unwrap();
    let cfg = chat_config(cfg, prefix).unwrap();
    if overflow == Overflow::Slide {
        assert!(cfg.sinks >= prefix, "a sliding chat keeps the system prompt as sinks");
    }
    let mut arenas = model::arenas(model, &cfg).unwrap();
    let s = Session::new(model, cfg, &mut arenas).unwrap();
    let mut chat = Chat::new(model, s, &tok, Sampler::greedy(), SYSTEM, max_reply).unwrap();
    f(&mut chat);
}

fn tiny(arch: &str) -> Model {
    Model::load(&common::tiny_path(arch)).unwrap()
}

fn send(chat: &mut Chat<'_>, msg: &str) -> kvq_host::chat::Reply {
    chat.send(msg, &AtomicBool::new(false), |_| Ok(())).unwrap()
}

/// A context that stops when full ends the reply, then refuses the next message with the numbers, and
/// the conversation goes on after `/reset`; commands never reach the model.
#[test]
fn full_context_ends_the_reply_not_the_chat() {
    for arch in common::TINY_ARCHS {
        full_context(&tiny(arch));
    }
}

fn full_context(model: &Model) {
    // The tiny vocabulary spells most words letter by letter: the system prompt alone is about 80 tokens.
    with_chat(model, "f16", 192, Overflow::Stop, 400, |chat| {
        let held = chat.session().held();
        assert!(matches!(chat.line("/help"), Line::Answer(a) if a.contains("/stats")));
        assert!(matches!(chat.line("/what"), Line::Answer(a) if a.contains("unknown command /what")));
        assert_eq!(chat.session().held(), held, "commands feed nothing");
        let r = send(chat, "Hi.");
        assert_eq!(r.end, End::Full, "the 192-token context fills before 400 tokens of reply: {r:?}");
        assert!(r.tokens > 10, "{r:?}");
        let held = chat.session().held();
        assert!(
            held <= 192 && held + 3 > 192,
            "the reply stops when the next token and the close would not fit: {held}"
        );
        let err = chat.send("And then?", &AtomicBool::new(false), |_| Ok(())).unwrap_err().to_string();
        assert!(
            err.contains("context is full") && err.contains("of 192 tokens") && err.contains("/reset"),
            "{err}"
        );
        assert_eq!(chat.session().held(), held, "a refused message leaves nothing in the cache");
        assert!(matches!(chat.line("/reset"), Line::Answer(_)));
        assert_eq!(chat.session().held(), 0);
        let r = send(chat, "Hello.");
        assert!(r.tokens > 0 && chat.session().held() > 10, "{r:?}");
    });
}

/// After a full context and `/reset`, the real model answers as it would in a fresh chat.
#[test]
fn real_model_answers_after_a_full_context_and_reset() {
    let model = common::model();
    with_chat(&model, "f16", 96, Overflow::Stop, 200, |chat| {
        let r = send(chat, "Write a long story about a dragon who learns to bake bread.");
        assert_eq!(r.end, End::Full, "{r:?}");
        assert!(matches!(chat.line("/reset"), Line::Answer(_)));
        let r = send(chat, "What is the capital of France?");
        assert_eq!(r.end, End::Done, "{r:?}");
        assert!(r.text.contains("Paris"), "{r:?}");
    });
}

/// A raised cancel flag ends the reply at once and is consumed: the next reply runs.
#[test]
fn cancel_ends_one_reply() {
    let model = tiny("llama");
    with_chat(&model, "kivi2", 512, Overflow::Slide, 16, |chat| {
        let held = chat.session().held();
        let r = chat.send("Hello there.", &AtomicBool::new(true), |_| Ok(())).unwrap();
        assert_eq!((r.end, r.tokens), (End::Cancelled, 0));
        assert!(chat.session().held() > held, "the message itself entered the cache");
        let r = send(chat, "Hello again.");
        assert_ne!(r.end, End::Cancelled, "{r:?}");
        assert!(r.tokens > 0, "{r:?}");
    });
}

/// Cancel raised while a long message is read stops the reading after one chunk: the reply is empty with
/// a notice giving the count, the chunk stays in the cache, and the next message closes the cut turn first
/// and gets its reply.
#[test]
fn cancel_while_reading_a_long_message() {
    let model = tiny("llama");
    with_chat(&model, "kivi2", 512, Overflow::Stop, 8, |chat| {
        let held = chat.session().held();
        let long = "the tin man ".repeat(40);
        let r = chat.send(&long, &AtomicBool::new(true), |_| Ok(())).unwrap();
        assert_eq!((r.end, r.tokens), (End::Cancelled, 0));
        assert_eq!(chat.session().held(), held + model::CHUNK, "exactly one chunk was read");
        let n = r.notice.unwrap();
        assert!(n.contains(&format!("after {} of ", model::CHUNK)) && n.contains("/reset"), "{n}");
        let r = send(chat, "Hello.");
        assert!(r.tokens > 0, "{r:?}");
    });
}

/// A sliding 2-bit chat keeps its system prompt as sinks, says once that it slides, and `/stats` tells the
/// f16 part apart: all of it before the window fills, part of it after.
#[test]
fn sliding_chat_keeps_the_system_prompt_and_says_so_once() {
    for arch in common::TINY_ARCHS {
        sliding_chat(&tiny(arch), arch);
    }
}

fn sliding_chat(model: &Model, arch: &str) {
    let tok = Tokenizer::from_gguf(&model.gguf).unwrap();
    let want = if arch == "gemma3" { Turns::Gemma } else { Turns::ChatMl };
    assert_eq!(Turns::of(model, &tok).unwrap().0, want, "{arch}: the turns of its template");
    with_chat(model, "kivi2", 256, Overflow::Slide, 80, |chat| {
        let sinks = chat.session().config().sinks;
        let r = send(chat, "Hi, I am Ada.");
        assert!(matches!(chat.line("/stats"), Line::Answer(a) if a.contains("f16 so far")), "{r:?}");
        let mut notices = 0;
        for topic in ["the moon", "the sun", "Mars", "Venus", "Jupiter"] {
            let r = send(chat, &format!("Tell me about {topic} in three sentences."));
            notices += usize::from(r.notice.is_some());
            if let Some(n) = &r.notice {
                assert!(n.contains(&format!("{sinks} tokens, stay")), "{n}");
            }
        }
        let s = chat.session();
        assert!(s.pos > s.config().capacity, "five answers overflow 256 tokens (position {})", s.pos);
        assert_eq!(notices, 1, "the first slide is announced once");
        // Gemma 3's local layers hold their own sliding ring of the window, without sinks.
        let whole = s.caches().iter().filter(|c| c.config().capacity == s.config().capacity);
        assert!(
            whole.clone().count() >= 1 && whole.clone().all(|c| c.counts().sinks == sinks),
            "{arch}: the sinks stay"
        );
        let stats = match chat.line("/stats") {
            Line::Answer(a) => a,
            other => panic!("{other:?}"),
        };
        assert!(stats.contains(&format!("({sinks} sinks, the rest the full-precision window")), "{stats}");
    });
}

/// Through a pseudo-terminal: the prompt, `/help` typed with the left arrow key (line editing), an unknown
/// command, Ctrl-C during a reply (back to the prompt, the chat alive), a reply after it, then Ctrl-C twice
/// at the prompt to leave.
#[test]
fn real_model_chat_through_a_terminal() {
    use rexpect::session::spawn_command;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvq"));
    cmd.args(["chat", "-t", "2", "-n", "400", "-c", "1024", "-m"]).arg(common::model_path());
    let mut p = spawn_command(cmd, Some(120_000)).unwrap();
    p.exp_string("/help lists the commands").unwrap();
    p.exp_string("> ").unwrap();
    // Line editing: "/hlp", two left arrows, "e" makes "/help" (raw escapes would make an unknown command).
    p.send("/hlp\x1b[D\x1b[De").unwrap();
    p.send_line("").unwrap();
    p.exp_string("/reset").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("/frobnicate").unwrap();
    p.exp_string("unknown command /frobnicate").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("Write a very long story about a dragon who learns to bake bread.").unwrap();
    // Some of the story, then Ctrl-C.
    p.exp_regex("[a-z]+ [a-z]+ [a-z]+ [a-z]+ ").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("(stopped)").unwrap();
    p.exp_string("> ").unwrap();
    p.send_line("What is the capital of France?").unwrap();
    p.exp_string("Paris").unwrap();
    p.exp_string("> ").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-C again").unwrap();
    p.send_control('c').unwrap();
    p.exp_eof().unwrap();
}

/// Piped input: a line that is not UTF-8 is refused with a message and the next line is answered; an
/// unknown command never reaches the model.
#[test]
fn real_model_chat_survives_a_line_that_is_not_utf8() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvq"));
    c.args(["chat", "-t", "2", "-n", "32", "-c", "512", "-m"]).arg(common::model_path());
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"\xff\xfe not text\n/nope\nWhat is the capital of France?\n").unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("that line is not UTF-8 text; nothing was sent"), "{stderr}");
    assert!(stderr.contains("unknown command /nope"), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| !l.trim().is_empty()).count(), 1, "one reply: {stdout}");
}
