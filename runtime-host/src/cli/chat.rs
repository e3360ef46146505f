//! kvq chat: the terminal around the library's chat loop ([`kvq_host::chat::Chat`]): line editing and history on a terminal, Ctrl-C ending a reply.

use super::*;

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// System prompt.
    #[arg(long, default_value = "You are a helpful AI assistant named SmolLM, trained by Hugging Face")]
    pub(crate) system: String,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    pub(crate) n: usize,
}

pub(crate) fn chat(a: ChatArgs) -> Result<()> {
    let (model, tok, cfg) = prepare(&a.run, Overflow::Slide)?;
    let (fmt, _) = Turns::of(&model, &tok)?;
    let prefix = tok.encode(&fmt.system_prefix(&a.system), true, true).len();
    let cfg = chat_config(cfg, prefix)?;
    let mut arenas = model::arenas(&model, &cfg)?;
    let s = Session::new(&model, cfg, &mut arenas)?;
    let mut chat = Chat::new(&model, s, &tok, a.run.sample.sampler(), &a.system, a.n)?;
    eprintln!(
        "kvq chat: {} ({} layers), KV cache {} ({} tokens; when full: {}). /help lists the commands.",
        model.gguf.get("general.name").and_then(|v| v.as_str()).unwrap_or("model"),
        model.cfg.n_layer,
        a.run.cache.kv,
        cfg.capacity,
        match cfg.overflow {
            Overflow::Stop => "stop".to_owned(),
            Overflow::Slide => format!("slide, dropping the oldest tokens but the first {}", cfg.sinks),
        }
    );
    // Ctrl-C while a reply is made ends the reply; at the prompt, twice in a row quits (a terminal's
    // line editor reads it itself; this handler sees it when stdin is not a terminal).
    let keys = std::sync::Arc::new(Keys::default());
    let k = keys.clone();
    ctrlc::set_handler(move || {
        if k.replying.load(Ordering::SeqCst) {
            k.cancel.store(true, Ordering::SeqCst);
        } else if k.press_at_prompt() {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let mut input = Input::new()?;
    loop {
        let prompt = if chat.gathering() { ". " } else { "> " };
        let line = match input.read(prompt)? {
            Read::Line(l) => l,
            Read::Eof => break,
            Read::Interrupted if keys.press_at_prompt() => break,
            Read::Interrupted => continue,
            Read::NotUtf8 => {
                eprintln!("kvq: that line is not UTF-8 text; nothing was sent");
                continue;
            }
        };
        keys.at_prompt.store(0, Ordering::SeqCst);
        let msg = match chat.line(&line) {
            Line::Empty | Line::More => continue,
            Line::Quit => break,
            Line::Answer(a) => {
                eprintln!("{a}");
                continue;
            }
            Line::Message(m) => m,
        };
        keys.cancel.store(false, Ordering::SeqCst);
        keys.replying.store(true, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let r = chat.send(&msg, &keys.cancel, |piece| {
            write!(out, "{piece}")?;
            Ok(out.flush()?)
        });
        keys.replying.store(false, Ordering::SeqCst);
        writeln!(out)?;
        drop(out);
        match r {
            Ok(r) => {
                match r.end {
                    End::Done => {}
                    End::Limit => eprintln!("(the reply reached -n {} tokens)", a.n),
                    End::Cancelled => eprintln!("(stopped)"),
                    End::Full => eprintln!("(the context is full: the reply stops here; /reset starts over)"),
                }
                if let Some(n) = r.notice {
                    eprintln!("{n}");
                }
            }
            Err(e) => eprintln!("kvq: {e:#}"),
        }
    }
    Ok(())
}

/// The chat's Ctrl-C state, shared with the signal handler.
#[derive(Default)]
pub(crate) struct Keys {
    /// A reply is being made.
    pub(crate) replying: AtomicBool,
    /// Ctrl-C asked the reply to stop.
    pub(crate) cancel: AtomicBool,
    /// Ctrl-C presses at the prompt in a row.
    pub(crate) at_prompt: AtomicUsize,
}

impl Keys {
    /// A Ctrl-C at the prompt: true on the second in a row (quit), else a word on how to quit.
    fn press_at_prompt(&self) -> bool {
        if self.at_prompt.fetch_add(1, Ordering::SeqCst) >= 1 {
            return true;
        }
        eprintln!("\n(Ctrl-C again or Ctrl-D to quit)");
        false
    }
}

/// What one read at the chat's prompt gave.
pub(crate) enum Read {
    Line(String),
    Eof,
    Interrupted,
    NotUtf8,
}

/// The chat's input: a line editor with history on a terminal, plain lines otherwise (pipes, files).
pub(crate) enum Input {
    Editor(Box<rustyline::DefaultEditor>),
    Plain(std::io::StdinLock<'static>),
}

impl Input {
    fn new() -> Result<Self> {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            Ok(Input::Editor(Box::new(rustyline::DefaultEditor::new().context("starting the line editor")?)))
        } else {
            Ok(Input::Plain(std::io::stdin().lock()))
        }
    }

    fn read(&mut self, prompt: &str) -> Result<Read> {
        use rustyline::error::ReadlineError;
        match self {
            Input::Editor(ed) => match ed.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        // History is a convenience: a failure to record a line loses nothing.
                        let _ = ed.add_history_entry(line.as_str());
                    }
                    Ok(Read::Line(line))
                }
                Err(ReadlineError::Interrupted) => Ok(Read::Interrupted),
                Err(ReadlineError::Eof) => Ok(Read::Eof),
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => Ok(Read::NotUtf8),
                Err(e) => Err(e).context("reading your message"),
            },
            Input::Plain(stdin) => {
                eprint!("{prompt}");
                let mut buf = Vec::new();
                if stdin.read_until(b'\n', &mut buf).context("reading your message")? == 0 {
                    return Ok(Read::Eof);
                }
                Ok(String::from_utf8(buf).map_or(Read::NotUtf8, Read::Line))
            }
        }
    }
}
