//! `kiln run`: a command in a fresh microVM, with its output and exit code.
//!
//! The recipe: a per-run directory ([`rundir`]); the image as a read-only
//! ext4 drive; an initramfs holding only kiln's agent ([`initramfs`]); a VM
//! with the image drive, a vsock device (the agent's channel), an entropy
//! device and one virtio-fs device per `--mount`, built and run in this
//! process by the same [`Vmm`] as `--config-file`; then the session with the
//! agent ([`host`]) until the command's exit status, and the VM's end.

mod host;
pub mod initramfs;
mod machine;
pub mod rundir;
pub mod template;

use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{NetMode, RunArgs};
use crate::devices::virtio::net::passt;
use crate::image::ImageConfig;
use crate::protocol::{self, ExecSpec, ExitStatus, Msg, AGENT_PORT, VERSION};
use crate::terminal::RawMode;
use crate::vmm::exit::ExitReason;
use host::Ending;

/// Exit codes (as `docker run` and `timeout` use them).
pub mod code {
    pub const TIMEOUT: u8 = 124;
    pub const KILN_FAILED: u8 = 125;
    pub const NOT_EXECUTABLE: u8 = 126;
    pub const NOT_FOUND: u8 = 127;
}

/// Console lines kept to explain a failure.
const CONSOLE_TAIL: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no guest kernel: {} does not exist (build it with tools/build-guest-kernel, or pass --kernel)", .0.display())]
    NoKernel(PathBuf),
    #[error("cannot find kiln's guest agent at {} (it is built beside kiln as kiln-agent)", .0.display())]
    NoAgent(PathBuf),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--env-file {}: line {line} is not K=V", path.display())]
    EnvFile { path: PathBuf, line: usize },
    #[error("--mount {}: not a directory", .0.display())]
    MountNotDir(PathBuf),
    #[error("the VM cannot be built")]
    Config(#[source] crate::config::Error),
    #[error("the VM cannot be built")]
    Vmm(#[source] crate::vmm::Error),
    #[error("--image")]
    Image(#[source] crate::image::Error),
    #[error("the guest did not start kiln's agent within {0:?}")]
    BootTimeout(Duration),
    #[error("the VM ended before its agent called in ({0})")]
    VmEnded(String),
    #[error("cannot make kiln's default image")]
    DefaultImage(#[source] crate::image::busybox::Error),
    #[error("the agent")]
    Protocol(#[source] protocol::Error),
    #[error("the agent speaks protocol version {0}, this kiln {VERSION}")]
    Version(u32),
    #[error("the guest cannot build the command's root: {0}")]
    Prepare(String),
    #[error("no command: give one after `--` (the image has no Entrypoint or Cmd)")]
    NoCommand,
    #[error("--net passt: there is no passt in PATH (install Debian's package passt)")]
    NoPasst,
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// `${XDG_CACHE_HOME:-~/.cache}/kiln`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("kiln")
}

/// The image's root file system and defaults.
struct Image {
    ext4: PathBuf,
    config: ImageConfig,
    /// Its digest, when it came from an OCI or docker image.
    id: Option<String>,
}

/// The image given, made ready (see [`crate::image`]); without one, kiln's
/// default (busybox) image.
fn prepare_image(spec: Option<&Path>, scratch: &Path, quiet: bool) -> Result<Image, Error> {
    let mut progress = |m: &str| {
        if !quiet {
            eprintln!("kiln: {m}");
        }
    };
    let Some(spec) = spec else {
        let ext4 = crate::image::busybox::image(&cache_dir(), &mut progress)
            .map_err(Error::DefaultImage)?;
        return Ok(Image {
            ext4,
            config: ImageConfig {
                cmd: vec!["/bin/sh".into()],
                ..ImageConfig::default()
            },
            id: None,
        });
    };
    let prepared =
        crate::image::prepare(spec, &cache_dir(), scratch, &mut progress).map_err(Error::Image)?;
    if let Some(id) = &prepared.id {
        log::info!("image {}: {id}", spec.display());
    }
    Ok(Image {
        ext4: prepared.ext4,
        config: prepared.config,
        id: prepared.id,
    })
}

/// `--env`, `--env-file` and the image's Env, with PATH and TERM defaults.
fn environment(args: &RunArgs, image: &Image) -> Result<Vec<String>, Error> {
    let mut env: Vec<(String, String)> = vec![(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    )];
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    };
    for kv in &image.config.env {
        if let Some((k, v)) = kv.split_once('=') {
            set(k, v);
        }
    }
    if args.tty {
        set(
            "TERM",
            &std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    for path in &args.env_files {
        let text = std::fs::read_to_string(path).map_err(io_err(format!(
            "--env-file {}: cannot read it",
            path.display()
        )))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or(Error::EnvFile {
                path: path.clone(),
                line: i + 1,
            })?;
            set(k.trim(), v);
        }
    }
    for kv in &args.env {
        match kv.split_once('=') {
            Some((k, v)) => set(k, v),
            None => {
                if let Ok(v) = std::env::var(kv) {
                    set(kv, &v);
                }
            }
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// Keeps the guest console's last lines (to explain a failure), and shows
/// it on stderr when asked.
#[derive(Clone)]
struct ConsoleTail {
    lines: Arc<Mutex<Vec<u8>>>,
    show: bool,
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.show {
            let _ = std::io::stderr().write_all(buf);
        }
        let mut l = crate::devices::bus::lock(&self.lines);
        l.extend_from_slice(buf);
        let excess = l.len().saturating_sub(16 * 1024);
        l.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleTail {
    fn tail(&self) -> String {
        let l = crate::devices::bus::lock(&self.lines);
        let text = String::from_utf8_lossy(&l);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(CONSOLE_TAIL);
        lines[start..].join("\n")
    }
}

/// Runs `kiln run`; returns kiln's exit code.
pub fn main(args: RunArgs, log_level: Option<log::LevelFilter>) -> u8 {
    let level = log_level.unwrap_or(log::LevelFilter::Warn);
    let opts = crate::logger::Options::new(None, Some(level));
    if let Err(e) = crate::logger::init(&opts) {
        eprintln!("kiln: error: {}", crate::error_chain(&e));
        return code::KILN_FAILED;
    }
    if args.prune {
        return prune();
    }
    let show_console = args.console || level >= log::LevelFilter::Debug;
    let console = ConsoleTail {
        lines: Arc::default(),
        show: show_console,
    };
    match run(&args, console.clone()) {
        Ok(ending) => finish(ending, &console),
        Err(e) => {
            eprintln!("kiln: error: {}", crate::error_chain(&e));
            if matches!(e, Error::VmEnded(_) | Error::BootTimeout(_)) && !show_console {
                eprintln!("kiln: the guest console's last lines:\n{}", console.tail());
            }
            code::KILN_FAILED
        }
    }
}

/// `kiln run --prune`.
fn prune() -> u8 {
    let base = template::base();
    match template::prune(&base) {
        Ok(p) => {
            eprintln!(
                "kiln: removed {} templates ({:.1} MiB) from {}{}",
                p.templates,
                p.bytes as f64 / (1024.0 * 1024.0),
                base.display(),
                if p.busy > 0 {
                    format!("; {} in use were left", p.busy)
                } else {
                    String::new()
                }
            );
            0
        }
        Err(e) => {
            eprintln!("kiln: error: cannot prune {}: {e}", base.display());
            code::KILN_FAILED
        }
    }
}

fn finish(ending: Ending, console: &ConsoleTail) -> u8 {
    match ending {
        Ending::Exited(ExitStatus::Code(c)) => u8::try_from(c & 0xff).unwrap_or(code::KILN_FAILED),
        Ending::Exited(ExitStatus::Signal(s)) => {
            u8::try_from(128 + (s & 0x7f)).unwrap_or(code::KILN_FAILED)
        }
        Ending::Failed(c, message) => {
            // The text comes from the guest: escaped for the terminal.
            eprintln!("kiln: {}", message.escape_debug());
            c
        }
        Ending::TimedOut => {
            eprintln!("kiln: --timeout: the command was stopped");
            code::TIMEOUT
        }
        Ending::Signalled(s) => {
            eprintln!("kiln: the command did not end after signal {s}; the VM was stopped");
            u8::try_from(128 + (s & 0x7f)).unwrap_or(code::KILN_FAILED)
        }
        Ending::Lost(why) => {
            eprintln!("kiln: error: the command's exit status never arrived: {why}");
            eprintln!("kiln: the guest console's last lines:\n{}", console.tail());
            code::KILN_FAILED
        }
    }
}

fn run(args: &RunArgs, console: ConsoleTail) -> Result<Ending, Error> {
    // First, so that every run (even one that fails at once) removes what
    // killed runs left behind.
    let mut timeline = Timeline::new();
    let dir =
        rundir::RunDir::create(&rundir::base()).map_err(io_err("cannot make the run directory"))?;
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(|| cache_dir().join("vmlinux"));
    if !kernel.exists() {
        return Err(Error::NoKernel(kernel));
    }
    let exe = std::env::current_exe().map_err(io_err("cannot find kiln's own executable"))?;
    let agent = exe.with_file_name("kiln-agent");
    if !agent.is_file() {
        return Err(Error::NoAgent(agent));
    }
    for m in &args.mounts {
        if !m.host.is_dir() {
            return Err(Error::MountNotDir(m.host.clone()));
        }
    }
    // Before anything is built: a restore that fails on it would take the
    // template for a broken one.
    if args.net == NetMode::Passt && !in_path(passt::PROGRAM) {
        return Err(Error::NoPasst);
    }
    let image = prepare_image(args.image.as_deref(), dir.path(), args.quiet)?;
    timeline.image = timeline.since_start();
    let argv: Vec<String> = if args.command.is_empty() {
        image
            .config
            .entrypoint
            .iter()
            .chain(&image.config.cmd)
            .cloned()
            .collect()
    } else {
        image
            .config
            .entrypoint
            .iter()
            .chain(&args.command)
            .cloned()
            .collect()
    };
    if argv.is_empty() {
        return Err(Error::NoCommand);
    }
    let env = environment(args, &image)?;

    let uds = dir.path().join("v.sock");
    let agent_sock = PathBuf::from(format!("{}_{AGENT_PORT}", uds.display()));
    let listener = std::os::unix::net::UnixListener::bind(&agent_sock)
        .map_err(io_err("cannot listen for the agent"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("cannot listen for the agent"))?;
    let recipe = machine::Recipe {
        kernel: &kernel,
        agent: &agent,
        initrd: dir.path().join("initramfs.cpio"),
        image: &image.ext4,
        uds: &uds,
        cpus: args.cpus,
        memory_mib: args.memory,
        shares: args
            .mounts
            .iter()
            .map(|m| (m.host.clone(), m.read_only))
            .collect(),
        net: args.net,
        console: console.clone(),
    };
    let template = if args.cold {
        None
    } else {
        template_for(&recipe, &exe, &image, dir.path())
    };

    // Signals are ours to pass on: block them before any VM thread starts
    // (they inherit the mask), and read them from a signalfd.
    let signals = host::signal_fd().map_err(io_err("cannot watch signals"))?;
    let mut progress = |m: &str| {
        if !args.quiet {
            eprintln!("kiln: {m}");
        }
    };
    let before_vm = timeline.since_start();
    let started = machine::start(&recipe, &listener, template.as_ref(), &mut progress)?;
    timeline.warm = started.warm;
    timeline.built = before_vm + started.built;
    timeline.hello = before_vm + started.hello;
    timeline.ready = before_vm + started.ready;
    timeline.saved = started.saved;
    timeline.uptimes = started.uptimes;
    let machine = started.machine;
    // From here on the VM runs: `machine` stops it on every way out.
    let result = (|| {
        // Before the command runs (the VM was built, maybe restored or
        // saved as a template, above): from here on the guest may be hostile.
        crate::seccomp::enter(crate::seccomp::ThreadKind::RunSession)?;
        let tty = args.tty && std::io::stdin().is_terminal();
        let spec = ExecSpec {
            argv,
            env,
            cwd: args
                .workdir
                .clone()
                .or(image.config.working_dir.clone())
                .unwrap_or_else(|| "/".into()),
            user: args.user.clone().or(image.config.user.clone()),
            hostname: "kiln".into(),
            tty: args.tty,
            winsize: if args.tty {
                host::winsize(std::io::stdin().as_raw_fd())
            } else {
                None
            },
            stdin: args.interactive,
            mounts: args
                .mounts
                .iter()
                .enumerate()
                .map(|(i, m)| protocol::Mount {
                    tag: format!("m{i}"),
                    path: m.guest.clone(),
                    read_only: m.read_only,
                })
                .collect(),
        };
        let mut stream = started.stream;
        launch(&mut stream, spec)?;
        let _raw = if tty && args.interactive {
            RawMode::enable(std::io::stdin().as_fd())
                .map_err(io_err("cannot put the terminal in raw mode"))?
        } else {
            None
        };
        let ending = host::session(
            stream,
            host::Watch {
                signals: &signals,
                timeout: args.timeout,
                vm_ended: machine.ended(),
                stdin: args.interactive,
                tty: args.tty,
                started: timeline.started.clone(),
            },
        );
        Ok(ending)
    })();
    timeline.exited = timeline.since_start();
    // The agent powers the VM off after reporting.
    let end = machine.finish(matches!(
        result,
        Ok(Ending::Exited(_)) | Ok(Ending::Failed(..))
    ));
    let result = match (result, end) {
        (Ok(Ending::Lost(_)), Some(ExitReason::GuestPanic)) => {
            Ok(Ending::Lost("the guest kernel panicked".into()))
        }
        (r, _) => r,
    };
    drop(dir);
    timeline.ended = timeline.since_start();
    timeline.log();
    result
}

/// Whether `program` is an executable file in one of PATH's directories.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The template this run's VM can start from, unless its image has no
/// identity that outlives the run (a host folder, made into an image per
/// run) or kiln cannot tell what the VM is made of.
fn template_for(
    recipe: &machine::Recipe,
    exe: &Path,
    image: &Image,
    scratch: &Path,
) -> Option<template::Template> {
    if image.ext4.starts_with(scratch) {
        log::info!("the image is made per run: booting cold, without a template");
        return None;
    }
    let parts = template::KeyParts {
        kiln: exe,
        agent: recipe.agent,
        kernel: recipe.kernel,
        image_id: image.id.as_deref(),
        image_file: &image.ext4,
        cpus: recipe.cpus,
        memory_mib: recipe.memory_mib,
        shares: recipe.shares.len(),
        net: recipe.net.name(),
    };
    match parts.text() {
        Ok(key) => Some(template::Template::new(template::base(), key)),
        Err(e) => {
            log::warn!("booting cold: cannot tell which template fits this VM: {e}");
            None
        }
    }
}

/// The host's clock and fresh entropy, then what to run.
fn launch(stream: &mut std::os::unix::net::UnixStream, spec: ExecSpec) -> Result<(), Error> {
    let mut entropy = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
        .map_err(io_err(
            "cannot read entropy for the guest from /dev/urandom",
        ))?;
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    protocol::write_msg(stream, &Msg::Resume { unix_ns, entropy }).map_err(Error::Protocol)?;
    protocol::write_msg(stream, &Msg::Exec(Box::new(spec))).map_err(Error::Protocol)
}

/// When each step of a run ended, from the start of the run; logged at
/// info (`tools/bench-run` reads it).
struct Timeline {
    start: Instant,
    image: Duration,
    /// The VM built (cold) or restored (warm).
    built: Duration,
    /// The agent's Hello.
    hello: Duration,
    /// The agent's Ready (cold); the Hello (warm).
    ready: Duration,
    /// Saving a new template, after Ready.
    saved: Duration,
    warm: bool,
    /// The agent's guest uptimes (ms): when it started as PID 1, when it
    /// said Hello.
    uptimes: (u32, u32),
    started: Arc<std::sync::OnceLock<Instant>>,
    exited: Duration,
    ended: Duration,
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            image: Duration::ZERO,
            built: Duration::ZERO,
            hello: Duration::ZERO,
            ready: Duration::ZERO,
            saved: Duration::ZERO,
            warm: false,
            uptimes: (0, 0),
            started: Arc::default(),
            exited: Duration::ZERO,
            ended: Duration::ZERO,
        }
    }

    fn since_start(&self) -> Duration {
        self.start.elapsed()
    }

    fn log(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let started = self
            .started
            .get()
            .map_or(self.exited, |t| t.duration_since(self.start));
        let exec = started.saturating_sub(self.ready + self.saved);
        let tail = format!(
            "exec {:.0}, command {:.0}, shutdown {:.0}, total {:.0}",
            ms(exec),
            ms(self.exited.saturating_sub(started)),
            ms(self.ended.saturating_sub(self.exited)),
            ms(self.ended),
        );
        if self.warm {
            log::info!(
                "timing (ms), warm: image {:.0}, restore {:.0}, reconnect {:.0}, {tail}",
                ms(self.image),
                ms(self.built.saturating_sub(self.image)),
                ms(self.hello.saturating_sub(self.built)),
            );
            return;
        }
        // The guest's boot splits at the agent's start (guest clock).
        let agent_part =
            Duration::from_millis(u64::from(self.uptimes.1.saturating_sub(self.uptimes.0)));
        let boot = self.hello.saturating_sub(self.built);
        log::info!(
            "timing (ms), cold: image {:.0}, VM build {:.0}, kernel boot {:.0}, agent start {:.0}, \
             prepare {:.0}, template save {:.0}, {tail}",
            ms(self.image),
            ms(self.built.saturating_sub(self.image)),
            ms(boot.saturating_sub(agent_part)),
            ms(agent_part),
            ms(self.ready.saturating_sub(self.hello)),
            ms(self.saved),
        );
    }
}
