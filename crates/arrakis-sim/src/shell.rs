//! The guest side of `POST …/cmd`: the agent's pre-check and a deterministic mini shell.
//!
//! The real agent first parses the command with go-shellwords (v1.0.12) and answers 400 when
//! that fails, then runs `bash -c <cmd>`. [`precheck`] mirrors the parser's rules exactly,
//! because which commands get the 500 "request failed with status: 400" is observable API.
//! [`Program`] is a small, deterministic stand-in for bash over a [`GuestFs`]: simple commands
//! joined by `;`, `&&`, `||` and newlines, quoting, `>`/`>>`/`2>`/`2>&1` redirects, `$?`, and a
//! handful of builtins. Anything it does not model fails loudly with exit status 2 instead of
//! doing something subtly different from bash.

use std::time::Duration;

use crate::fs::{resolve, FsError, GuestFs, SERVER_FILES};

/// How deep `bash script.sh` / `bash -c` may nest, so a self-calling script terminates.
const MAX_DEPTH: usize = 16;

/// True when the guest agent accepts `cmd`; false gives the guest's 400.
///
/// Mirrors go-shellwords' `Parser.Parse` with its default options: only the text before the
/// first unquoted `;`, `&`, `|`, `<` or `>` is parsed; it fails on unbalanced quotes or
/// backticks, a trailing backslash, an unquoted `(` not right after `$`, and a stray `)`
/// (which toggles its `$(` state). The agent also refuses blank commands and zero words.
pub fn precheck(cmd: &str) -> bool {
    if cmd.trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']).is_empty() {
        return false;
    }
    let mut args = 0usize;
    let mut buf = String::new();
    let (mut escaped, mut double, mut single, mut back, mut dollar) = (false, false, false, false, false);
    let mut got = false;
    for r in cmd.chars() {
        if escaped {
            buf.push(r);
            escaped = false;
            got = true;
            continue;
        }
        if r == '\\' {
            if single {
                buf.push(r);
            } else {
                escaped = true;
            }
            continue;
        }
        if matches!(r, ' ' | '\t' | '\r' | '\n') {
            if single || double || back || dollar {
                buf.push(r);
            } else if got {
                args += 1;
                buf.clear();
                got = false;
            }
            continue;
        }
        match r {
            '`' if !single && !double && !dollar => {
                back = !back;
                continue;
            }
            ')' if !single && !double && !back => {
                dollar = !dollar;
                continue;
            }
            '(' if !single && !double && !back => {
                if !dollar && buf.ends_with('$') {
                    dollar = true;
                    buf.push('(');
                    continue;
                }
                return false;
            }
            '"' if !single && !dollar => {
                if double {
                    got = true;
                }
                double = !double;
                continue;
            }
            '\'' if !double && !dollar => {
                if single {
                    got = true;
                }
                single = !single;
                continue;
            }
            ';' | '&' | '|' | '<' | '>' if !(single || double || back || dollar) => break,
            _ => {}
        }
        got = true;
        buf.push(r);
    }
    if got {
        args += 1;
    }
    !(escaped || single || double || back || dollar) && args > 0
}

/// What a running [`Program`] needs next from its executor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Sleep this long (unscaled guest time), then call [`Program::run`] again.
    Sleep(Duration),
    /// The script ended with this exit status.
    Done(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connector {
    Always,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Output,
    Discard,
    File { path: String, append: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Redirect {
    /// `N>file` / `N>>file`.
    ToFile { fd: u8, path: String, append: bool },
    /// `N>&M`.
    Dup { fd: u8, to: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Simple {
    argv: Vec<String>,
    redirects: Vec<Redirect>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    /// A newline separates commands like `;`, but blank lines are fine.
    Newline,
    Semi,
    And,
    Or,
    Redir {
        fd: u8,
        append: bool,
    },
    Dup {
        fd: u8,
        to: u8,
    },
}

/// A script that failed to parse: bash's message (or ours, for unsupported syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParseError(String);

fn unsupported(what: &str) -> ParseError {
    ParseError(format!("bash: arrakis-sim does not support {what}\n"))
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    let flush = |tokens: &mut Vec<Token>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            tokens.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\r' => flush(&mut tokens, &mut word, &mut in_word),
            '\n' => {
                flush(&mut tokens, &mut word, &mut in_word);
                tokens.push(Token::Newline);
            }
            '#' if !in_word => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(ParseError("bash: -c: line 1: unexpected EOF while looking for matching `''\n".into()));
                }
            }
            '"' => {
                in_word = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(ParseError(
                                "bash: -c: line 1: unexpected EOF while looking for matching `\"'\n".into(),
                            ))
                        }
                        Some('"') => break,
                        Some('\\') => match chars.get(i + 1) {
                            Some(&n @ ('"' | '\\' | '$' | '`')) => {
                                word.push(n);
                                i += 2;
                            }
                            Some('\n') => i += 2,
                            _ => {
                                word.push('\\');
                                i += 1;
                            }
                        },
                        Some('$') => {
                            i += expand_dollar(&chars, i, &mut word)?;
                        }
                        Some('`') => return Err(unsupported("command substitution")),
                        Some(&other) => {
                            word.push(other);
                            i += 1;
                        }
                    }
                }
            }
            '\\' => match chars.get(i + 1) {
                Some('\n') => i += 1,
                Some(&n) => {
                    word.push(n);
                    in_word = true;
                    i += 1;
                }
                None => {}
            },
            '$' => {
                in_word = true;
                i += expand_dollar(&chars, i, &mut word)?;
                continue;
            }
            ';' => {
                flush(&mut tokens, &mut word, &mut in_word);
                if chars.get(i + 1) == Some(&';') {
                    return Err(ParseError("bash: -c: line 1: syntax error near unexpected token `;;'\n".into()));
                }
                tokens.push(Token::Semi);
            }
            '&' => {
                flush(&mut tokens, &mut word, &mut in_word);
                if chars.get(i + 1) == Some(&'&') {
                    tokens.push(Token::And);
                    i += 1;
                } else {
                    return Err(unsupported("background jobs (&)"));
                }
            }
            '|' => {
                flush(&mut tokens, &mut word, &mut in_word);
                if chars.get(i + 1) == Some(&'|') {
                    tokens.push(Token::Or);
                    i += 1;
                } else {
                    return Err(unsupported("pipelines (|)"));
                }
            }
            '>' => {
                // A bare `1` or `2` right before `>` is a file descriptor, not a word.
                let fd = if in_word && (word == "1" || word == "2") && !quoted_word(&chars, i) {
                    let fd = if word == "2" { 2 } else { 1 };
                    word.clear();
                    in_word = false;
                    fd
                } else {
                    flush(&mut tokens, &mut word, &mut in_word);
                    1
                };
                if chars.get(i + 1) == Some(&'&') {
                    match chars.get(i + 2) {
                        Some('1') => tokens.push(Token::Dup { fd, to: 1 }),
                        Some('2') => tokens.push(Token::Dup { fd, to: 2 }),
                        _ => return Err(unsupported("this redirection")),
                    }
                    i += 2;
                } else if chars.get(i + 1) == Some(&'>') {
                    tokens.push(Token::Redir { fd, append: true });
                    i += 1;
                } else {
                    tokens.push(Token::Redir { fd, append: false });
                }
            }
            '<' => return Err(unsupported("input redirection (<)")),
            '(' | ')' => return Err(unsupported("subshells and functions")),
            '`' => return Err(unsupported("command substitution")),
            other => {
                word.push(other);
                in_word = true;
            }
        }
        i += 1;
    }
    flush(&mut tokens, &mut word, &mut in_word);
    Ok(tokens)
}

/// Whether the word ending just before `i` contained quotes (then `"2">f` is a word).
fn quoted_word(chars: &[char], i: usize) -> bool {
    i >= 2 && matches!(chars[i - 2], '"' | '\'')
}

/// Stands for `$?` inside a parsed word until the command runs (a private-use character, so
/// no real text collides with it).
const LAST_STATUS: char = '\u{F8FF}';

/// Lexes `$?` (expanded when its command runs); a lone `$` stays literal. Returns characters
/// consumed.
fn expand_dollar(chars: &[char], i: usize, word: &mut String) -> Result<usize, ParseError> {
    match chars.get(i + 1) {
        Some('?') => {
            word.push(LAST_STATUS);
            Ok(2)
        }
        Some(c) if c.is_ascii_alphanumeric() || matches!(c, '_' | '{' | '(') => {
            Err(unsupported("variables and command substitution ($…)"))
        }
        _ => {
            word.push('$');
            Ok(1)
        }
    }
}

fn parse(src: &str) -> Result<Vec<(Connector, Simple)>, ParseError> {
    let tokens = lex(src)?;
    let mut out = Vec::new();
    let mut connector = Connector::Always;
    let mut current = Simple { argv: Vec::new(), redirects: Vec::new() };
    let mut iter = tokens.into_iter();
    let syntax = |tok: &str| ParseError(format!("bash: -c: line 1: syntax error near unexpected token `{tok}'\n"));
    while let Some(tok) = iter.next() {
        match tok {
            Token::Word(w) => current.argv.push(w),
            Token::Redir { fd, append } => match iter.next() {
                Some(Token::Word(path)) => current.redirects.push(Redirect::ToFile { fd, path, append }),
                _ => return Err(syntax("newline")),
            },
            Token::Dup { fd, to } => current.redirects.push(Redirect::Dup { fd, to }),
            Token::Newline if current.is_empty() => {}
            Token::Semi | Token::And | Token::Or if current.is_empty() => {
                return Err(syntax(match tok {
                    Token::And => "&&",
                    Token::Or => "||",
                    _ => ";",
                }));
            }
            Token::Newline | Token::Semi | Token::And | Token::Or => {
                out.push((connector, std::mem::replace(&mut current, Simple::empty())));
                connector = match tok {
                    Token::And => Connector::And,
                    Token::Or => Connector::Or,
                    _ => Connector::Always,
                };
            }
        }
    }
    if current.is_empty() {
        if connector != Connector::Always {
            return Err(ParseError("bash: -c: line 2: syntax error: unexpected end of file\n".into()));
        }
    } else {
        out.push((connector, current));
    }
    Ok(out)
}

impl Simple {
    fn empty() -> Self {
        Self { argv: Vec::new(), redirects: Vec::new() }
    }

    fn is_empty(&self) -> bool {
        self.argv.is_empty() && self.redirects.is_empty()
    }
}

/// One level of script: the top-level command, or a nested `bash FILE` / `bash -c`.
#[derive(Debug, Clone)]
struct Frame {
    source: String,
    commands: Option<Vec<(Connector, Simple)>>,
    pc: usize,
}

/// What one builtin asks of the interpreter.
enum Flow {
    Status(i32),
    Sleep(Duration),
    Exit(i32),
    Nested(String),
}

/// A running guest command: call [`Program::run`] until it returns [`Step::Done`].
#[derive(Debug, Clone)]
pub struct Program {
    frames: Vec<Frame>,
    output: String,
    last: i32,
    cwd: String,
    hostname: String,
}

impl Program {
    /// A program for `bash -c <cmd>` in the agent's directory, on the VM named `hostname`.
    pub fn new(cmd: &str, hostname: &str) -> Self {
        Self {
            frames: vec![Frame { source: cmd.to_string(), commands: None, pc: 0 }],
            output: String::new(),
            last: 0,
            cwd: SERVER_FILES.to_string(),
            hostname: hostname.to_string(),
        }
    }

    /// Combined stdout and stderr so far.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// Runs commands until the script ends or a `sleep` needs real time to pass.
    pub fn run(&mut self, fs: &mut GuestFs) -> Step {
        loop {
            let Some(frame) = self.frames.last_mut() else {
                return Step::Done(self.last);
            };
            if frame.commands.is_none() {
                match parse(&frame.source) {
                    Ok(cmds) => frame.commands = Some(cmds),
                    Err(ParseError(msg)) => {
                        self.output.push_str(&msg);
                        self.last = 2;
                        self.frames.pop();
                        continue;
                    }
                }
            }
            let commands = frame.commands.as_deref().unwrap_or_default();
            let Some((connector, simple)) = commands.get(frame.pc).cloned() else {
                self.frames.pop();
                continue;
            };
            frame.pc += 1;
            let run = match connector {
                Connector::Always => true,
                Connector::And => self.last == 0,
                Connector::Or => self.last != 0,
            };
            if !run {
                continue;
            }
            match self.exec(&simple, fs) {
                Flow::Status(code) => self.last = code,
                Flow::Sleep(d) => {
                    self.last = 0;
                    return Step::Sleep(d);
                }
                Flow::Exit(code) => {
                    self.last = code;
                    self.frames.pop();
                }
                Flow::Nested(source) => {
                    if self.frames.len() >= MAX_DEPTH {
                        self.output.push_str("bash: maximum nesting level exceeded\n");
                        self.last = 2;
                    } else {
                        self.frames.push(Frame { source, commands: None, pc: 0 });
                    }
                }
            }
        }
    }

    fn exec(&mut self, cmd: &Simple, fs: &mut GuestFs) -> Flow {
        let status = self.last.to_string();
        let expand = |w: &String| w.replace(LAST_STATUS, &status);
        let cmd = Simple {
            argv: cmd.argv.iter().map(expand).collect(),
            redirects: cmd
                .redirects
                .iter()
                .map(|r| match r {
                    Redirect::ToFile { fd, path, append } => {
                        Redirect::ToFile { fd: *fd, path: expand(path), append: *append }
                    }
                    dup => dup.clone(),
                })
                .collect(),
        };
        let mut out_target = Target::Output;
        let mut err_target = Target::Output;
        for redirect in &cmd.redirects {
            match redirect {
                Redirect::ToFile { fd, path, append } => {
                    let target = if path == "/dev/null" {
                        Target::Discard
                    } else {
                        let abs = resolve(&self.cwd, path);
                        // Opening the file truncates or creates it even if nothing is written.
                        let opened = match fs.read(&abs) {
                            Ok(_) if *append => Ok(()),
                            _ => fs.write(&abs, "", false),
                        };
                        if let Err(e) = opened {
                            self.output.push_str(&format!("bash: line 1: {path}: {}\n", e.text()));
                            return Flow::Status(1);
                        }
                        Target::File { path: abs, append: true }
                    };
                    if *fd == 2 {
                        err_target = target;
                    } else {
                        out_target = target;
                    }
                }
                Redirect::Dup { fd, to } => {
                    let source = if *to == 2 { err_target.clone() } else { out_target.clone() };
                    if *fd == 2 {
                        err_target = source;
                    } else {
                        out_target = source;
                    }
                }
            }
        }
        let mut stdout = String::new();
        let mut stderr = String::new();
        let flow = match cmd.argv.split_first() {
            Some((name, args)) => self.builtin(name, args, fs, &mut stdout, &mut stderr),
            None => Flow::Status(0),
        };
        for (text, target) in [(stdout, out_target), (stderr, err_target)] {
            match target {
                Target::Output => self.output.push_str(&text),
                Target::Discard => {}
                Target::File { path, append } => {
                    // The file was opened above, so only a concurrent removal can fail here.
                    let _ = fs.write(&path, &text, append);
                }
            }
        }
        flow
    }

    fn builtin(&mut self, name: &str, args: &[String], fs: &mut GuestFs, out: &mut String, err: &mut String) -> Flow {
        let cwd = self.cwd.clone();
        match name {
            "true" | ":" => Flow::Status(0),
            "false" => Flow::Status(1),
            "echo" => {
                let (newline, words) = match args.split_first() {
                    Some((flag, rest)) if flag == "-n" => (false, rest),
                    _ => (true, args),
                };
                out.push_str(&words.join(" "));
                if newline {
                    out.push('\n');
                }
                Flow::Status(0)
            }
            "printf" => match args.split_first() {
                Some((format, rest)) => {
                    out.push_str(&printf(format, rest));
                    Flow::Status(0)
                }
                None => {
                    err.push_str("printf: usage: printf [-v var] format [arguments]\n");
                    Flow::Status(2)
                }
            },
            "exit" => match args.first() {
                None => Flow::Exit(self.last),
                Some(n) => match n.parse::<i64>() {
                    Ok(code) => Flow::Exit((code & 0xff) as i32),
                    Err(_) => {
                        err.push_str(&format!("bash: line 1: exit: {n}: numeric argument required\n"));
                        Flow::Exit(2)
                    }
                },
            },
            "sleep" => sleep_duration(args, err),
            "hostname" => {
                out.push_str(&self.hostname);
                out.push('\n');
                Flow::Status(0)
            }
            "whoami" => {
                out.push_str("root\n");
                Flow::Status(0)
            }
            "pwd" => {
                out.push_str(&self.cwd);
                out.push('\n');
                Flow::Status(0)
            }
            "cd" => {
                let target = args.first().map(String::as_str).unwrap_or("/root");
                let abs = resolve(&cwd, target);
                if fs.is_dir(&abs) {
                    self.cwd = abs;
                    Flow::Status(0)
                } else {
                    let why = if fs.exists(&abs) { FsError::NotADirectory } else { FsError::NotFound };
                    err.push_str(&format!("bash: line 1: cd: {target}: {}\n", why.text()));
                    Flow::Status(1)
                }
            }
            "cat" => {
                let mut status = 0;
                for file in args.iter().filter(|a| a.as_str() != "-") {
                    match fs.read(&resolve(&cwd, file)) {
                        Ok(content) => out.push_str(content),
                        Err(e) => {
                            err.push_str(&format!("cat: {file}: {}\n", e.text()));
                            status = 1;
                        }
                    }
                }
                Flow::Status(status)
            }
            "ls" => {
                let operands: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
                let targets: Vec<&str> =
                    if operands.is_empty() { vec!["."] } else { operands.iter().map(|s| s.as_str()).collect() };
                let mut status = 0;
                let many = targets.len() > 1;
                let mut first_block = true;
                for target in targets {
                    let abs = resolve(&cwd, target);
                    match fs.list(&abs) {
                        Ok(names) => {
                            if many {
                                if !first_block {
                                    out.push('\n');
                                }
                                out.push_str(&format!("{target}:\n"));
                            }
                            first_block = false;
                            for n in names {
                                out.push_str(&n);
                                out.push('\n');
                            }
                        }
                        Err(FsError::NotADirectory) if fs.read(&abs).is_ok() => {
                            out.push_str(target);
                            out.push('\n');
                        }
                        Err(e) => {
                            err.push_str(&format!("ls: cannot access '{target}': {}\n", e.text()));
                            status = 2;
                        }
                    }
                }
                Flow::Status(status)
            }
            "mkdir" => {
                let parents = args.iter().any(|a| a == "-p" || a == "--parents");
                let mut status = 0;
                for dir in args.iter().filter(|a| !a.starts_with('-')) {
                    let abs = resolve(&cwd, dir);
                    let res = if parents { fs.mkdir_all(&abs) } else { fs.mkdir(&abs) };
                    if let Err(e) = res {
                        err.push_str(&format!("mkdir: cannot create directory '{dir}': {}\n", e.text()));
                        status = 1;
                    }
                }
                Flow::Status(status)
            }
            "touch" => {
                let mut status = 0;
                for file in args.iter().filter(|a| !a.starts_with('-')) {
                    let abs = resolve(&cwd, file);
                    if fs.exists(&abs) {
                        continue;
                    }
                    if let Err(e) = fs.write(&abs, "", false) {
                        err.push_str(&format!("touch: cannot touch '{file}': {}\n", e.text()));
                        status = 1;
                    }
                }
                Flow::Status(status)
            }
            "rm" => {
                let flags: String = args.iter().filter(|a| a.starts_with('-')).flat_map(|a| a.chars()).collect();
                let (recursive, force) = (flags.contains('r') || flags.contains('R'), flags.contains('f'));
                let mut status = 0;
                for file in args.iter().filter(|a| !a.starts_with('-')) {
                    match fs.remove(&resolve(&cwd, file), recursive) {
                        Ok(()) => {}
                        Err(FsError::NotFound) if force => {}
                        Err(e) => {
                            err.push_str(&format!("rm: cannot remove '{file}': {}\n", e.text()));
                            status = 1;
                        }
                    }
                }
                Flow::Status(status)
            }
            "bash" | "sh" => match args.split_first() {
                Some((flag, rest)) if flag == "-c" => match rest.first() {
                    Some(source) => Flow::Nested(source.clone()),
                    None => {
                        err.push_str("bash: -c: option requires an argument\n");
                        Flow::Status(2)
                    }
                },
                Some((file, _)) => match fs.read(&resolve(&cwd, file)) {
                    Ok(source) => Flow::Nested(source.to_string()),
                    Err(e) => {
                        err.push_str(&format!("bash: {file}: {}\n", e.text()));
                        Flow::Status(127)
                    }
                },
                None => Flow::Status(0),
            },
            other => {
                err.push_str(&format!("bash: {other}: command not found\n"));
                Flow::Status(127)
            }
        }
    }
}

fn sleep_duration(args: &[String], err: &mut String) -> Flow {
    if args.is_empty() {
        err.push_str("sleep: missing operand\nTry 'sleep --help' for more information.\n");
        return Flow::Status(1);
    }
    let mut total = 0f64;
    for arg in args {
        let (number, unit) = match arg.char_indices().last() {
            Some((i, c @ ('s' | 'm' | 'h' | 'd'))) => (&arg[..i], c),
            _ => (arg.as_str(), 's'),
        };
        let factor = match unit {
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86400.0,
            _ => 1.0,
        };
        match number.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => total += n * factor,
            _ => {
                err.push_str(&format!(
                    "sleep: invalid time interval '{arg}'\nTry 'sleep --help' for more information.\n"
                ));
                return Flow::Status(1);
            }
        }
    }
    Flow::Sleep(Duration::from_secs_f64(total.min(1e9)))
}

/// `printf` with `%s`, `%d`, `%%` and the `\n`, `\t`, `\\` escapes; the format is reused while
/// arguments remain, as bash does.
fn printf(format: &str, args: &[String]) -> String {
    let mut out = String::new();
    let mut next = 0usize;
    loop {
        let mut chars = format.chars().peekable();
        let mut consumed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('\\') => out.push('\\'),
                    Some(other) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => out.push('\\'),
                },
                '%' => match chars.next() {
                    Some('%') => out.push('%'),
                    Some('s') | Some('d') => {
                        if let Some(arg) = args.get(next) {
                            out.push_str(arg);
                        }
                        next += 1;
                        consumed = true;
                    }
                    Some(other) => {
                        out.push('%');
                        out.push(other);
                    }
                    None => out.push('%'),
                },
                other => out.push(other),
            }
        }
        if !consumed || next >= args.len() {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str) -> (String, i32, GuestFs) {
        let mut fs = GuestFs::new("vm1");
        let mut program = Program::new(cmd, "vm1");
        loop {
            match program.run(&mut fs) {
                Step::Sleep(_) => continue,
                Step::Done(code) => return (program.output().to_string(), code, fs),
            }
        }
    }

    #[test]
    fn precheck_matches_go_shellwords() {
        for ok in [
            "echo hi",
            "ls; rm -rf /",
            "echo 'a b' \"c\"",
            "echo $(date)",
            "echo ok; echo 'unbalanced",
            "echo a && (subshell)",
            "''",
            "a\\ b",
        ] {
            assert!(precheck(ok), "{ok:?} should pass");
        }
        for bad in [
            "",
            "   \n\t",
            "echo 'unbalanced",
            "echo \"unbalanced",
            "echo `date",
            "echo trailing\\",
            "(subshell)",
            "f() { true; }",
            "; ls",
            "&& ls",
            "echo a)",
            "echo $($(x))",
        ] {
            assert!(!precheck(bad), "{bad:?} should fail");
        }
    }

    #[test]
    fn echo_and_exit_statuses() {
        assert_eq!(run("echo hello world"), ("hello world\n".into(), 0, run("true").2));
        assert_eq!(run("false").1, 1);
        assert_eq!(run("exit 3").1, 3);
        assert_eq!(run("exit 256").1, 0);
        assert_eq!(run("echo a; exit 4; echo b").0, "a\n");
        assert_eq!(run("false && echo no || echo yes").0, "yes\n");
        assert_eq!(run("false; echo $?").0, "1\n");
        let (out, code, _) = run("nosuch arg");
        assert_eq!((out.as_str(), code), ("bash: nosuch: command not found\n", 127));
    }

    #[test]
    fn files_and_redirects() {
        let (out, code, fs) =
            run("mkdir -p out/logs && echo hi > out/logs/a.txt && echo more >> out/logs/a.txt && cat out/logs/a.txt && ls out");
        assert_eq!((out.as_str(), code), ("hi\nmore\nlogs\n", 0));
        assert_eq!(fs.read("/tmp/server_files/out/logs/a.txt"), Ok("hi\nmore\n"));
        let (out, code, _) = run("cat nope");
        assert_eq!((out.as_str(), code), ("cat: nope: No such file or directory\n", 1));
        let (out, code, _) = run("cat nope 2>/dev/null; echo x > missing/dir/f");
        assert_eq!(out, "bash: line 1: missing/dir/f: No such file or directory\n");
        assert_eq!(code, 1);
        let (out, _, fs) = run("cat nope > err.txt 2>&1; hostname; pwd");
        assert_eq!(out, "vm1\n/tmp/server_files\n");
        assert_eq!(fs.read("/tmp/server_files/err.txt"), Ok("cat: nope: No such file or directory\n"));
    }

    #[test]
    fn sleep_yields_to_the_executor() {
        let mut fs = GuestFs::new("vm");
        let mut program = Program::new("echo a; sleep 1.5; echo b", "vm");
        assert_eq!(program.run(&mut fs), Step::Sleep(Duration::from_millis(1500)));
        assert_eq!(program.output(), "a\n");
        assert_eq!(program.run(&mut fs), Step::Done(0));
        assert_eq!(program.output(), "a\nb\n");
        assert_eq!(run("sleep x").1, 1);
    }

    #[test]
    fn nested_scripts_and_unsupported_syntax() {
        let (out, code, _) = run("echo 'echo in; exit 5' > s.sh; bash s.sh; echo after $?");
        assert_eq!((out.as_str(), code), ("in\nafter 5\n", 0));
        assert_eq!(run("bash -c 'echo nested'").0, "nested\n");
        let (out, code, _) = run("echo a | cat");
        assert!(out.contains("does not support pipelines"), "{out}");
        assert_eq!(code, 2);
        assert_eq!(run("echo ok; echo 'x").1, 2);
        assert_eq!(run("printf '%s-%s\\n' a b").0, "a-b\n");
    }
}
