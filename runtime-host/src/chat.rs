//! One conversation with a model, driven a line at a time: the loop behind `kvq chat`, kept apart from the
//! terminal so tests can drive it.
//!
//! [`Chat::line`] takes what the user typed. Lines starting with `/` are commands answered here, never sent
//! to the model. A line ending in `\` continues on the next, and a line of `"""` opens a block that runs to
//! the next `"""` (for pasting text with blank lines). [`Chat::send`] feeds a message and streams the reply.
//! The reply ends at the model's end-of-turn token, at the length limit, when the caller raises the cancel
//! flag (Ctrl-C), or when a context that stops when full has no room left. None of these ends the
//! conversation.
//!
//! When the cache slides ([`Overflow::Slide`]), [`chat_config`] makes its sinks hold at least the system
//! prompt, so it is never dropped. The first slide is announced once.

use crate::model::{Arch, Model, Session};
use crate::sample::Sampler;
use crate::tokenizer::{Tokenizer, Utf8Stream};
use anyhow::{Context, Result, bail};
use kvq_core::cache::{CacheConfig, Overflow};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Sinks kept when a window can slide and the spec keeps fewer (StreamingLLM's four).
pub const SLIDE_SINKS: usize = 4;

/// The commands [`Chat::line`] answers, with their help lines.
pub const COMMANDS: [(&str, &str); 5] = [
    ("/help", "this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/stats", "tokens held, KV memory, bits per element and the f16 part, decode speed"),
    ("/quit", "leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)"),
    ("\"\"\"", "start or end a multi-line message (a line ending in \\ also continues)"),
];

/// ChatML, the default model's template: `<|im_start|>role\ncontent<|im_end|>\n`.
fn chatml(role: &str, content: &str) -> String {
    format!("<|im_start|>{role}\n{content}<|im_end|>\n")
}

/// A model's turn format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turns {
    /// `<|im_start|>role\n…<|im_end|>\n`, a system turn first.
    ChatMl,
    /// Gemma's `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`: no system role, so the
    /// system text opens the first user turn, followed by a blank line (as Gemma's template does).
    Gemma,
}

impl Turns {
    /// The conversation's opening before the first user message.
    pub fn open(self, system: &str) -> String {
        match self {
            Turns::ChatMl => chatml("system", system),
            Turns::Gemma => String::new(),
        }
    }

    /// A user turn and the opening of the reply; `system` is given with the first turn.
    pub fn user(self, msg: &str, system: Option<&str>) -> String {
        match self {
            Turns::ChatMl => format!("{}<|im_start|>assistant\n", chatml("user", msg)),
            Turns::Gemma => {
                let sys = system.filter(|s| !s.is_empty()).map(|s| format!("{s}\n\n")).unwrap_or_default();
                format!("<start_of_turn>user\n{sys}{msg}<end_of_turn>\n<start_of_turn>model\n")
            }
        }
    }

    /// The text before the first message's own words: the system prompt with its framing.
    pub fn system_prefix(self, system: &str) -> String {
        match self {
            Turns::ChatMl => self.open(system),
            Turns::Gemma if system.is_empty() => "<start_of_turn>user\n".into(),
            Turns::Gemma => format!("<start_of_turn>user\n{system}\n\n"),
        }
    }

    /// The model's turn format and the id that ends a turn: ChatML, or Gemma's when the template uses
    /// `<start_of_turn>` (or a Gemma 3 GGUF carries no template, as the base model does, and its vocabulary
    /// has the turn tokens).
    ///
    /// # Errors
    /// Other templates, named as such.
    pub fn of(model: &Model, tok: &Tokenizer) -> Result<(Turns, u32)> {
        let tmpl = model.gguf.get("tokenizer.chat_template").and_then(|v| v.as_str());
        let gemma_vocab = tok.id("<start_of_turn>").is_some();
        let gemma = || Ok((Turns::Gemma, tok.id("<end_of_turn>").context("no <end_of_turn> token")?));
        match tmpl {
            Some(t) if t.contains("<|im_start|>") && tok.id("<|im_start|>").is_some() => {
                Ok((Turns::ChatMl, tok.id("<|im_end|>").context("no <|im_end|> token")?))
            }
            Some(t) if t.contains("<start_of_turn>") && gemma_vocab => gemma(),
            None if gemma_vocab && model.cfg.arch == Arch::Gemma3 => gemma(),
            _ => bail!(
                "this model's chat template is neither ChatML nor Gemma's; chat and demo support those (use generate)"
            ),
        }
    }
}

/// Samples up to `n` tokens from `logits` on, feeding each back into `s`, until `stop` says a token ends
/// the reply (that token is neither fed nor handed on); `on_token` sees each token. Returns the count.
///
/// # Errors
/// `on_token`'s error, or the session's.
pub fn reply(
    s: &mut Session<'_>,
    sampler: &mut Sampler,
    mut logits: Vec<f32>,
    stop: impl Fn(u32) -> bool,
    n: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<usize> {
    for i in 0..n {
        let id = sampler.sample(&logits);
        if stop(id) {
            return Ok(i);
        }
        on_token(id)?;
        logits = s.feed(&[id])?;
    }
    Ok(n)
}

/// The cache configuration for a chat: `cfg` with, when it slides, sinks enough to hold the system prompt
/// (`prefix_tokens`) and at least [`SLIDE_SINKS`].
///
/// # Errors
/// When the context cannot hold those sinks beside the window it slides by, with the smallest context
/// that can.
pub fn chat_config(mut cfg: CacheConfig, prefix_tokens: usize) -> Result<CacheConfig> {
    if cfg.overflow == Overflow::Slide {
        let sinks = cfg.sinks.max(prefix_tokens).max(SLIDE_SINKS);
        let before = cfg.sinks;
        cfg.sinks = sinks;
        if let Err(e) = cfg.validate() {
            let need = sinks + cfg.residual + cfg.slide_step();
            bail!(
                "a sliding chat keeps the system prompt ({prefix_tokens} tokens) as {sinks} sinks (the spec \
                 gave {before}); with them the context must hold at least {need} tokens, and it holds {} ({e})",
                cfg.capacity
            );
        }
    }
    Ok(cfg)
}

/// What [`Chat::line`] made of a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Nothing to do (an empty line).
    Empty,
    /// Part of a message that continues on the next line.
    More,
    /// A command's answer, to show the user.
    Answer(String),
    /// The user asked to leave.
    Quit,
    /// A whole message, to hand to [`Chat::send`].
    Message(String),
}

/// What [`Composer::push`] made of a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Composed {
    /// Nothing (an empty line, or a block that held only blank lines).
    Empty,
    /// Part of a message that continues on the next line.
    More,
    /// A `/command`, trimmed.
    Command(String),
    /// A whole message.
    Message(String),
}

/// Gathers typed lines into messages: a line ending in `\\` continues on the next, a line of `"""` opens
/// a block that runs to the next `"""`; a line starting with `/` is a command (inside a message it is
/// text).
#[derive(Default)]
pub struct Composer {
    /// The message so far, and whether it is a `"""` block.
    partial: Option<(String, bool)>,
}

impl Composer {
    /// Whether a message is being gathered.
    pub fn gathering(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes one line (a trailing newline is ignored).
    pub fn push(&mut self, line: &str) -> Composed {
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some((mut text, block)) = self.partial.take() {
            if block {
                if line.trim() == "\"\"\"" {
                    return Self::message(text);
                }
                text.push_str(line);
                text.push('\n');
                self.partial = Some((text, true));
                return Composed::More;
            }
            return match line.strip_suffix('\\') {
                Some(head) => {
                    text.push_str(head);
                    text.push('\n');
                    self.partial = Some((text, false));
                    Composed::More
                }
                None => {
                    text.push_str(line);
                    Self::message(text)
                }
            };
        }
        let trimmed = line.trim();
        if trimmed == "\"\"\"" {
            self.partial = Some((String::new(), true));
            return Composed::More;
        }
        if let Some(head) = line.strip_suffix('\\') {
            self.partial = Some((format!("{head}\n"), false));
            return Composed::More;
        }
        if trimmed.is_empty() {
            Composed::Empty
        } else if trimmed.starts_with('/') {
            Composed::Command(trimmed.to_owned())
        } else {
            Composed::Message(line.to_owned())
        }
    }

    fn message(text: String) -> Composed {
        let text = text.trim_end_matches('\n');
        if text.trim().is_empty() { Composed::Empty } else { Composed::Message(text.to_owned()) }
    }
}

/// Why a reply ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The model ended its turn.
    Done,
    /// The most tokens a reply may have were generated.
    Limit,
    /// The cancel flag was raised.
    Cancelled,
    /// The context is full and does not slide: the reply stopped where it was.
    Full,
}

/// A reply: its text, token count and how it ended, and any notice for the user (the first slide).
#[derive(Debug)]
pub struct Reply {
    /// The text streamed.
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// How it ended.
    pub end: End,
    /// Said once, on the turn the context first slides.
    pub notice: Option<String>,
}

/// One conversation over a session.
pub struct Chat<'a> {
    s: Session<'a>,
    tok: &'a Tokenizer,
    fmt: Turns,
    end: u32,
    sampler: Sampler,
    system: String,
    max_reply: usize,
    /// Tokens waiting to enter the cache before the next message (the opening, a turn's close).
    pending: Vec<u32>,
    first: bool,
    slid: bool,
    lines: Composer,
    gen_tokens: usize,
    gen_secs: f64,
}

impl<'a> Chat<'a> {
    /// A conversation over `s` with the model's turn format, `system` as its system prompt, and replies
    /// of at most `max_reply` tokens.
    ///
    /// # Errors
    /// When the model's template is not one kvq can follow.
    pub fn new(
        model: &Model,
        s: Session<'a>,
        tok: &'a Tokenizer,
        sampler: Sampler,
        system: &str,
        max_reply: usize,
    ) -> Result<Self> {
        let (fmt, end) = Turns::of(model, tok)?;
        Ok(Self {
            s,
            tok,
            fmt,
            end,
            sampler,
            system: system.to_owned(),
            max_reply,
            pending: tok.encode(&fmt.open(system), true, true),
            first: true,
            slid: false,
            lines: Composer::default(),
            gen_tokens: 0,
            gen_secs: 0.0,
        })
    }

    /// The session (for its caches and counts).
    pub fn session(&self) -> &Session<'a> {
        &self.s
    }

    /// Whether a multi-line message is being gathered (the prompt shows it).
    pub fn gathering(&self) -> bool {
        self.lines.gathering()
    }

    /// Takes one line the user typed (without its newline).
    pub fn line(&mut self, line: &str) -> Line {
        match self.lines.push(line) {
            Composed::Empty => Line::Empty,
            Composed::More => Line::More,
            Composed::Command(c) => self.command(&c),
            Composed::Message(m) => Line::Message(m),
        }
    }

    fn command(&mut self, cmd: &str) -> Line {
        match cmd.split_whitespace().next().unwrap_or("") {
            "/quit" | "/exit" => Line::Quit,
            "/help" | "/?" => Line::Answer(help()),
            "/reset" => {
                self.reset();
                Line::Answer("(history cleared; the system prompt stays)".into())
            }
            "/stats" => Line::Answer(self.stats()),
            other => Line::Answer(format!("unknown command {other}; /help lists them (nothing was sent)")),
        }
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.s.reset();
        self.pending = self.tok.encode(&self.fmt.open(&self.system), true, true);
        self.first = true;
        self.slid = false;
    }

    /// Tokens held, KV memory, bits per element with the f16 part, and the decode speed so far.
    pub fn stats(&self) -> String {
        let s = &self.s;
        let cfg = s.config();
        let global = s.caches().iter().map(|c| c.usage()).find(|u| u.tokens == s.held()).unwrap_or_default();
        let hd = cfg.kv_heads * cfg.head_dim;
        let fp_tokens = (global.sink_bytes + global.window_bytes) / (4 * hd).max(1);
        let note = if s.held() == 0 {
            String::new()
        } else if fp_tokens >= s.held() {
            format!(
                "; all {} tokens are f16 so far: the sinks ({}) and the full-precision window ({}) fill before \
                 any token is quantized",
                s.held(),
                cfg.sinks,
                cfg.residual
            )
        } else {
            format!(
                "; {fp_tokens} of the {} tokens are f16 ({} sinks, the rest the full-precision window of up to {})",
                s.held(),
                cfg.sinks,
                cfg.residual
            )
        };
        let rate = if self.gen_tokens == 0 {
            "no reply yet".to_owned()
        } else {
            format!("decode {:.1} tok/s", self.gen_tokens as f64 / self.gen_secs.max(1e-9))
        };
        format!(
            "tokens held {} of {} (position {}), KV {:.2} MiB, {:.3} bits per element{note}; {rate}",
            s.held(),
            cfg.capacity,
            s.pos,
            s.kv_bytes() as f64 / (1 << 20) as f64,
            s.bits_per_element(),
        )
    }

    /// The tokens that close a reply's turn: `<|im_end|>\n` or `<end_of_turn>\n`.
    fn close(&self) -> Vec<u32> {
        let mut close = vec![self.end];
        close.extend(self.tok.encode("\n", false, false));
        close
    }

    /// Room left in a context that stops when full (`usize::MAX` when it slides).
    fn room(&self) -> usize {
        let cfg = self.s.config();
        match cfg.overflow {
            Overflow::Slide => usize::MAX,
            Overflow::Stop => cfg.capacity.saturating_sub(self.s.held()),
        }
    }

    /// Sends `msg` and streams the reply to `on_text` (whole UTF-8 characters) until it ends; `cancel`,
    /// raised from another thread (Ctrl-C), ends it after the token being made. The reply's tokens stay
    /// in the conversation and its turn is closed. Raised while the message is being read, `cancel` stops
    /// the reading after the chunk of [`crate::model::CHUNK`] tokens in hand (the first is always read):
    /// the reply is then empty and [`End::Cancelled`], with a notice saying how much was read.
    ///
    /// # Errors
    /// A message that does not fit the context that is left (nothing of it enters the cache), `on_text`'s
    /// error, or the model's (an activation that is not finite).
    pub fn send(
        &mut self,
        msg: &str,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Reply> {
        let close = self.close();
        let mut ids = self.pending.clone();
        ids.extend(self.tok.encode(
            &self.fmt.user(msg, self.first.then_some(self.system.as_str())),
            false,
            true,
        ));
        // The message and its reply's close must fit.
        if ids.len() + close.len() > self.room() {
            let cfg = self.s.config();
            bail!(
                "the context is full: it holds {} of {} tokens and this message needs {} more; /reset starts \
                 over (a larger context, or one that slides, holds more)",
                self.s.held(),
                cfg.capacity,
                ids.len() + close.len()
            );
        }
        let before = self.s.pos.saturating_sub(self.s.held());
        // A chunk at a time (the chunks `Session::feed` makes, so the same arithmetic), stopping at a chunk
        // boundary when `cancel` is raised: a pasted document can take seconds to read.
        let mut logits = Vec::new();
        let mut read = 0;
        for chunk in ids.chunks(crate::model::CHUNK) {
            if read > 0 && cancel.swap(false, Ordering::Relaxed) {
                break;
            }
            logits = self.s.feed(chunk).context("reading the message")?;
            read += chunk.len();
        }
        if read < ids.len() {
            // What was read stays (a quantized cache cannot take tokens back); the turn is closed before
            // the next message, after whatever of the earlier pending tokens was not read.
            let unread = self.pending.len().saturating_sub(read);
            self.pending = [&self.pending[self.pending.len() - unread..], &close[..]].concat();
            self.first &= unread > 0;
            let notice = format!(
                "(stopped reading the message after {read} of {} tokens; what was read stays in the context, \
                 /reset clears it)",
                ids.len()
            );
            return Ok(Reply { text: String::new(), tokens: 0, end: End::Cancelled, notice: Some(notice) });
        }
        self.pending.clear();
        self.first = false;
        let t = Instant::now();
        let mut stream = Utf8Stream::default();
        let (mut text, mut tokens, mut end) = (String::new(), 0, End::Limit);
        while tokens < self.max_reply {
            if cancel.swap(false, Ordering::Relaxed) {
                end = End::Cancelled;
                break;
            }
            let id = self.sampler.sample(&logits);
            if id == self.end || Some(id) == self.tok.eos {
                end = End::Done;
                break;
            }
            // Room for this token and the turn's close.
            if self.room() < 1 + close.len() {
                end = End::Full;
                break;
            }
            let piece = stream.push(&self.tok.token_bytes(id));
            on_text(&piece)?;
            text.push_str(&piece);
            tokens += 1;
            logits = self.s.feed(&[id])?;
        }
        self.gen_tokens += tokens;
        self.gen_secs += t.elapsed().as_secs_f64();
        if end == End::Full {
            // The close still fits; in the cache now, the record stays whole.
            self.s.feed(&close)?;
        } else {
            // Fed with the next message.
            self.pending = close;
        }
        let dropped = self.s.pos.saturating_sub(self.s.held());
        let notice = (!self.slid && dropped > before).then(|| {
            self.slid = true;
            let cfg = self.s.config();
            format!(
                "(the context is full: from now on the oldest tokens slide out, {} at a time; the system \
                 prompt and sinks, {} tokens, stay)",
                cfg.slide_step(),
                cfg.sinks
            )
        });
        Ok(Reply { text, tokens, end, notice })
    }
}

/// The `/help` text.
pub fn help() -> String {
    let mut s = String::from("commands (answered here, never sent to the model):");
    for (c, what) in COMMANDS {
        s.push_str(&format!("\n  {c:<8} {what}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{Composed, Composer, Turns, help};

    /// Gemma's template (Gemma 3 instruct GGUFs): BOS, then `<start_of_turn>user\n` with the system text and
    /// a blank line before the first message, `<end_of_turn>\n`, and the reply opened with
    /// `<start_of_turn>model\n`; later turns carry no system text.
    #[test]
    fn gemma_turns_render_as_its_template() {
        let g = Turns::Gemma;
        assert_eq!(g.open("Be brief."), "");
        assert_eq!(
            g.user("Hi", Some("Be brief.")),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(g.user("Bye", None), "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n");
        assert_eq!(g.user("Hi", Some("")), "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
        assert!(g.user("Hi", Some("Be brief.")).starts_with(&g.system_prefix("Be brief.")));
        let c = Turns::ChatMl;
        assert_eq!(c.open("S"), "<|im_start|>system\nS<|im_end|>\n");
        assert_eq!(c.user("Hi", Some("S")), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(c.system_prefix("S"), c.open("S"));
    }

    /// Commands, continuation lines and `"""` blocks, as typed.
    #[test]
    fn lines_compose_into_messages_and_commands() {
        let mut c = Composer::default();
        assert_eq!(c.push("hello there\n"), Composed::Message("hello there".into()));
        assert_eq!(c.push("   "), Composed::Empty);
        assert_eq!(c.push("  /help  "), Composed::Command("/help".into()));
        assert_eq!(c.push("/nonsense arg"), Composed::Command("/nonsense arg".into()));
        // A backslash continues; the lines join with newlines.
        assert_eq!(c.push("first \\"), Composed::More);
        assert!(c.gathering());
        assert_eq!(c.push("/second\\"), Composed::More);
        assert_eq!(c.push("third"), Composed::Message("first \n/second\nthird".into()));
        assert!(!c.gathering());
        // A block keeps blank lines and commands as text.
        assert_eq!(c.push("\"\"\""), Composed::More);
        for l in ["line one", "", "/reset is text here", "  indented"] {
            assert_eq!(c.push(l), Composed::More);
        }
        assert_eq!(
            c.push(" \"\"\" "),
            Composed::Message("line one\n\n/reset is text here\n  indented".into())
        );
        // An empty block sends nothing.
        assert_eq!(c.push("\"\"\""), Composed::More);
        assert_eq!(c.push(""), Composed::More);
        assert_eq!(c.push("\"\"\""), Composed::Empty);
        assert!(help().contains("/reset") && help().contains("/stats") && help().contains("/quit"));
    }
}
