//! The guest side of `POST …/cmd`: the agent's pre-check and a deterministic mini shell.
//!
//! The real agent first parses the command with go-shellwords (v1.0.12) and answers 400 when
//! that fails, then runs `bash -c <cmd>`. [`precheck`] mirrors the parser's rules exactly,
//! because which commands get the 500 "request failed with status: 400" is observable API.
//! [`Program`] is a small, deterministic stand-in for bash over a [`GuestFs`]: simple commands
//! joined by `;`, `&&`, `||` and newlines, quoting, `>`/`>>`/`2>`/`2>&1` redirects, `$?`, and a
//! handful of builtins. Anything it does not model fails loudly with exit status 2 instead of
//! doing something subtly different from bash.
//!
//! Processes: every running command has a pid and a process group in the VM's [`Processes`].
//! A command ending in `&` runs as a background child (same group, `$!` is its pid); `$$` is
//! the shell's own pid; `wait [PID]` waits for a child and takes its status; `setsid CMD`
//! makes the command a group leader (as a non-leader, setsid does not fork, so the pid stays);
//! `nohup CMD` runs CMD; `kill [-SIG] [--] PID|-PGID` signals a process or a whole group, which
//! ends with status 128 + signal. Background children outlive the call that started them.

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
    /// Ended by a single `&`: runs as a background child.
    background: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    /// A newline separates commands like `;`, but blank lines are fine.
    Newline,
    Semi,
    /// A single `&`: the command before it runs in the background.
    Amp,
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
                    tokens.push(Token::Amp);
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
/// Stands for `$!` (the last background child's pid) until its command runs.
const LAST_CHILD: char = '\u{F8FE}';
/// Stands for `$$` (the shell's pid) until its command runs.
const OWN_PID: char = '\u{F8FD}';

/// Lexes `$?` (expanded when its command runs); a lone `$` stays literal. Returns characters
/// consumed.
fn expand_dollar(chars: &[char], i: usize, word: &mut String) -> Result<usize, ParseError> {
    match chars.get(i + 1) {
        Some('?') => {
            word.push(LAST_STATUS);
            Ok(2)
        }
        Some('!') => {
            word.push(LAST_CHILD);
            Ok(2)
        }
        Some('$') => {
            word.push(OWN_PID);
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
    let mut current = Simple::empty();
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
            Token::Semi | Token::And | Token::Or | Token::Amp if current.is_empty() => {
                return Err(syntax(match tok {
                    Token::And => "&&",
                    Token::Or => "||",
                    Token::Amp => "&",
                    _ => ";",
                }));
            }
            Token::Amp => {
                current.background = true;
                out.push((connector, std::mem::replace(&mut current, Simple::empty())));
                connector = Connector::Always;
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
        Self { argv: Vec::new(), redirects: Vec::new(), background: false }
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
    /// Where its commands' stdout and stderr go unless they redirect: the caller's, or the
    /// files a redirect on `bash FILE > out` named.
    stdout: Target,
    stderr: Target,
}

/// What one builtin asks of the interpreter.
enum Flow {
    Status(i32),
    Sleep(Duration),
    Exit(i32),
    Nested(String),
    /// `wait`: the child has not ended yet; run this command again after a while.
    Waiting,
}

/// How long a `wait` sleeps between looks at its child.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Signal numbers `kill` knows, by name.
const SIGNALS: [(&str, i32); 5] = [("HUP", 1), ("INT", 2), ("KILL", 9), ("TERM", 15), ("STOP", 19)];

/// One guest process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub pgid: u32,
    /// The command line, for assertions.
    pub command: String,
    /// A signal sent to it that it has not died of yet.
    pub signal: Option<i32>,
}

/// A VM's processes: the running ones, and the exit statuses `wait` may still collect.
#[derive(Debug, Clone, Default)]
pub struct Processes {
    last_pid: u32,
    running: std::collections::BTreeMap<u32, Process>,
    exited: std::collections::BTreeMap<u32, i32>,
}

impl Processes {
    /// Registers a new process, in `pgid`'s group or (`None`) leading its own.
    pub fn spawn(&mut self, pgid: Option<u32>, command: &str) -> u32 {
        // Low pids belong to the guest's init and services.
        self.last_pid = self.last_pid.max(300) + 1;
        let pid = self.last_pid;
        let process = Process { pid, pgid: pgid.unwrap_or(pid), command: command.to_string(), signal: None };
        self.running.insert(pid, process);
        pid
    }

    /// Records that `pid` ended with `code`.
    pub fn exit(&mut self, pid: u32, code: i32) {
        if self.running.remove(&pid).is_some() {
            self.exited.insert(pid, code);
        }
    }

    /// The signal `pid` has been sent, if any.
    pub fn pending_signal(&self, pid: u32) -> Option<i32> {
        self.running.get(&pid).and_then(|p| p.signal)
    }

    /// Sends `signal` to process `target`, or to group `-target`; false when none matched.
    pub fn kill(&mut self, target: i64, signal: i32) -> bool {
        let mut hit = false;
        for process in self.running.values_mut() {
            let matches =
                if target < 0 { i64::from(process.pgid) == -target } else { i64::from(process.pid) == target };
            if matches {
                process.signal = Some(signal);
                hit = true;
            }
        }
        hit
    }

    /// Running processes, by pid.
    pub fn running(&self) -> impl Iterator<Item = &Process> {
        self.running.values()
    }

    /// Every process dies (the guest stopped or rebooted); pids keep counting up.
    pub fn clear(&mut self) {
        self.running.clear();
        self.exited.clear();
    }

    fn set_group(&mut self, pid: u32, pgid: u32) {
        if let Some(process) = self.running.get_mut(&pid) {
            process.pgid = pgid;
        }
    }
}

/// A running guest command: call [`Program::run`] until it returns [`Step::Done`].
#[derive(Debug, Clone)]
pub struct Program {
    frames: Vec<Frame>,
    output: String,
    last: i32,
    cwd: String,
    hostname: String,
    /// Its pid and process group once registered ([`Program::register`]); 0 before.
    pid: u32,
    pgid: u32,
    /// `$!`.
    last_child: Option<u32>,
    label: String,
    /// Output targets for the frame a `bash FILE` about to nest will push.
    nested_targets: Option<(Target, Target)>,
    /// Background children started since the executor last took them.
    spawned: Vec<Program>,
}

impl Program {
    /// A program for `bash -c <cmd>` in the agent's directory, on the VM named `hostname`.
    pub fn new(cmd: &str, hostname: &str) -> Self {
        Self {
            frames: vec![Frame {
                source: cmd.to_string(),
                commands: None,
                pc: 0,
                stdout: Target::Output,
                stderr: Target::Output,
            }],
            output: String::new(),
            last: 0,
            cwd: SERVER_FILES.to_string(),
            hostname: hostname.to_string(),
            pid: 0,
            pgid: 0,
            last_child: None,
            label: cmd.to_string(),
            nested_targets: None,
            spawned: Vec::new(),
        }
    }

    /// Registers the program as a new process leading its own group (the agent's `bash -c`);
    /// a background child is registered by its parent. Returns its pid.
    pub fn register(&mut self, procs: &mut Processes, command: &str) -> u32 {
        if self.pid == 0 {
            self.pid = procs.spawn(None, command);
            self.pgid = self.pid;
        }
        self.pid
    }

    /// Its command line: the agent's `bash -c` text, or a background child's words.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its pid (0 until registered).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Background children it started since the last call; each is registered already and
    /// runs on its own.
    pub fn take_spawned(&mut self) -> Vec<Program> {
        std::mem::take(&mut self.spawned)
    }

    /// Combined stdout and stderr so far.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// Runs commands until the script ends or a `sleep` needs real time to pass, with no
    /// other processes around (unit tests).
    pub fn run(&mut self, fs: &mut GuestFs) -> Step {
        let mut procs = Processes::default();
        self.register(&mut procs, "");
        self.run_with(fs, &mut procs)
    }

    /// [`Program::run`] among the VM's processes: background children, `wait` and `kill`.
    pub fn run_with(&mut self, fs: &mut GuestFs, procs: &mut Processes) -> Step {
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
            if simple.background {
                let command = simple.argv.join(" ");
                let child_pid = procs.spawn(Some(self.pgid), &command);
                let mut child = Program::new(&command, &self.hostname);
                child.frames[0].commands = Some(vec![(Connector::Always, Simple { background: false, ..simple })]);
                child.cwd = self.cwd.clone();
                child.last = self.last;
                (child.pid, child.pgid) = (child_pid, self.pgid);
                self.spawned.push(child);
                self.last_child = Some(child_pid);
                self.last = 0;
                continue;
            }
            match self.exec(&simple, fs, procs) {
                Flow::Status(code) => self.last = code,
                Flow::Waiting => {
                    if let Some(frame) = self.frames.last_mut() {
                        frame.pc -= 1;
                    }
                    return Step::Sleep(WAIT_POLL);
                }
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
                        let (stdout, stderr) = self.nested_targets.take().unwrap_or((Target::Output, Target::Output));
                        self.frames.push(Frame { source, commands: None, pc: 0, stdout, stderr });
                    }
                }
            }
        }
    }

    fn exec(&mut self, cmd: &Simple, fs: &mut GuestFs, procs: &mut Processes) -> Flow {
        let status = self.last.to_string();
        let last_child = self.last_child.map(|pid| pid.to_string()).unwrap_or_default();
        let own_pid = self.pid.to_string();
        let expand =
            |w: &String| w.replace(LAST_STATUS, &status).replace(LAST_CHILD, &last_child).replace(OWN_PID, &own_pid);
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
            background: false,
        };
        let frame = self.frames.last();
        let mut out_target = frame.map_or(Target::Output, |f| f.stdout.clone());
        let mut err_target = frame.map_or(Target::Output, |f| f.stderr.clone());
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
            Some((name, args)) => self.builtin(name, args, fs, procs, &mut stdout, &mut stderr),
            None => Flow::Status(0),
        };
        for (text, target) in [(stdout, out_target.clone()), (stderr, err_target.clone())] {
            match target {
                Target::Output => self.output.push_str(&text),
                Target::Discard => {}
                Target::File { path, append } => {
                    // The file was opened above, so only a concurrent removal can fail here.
                    let _ = fs.write(&path, &text, append);
                }
            }
        }
        if matches!(flow, Flow::Nested(_)) {
            self.nested_targets = Some((out_target, err_target));
        }
        flow
    }

    fn builtin(
        &mut self,
        name: &str,
        args: &[String],
        fs: &mut GuestFs,
        procs: &mut Processes,
        out: &mut String,
        err: &mut String,
    ) -> Flow {
        let cwd = self.cwd.clone();
        match name {
            "setsid" | "nohup" => match args.split_first() {
                Some((command, rest)) => {
                    if name == "setsid" {
                        self.pgid = self.pid;
                        procs.set_group(self.pid, self.pid);
                    }
                    self.builtin(command, rest, fs, procs, out, err)
                }
                None => {
                    err.push_str(&format!("{name}: missing operand\n"));
                    Flow::Status(if name == "nohup" { 125 } else { 1 })
                }
            },
            "wait" => match args.first() {
                None => Flow::Status(0),
                Some(arg) => match arg.parse::<u32>() {
                    Ok(pid) if procs.running.contains_key(&pid) => Flow::Waiting,
                    Ok(pid) => match procs.exited.get(&pid) {
                        Some(code) => Flow::Status(*code),
                        None => {
                            err.push_str(&format!("bash: wait: pid {pid} is not a child of this shell\n"));
                            Flow::Status(127)
                        }
                    },
                    Err(_) => {
                        err.push_str(&format!("bash: wait: `{arg}': not a pid or valid job spec\n"));
                        Flow::Status(2)
                    }
                },
            },
            "kill" => kill(args, procs, err),
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

/// `kill [-SIG | -s SIG | -N] [--] TARGET...`: a positive target is a pid, a negative one a
/// process group.
fn kill(args: &[String], procs: &mut Processes, err: &mut String) -> Flow {
    let mut signal = 15;
    let mut rest = args;
    let by_name = |name: &str| {
        let name = name.trim_start_matches("SIG");
        SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, number)| *number).or_else(|| name.parse().ok())
    };
    match rest.first().map(String::as_str) {
        Some("-s") => match rest.get(1).and_then(|n| by_name(n)) {
            Some(number) => (signal, rest) = (number, &rest[2..]),
            None => {
                err.push_str("bash: kill: invalid signal specification\n");
                return Flow::Status(1);
            }
        },
        Some(flag) if flag.starts_with('-') && flag != "--" && flag.len() > 1 && by_name(&flag[1..]).is_some() => {
            signal = by_name(&flag[1..]).unwrap_or(15);
            rest = &rest[1..];
        }
        _ => {}
    }
    if rest.first().map(String::as_str) == Some("--") {
        rest = &rest[1..];
    }
    if rest.is_empty() {
        err.push_str("kill: usage: kill [-s sigspec | -n signum | -sigspec] pid | jobspec ... or kill -l [sigspec]\n");
        return Flow::Status(2);
    }
    let mut status = 0;
    for target in rest {
        match target.parse::<i64>() {
            Ok(n) if n != 0 && procs.kill(n, signal) => {}
            Ok(_) => {
                err.push_str(&format!("bash: kill: ({target}) - No such process\n"));
                status = 1;
            }
            Err(_) => {
                err.push_str(&format!("bash: kill: {target}: arguments must be process or job IDs\n"));
                status = 1;
            }
        }
    }
    Flow::Status(status)
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

    /// Runs `cmd` and every background child it starts, round-robin (sleeps take no time),
    /// killing `kill_after` steps in whatever `kill` names then; returns the VM's state.
    fn run_processes(fs: &mut GuestFs, procs: &mut Processes, cmd: &str, max_steps: usize) -> (String, i32) {
        let mut main = Program::new(cmd, "vm");
        let main_pid = main.register(procs, cmd);
        let mut others: Vec<Program> = Vec::new();
        let mut main_done = None;
        for _ in 0..max_steps {
            if main_done.is_none() {
                match main.run_with(fs, procs) {
                    Step::Done(code) => {
                        procs.exit(main_pid, code);
                        main_done = Some(code);
                    }
                    Step::Sleep(_) => {}
                }
                others.extend(main.take_spawned());
            }
            let mut still = Vec::new();
            for mut child in std::mem::take(&mut others) {
                if let Some(signal) = procs.pending_signal(child.pid()) {
                    procs.exit(child.pid(), 128 + signal);
                    continue;
                }
                let step = child.run_with(fs, procs);
                let spawned = child.take_spawned();
                match step {
                    Step::Done(code) => procs.exit(child.pid(), code),
                    Step::Sleep(_) => still.push(child),
                }
                still.extend(spawned);
            }
            others = still;
            if let (Some(code), true) = (main_done, others.is_empty()) {
                return (main.output().to_string(), code);
            }
        }
        (main.output().to_string(), main_done.unwrap_or(-1))
    }

    const DETACHED: &str =
        "setsid bash /tmp/job.sh > /tmp/job.out 2>&1 & echo $! > /tmp/job.pid; wait $!; echo $? > /tmp/job.exit";

    #[test]
    fn a_detached_job_records_its_pid_output_and_exit_status() {
        let mut fs = GuestFs::new("vm");
        fs.write("/tmp/job.sh", "echo started; sleep 1; echo done; exit 3", false).unwrap();
        let mut procs = Processes::default();
        let (out, code) = run_processes(&mut fs, &mut procs, DETACHED, 100);
        assert_eq!((out.as_str(), code), ("", 0));
        assert_eq!(fs.read("/tmp/job.out").unwrap(), "started\ndone\n");
        assert_eq!(fs.read("/tmp/job.exit").unwrap(), "3\n", "wait took the child's status");
        let pid: u32 = fs.read("/tmp/job.pid").unwrap().trim().parse().unwrap();
        assert!(pid > 300, "$! is the child's pid: {pid}");
        assert_eq!(procs.running().count(), 0, "everything ended");
    }

    #[test]
    fn killing_a_group_stops_the_job_and_its_waiter_records_the_signal() {
        let mut fs = GuestFs::new("vm");
        fs.write("/tmp/job.sh", "echo started; sleep 100; echo never", false).unwrap();
        let mut procs = Processes::default();
        // Start it: a few steps, and it sleeps.
        let mut main = Program::new(DETACHED, "vm");
        let main_pid = main.register(&mut procs, DETACHED);
        assert!(matches!(main.run_with(&mut fs, &mut procs), Step::Sleep(_)), "the waiter waits");
        let mut child = main.take_spawned().pop().expect("one background child");
        assert!(matches!(child.run_with(&mut fs, &mut procs), Step::Sleep(_)), "the job sleeps");
        let pid = child.pid();
        assert_eq!(fs.read("/tmp/job.pid").unwrap(), format!("{pid}\n"));
        let group: Vec<(u32, u32)> = procs.running().map(|p| (p.pid, p.pgid)).collect();
        assert_eq!(group, vec![(main_pid, main_pid), (pid, pid)], "setsid made the job its own group leader");

        let (out, code) = run_processes(&mut fs, &mut procs, &format!("kill -TERM -- -{pid}"), 10);
        assert_eq!((out.as_str(), code), ("", 0));
        assert_eq!(procs.pending_signal(pid), Some(15));
        assert_eq!(procs.pending_signal(main_pid), None, "the waiter is in another group");
        procs.exit(pid, 128 + 15);
        assert_eq!(main.run_with(&mut fs, &mut procs), Step::Done(0));
        assert_eq!(fs.read("/tmp/job.exit").unwrap(), "143\n");
        assert_eq!(fs.read("/tmp/job.out").unwrap(), "started\n", "what ran so far");

        let (out, code) = run_processes(&mut fs, &mut procs, &format!("kill {pid}"), 10);
        assert_eq!(code, 1);
        assert_eq!(out, format!("bash: kill: ({pid}) - No such process\n"));
    }

    #[test]
    fn own_pid_nohup_and_wait_errors_behave_like_bash() {
        let mut fs = GuestFs::new("vm");
        let mut procs = Processes::default();
        let (out, code) = run_processes(&mut fs, &mut procs, "echo $$; nohup echo hi; wait 99999; echo $?", 20);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].parse::<u32>().unwrap() > 300, "{out}");
        assert_eq!(&lines[1..], ["hi", "bash: wait: pid 99999 is not a child of this shell", "127"]);
        assert_eq!(code, 0);
        assert_eq!(run("echo a &").0, "", "a background child's output is not the caller's");
        assert_eq!(run("& echo").1, 2, "`&` with no command is a syntax error");
    }
}
