//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// kiln: a KVM microVM monitor. One process runs one microVM.
///
/// `kiln --config-file vm.json` boots the VM a Firecracker-style JSON config
/// describes; the guest's serial console is kiln's stdin and stdout (raw mode
/// when stdin is a terminal). kiln exits 0 when the guest powers off or
/// reboots, and non-zero with a message when the VM cannot be built or the
/// guest fails.
///
/// `kiln run [OPTIONS] -- CMD [ARGS...]` runs a command in a fresh microVM
/// (a sandbox) and returns its exit code: see `kiln run --help`.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The VM to boot: a JSON file with Firecracker's config-file schema
    /// (boot-source, machine-config, drives, entropy, vsock, logger, ...).
    #[arg(long, value_name = "FILE", required = true)]
    pub config_file: Option<PathBuf>,

    /// How much kiln logs to stderr (or to logger.log_path). Overrides the
    /// config's logger.level. Default: warning.
    #[arg(long, value_enum, value_name = "LEVEL", global = true)]
    pub log_level: Option<Level>,

    /// On SIGUSR1, pause the VM, write a snapshot (DIR/vm.state, the
    /// machine's state, and DIR/vm.mem, guest memory) and resume it.
    /// Example: --snapshot-dir snap/ (then `kill -USR1 <kiln's pid>`)
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Start the VM from the snapshot in DIR instead of booting its kernel;
    /// --config-file must describe the same machine (vCPUs, memory).
    /// Guest memory is mapped copy-on-write from DIR/vm.mem, which must stay
    /// in place while the VM runs. Example: --restore-from snap/
    #[arg(long, value_name = "DIR")]
    pub restore_from: Option<PathBuf>,

    /// Turn kiln's seccomp filters off, for debugging only. By default each
    /// kiln thread may make only the system calls its job needs, and kiln
    /// stops, naming the call, when one makes another (exit 159; 125 in
    /// `kiln run`).
    #[arg(long, global = true)]
    pub no_seccomp: bool,

    /// Accepted for compatibility with `firecracker --no-api`; kiln has no
    /// API socket.
    #[arg(long, hide = true)]
    pub no_api: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
}

/// Run a command in a fresh microVM, from a container image, and return its
/// exit code.
///
/// The command's stdout and stderr are kiln's, live and kept apart; its exit
/// code is kiln's. What it writes to / is gone after the run (the image is
/// read-only under a throw-away overlay); folders given with --mount are
/// shared both ways. Example, in CI:
///
///   kiln run --image debian.oci.tar --mount "$PWD:/src" --workdir /src -- make test
///
/// Exit codes: the command's own; 124 --timeout fired; 125 kiln or the VM
/// failed (bad option, bad image, boot failure, guest kernel panic, the agent
/// lost); 126 the command is not executable; 127 not found; 128+N killed by
/// signal N.
#[derive(Debug, Args)]
#[command(
    after_help = "Everything after `--` is the command; without one, the image's \
Entrypoint and Cmd run (as `docker run` does)."
)]
pub struct RunArgs {
    /// The root file system: an OCI image layout directory, an OCI or docker
    /// archive (`podman save`, `docker save`), an ext4 image file, or a host
    /// directory. Default: the project's busybox image (built on demand).
    /// Example: --image debian.oci.tar
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,

    /// Guest kernel (ELF vmlinux or bzImage). Default: the project's, in
    /// ${XDG_CACHE_HOME:-~/.cache}/kiln/vmlinux (tools/build-guest-kernel).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,

    /// vCPUs, 1 to 32. Example: --cpus 4
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,

    /// Guest memory in MiB. Example: --memory 2048
    #[arg(long, value_name = "MIB", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(64..))]
    pub memory: u32,

    /// Share a host folder at a path in the guest (read-write; `:ro` for
    /// read-only, enforced by kiln). Repeatable. Example: --mount "$PWD:/src"
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]", value_parser = parse_mount)]
    pub mounts: Vec<MountArg>,

    /// Set an environment variable (`K=V`), or pass the host's value of `K`.
    /// Repeatable; wins over the image's Env and --env-file.
    /// Example: --env CI=true
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,

    /// Read `K=V` lines from a file (blank lines and `#` comments skipped).
    /// Repeatable. Example: --env-file ci.env
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,

    /// Working directory in the guest (created if missing). Default: the
    /// image's WorkingDir, else /. Example: --workdir /src
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,

    /// Run as this user: UID[:GID] or a name from the image's /etc/passwd.
    /// Default: the image's User, else root (of the guest). Example: --user 1000:1000
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    pub user: Option<String>,

    /// The guest's network: `none` (only a loopback) or `passt` (outbound
    /// TCP, UDP and DNS through the host's own sockets, by Debian's passt,
    /// no root: the guest is 10.0.2.15/24, the host's loopback is reachable
    /// at 10.0.2.2, DNS at 10.0.2.3). Example: --net passt
    #[arg(long, value_name = "none|passt", default_value = "none")]
    pub net: NetMode,

    /// Stop the command this long after it started (`90`, `30s`, `10m`,
    /// `2h`; the boot does not count); kiln
    /// then exits 124. Example: --timeout 10m
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,

    /// Forward kiln's stdin to the command, end of file included.
    #[arg(short = 'i', long)]
    pub interactive: bool,

    /// Run the command on a terminal (kiln's own terminal in raw mode,
    /// its size passed on and followed).
    #[arg(short = 't', long)]
    pub tty: bool,

    /// No progress lines (building the default image, unpacking images).
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Show the guest kernel's console on stderr (also with --log-level
    /// debug).
    #[arg(long)]
    pub console: bool,

    /// Boot the guest kernel, even when a template of this VM exists (see
    /// README, "Templates"). Without it, the first run of a VM (kernel,
    /// image, --cpus, --memory, number of --mount) boots and saves it as a
    /// template; later runs restore that in a fraction of the boot time.
    #[arg(long)]
    pub cold: bool,

    /// Remove every saved template no running kiln uses (they are in
    /// ${XDG_CACHE_HOME:-~/.cache}/kiln/templates), then exit.
    #[arg(long, conflicts_with = "command")]
    pub prune: bool,

    /// The command and its arguments.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `kiln run --net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetMode {
    /// No network device: the guest has `lo` only.
    None,
    /// A virtio-net device on a passt process kiln starts and stops.
    Passt,
}

impl NetMode {
    pub fn name(self) -> &'static str {
        match self {
            NetMode::None => "none",
            NetMode::Passt => "passt",
        }
    }
}

/// `--mount HOST:GUEST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountArg {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

fn parse_mount(s: &str) -> Result<MountArg, String> {
    let (rest, read_only) = match s.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (s.strip_suffix(":rw").unwrap_or(s), false),
    };
    let (host, guest) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:GUEST[:ro]"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: the host folder is empty"));
    }
    if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
        return Err(format!(
            "{s:?}: the guest path must be absolute, without .."
        ));
    }
    Ok(MountArg {
        host: PathBuf::from(host),
        guest: guest.to_string(),
        read_only,
    })
}

/// `90`, `90s`, `10m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90, 30s, 10m or 2h");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .filter(|&secs| secs > 0)
        .map(std::time::Duration::from_secs)
        .ok_or_else(bad)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Level {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Level::Off => log::LevelFilter::Off,
            Level::Error => log::LevelFilter::Error,
            Level::Warning => log::LevelFilter::Warn,
            Level::Info => log::LevelFilter::Info,
            Level::Debug => log::LevelFilter::Debug,
            Level::Trace => log::LevelFilter::Trace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_flags() {
        let c = Cli::try_parse_from(["kiln", "--config-file", "vm.json", "--log-level", "debug"])
            .unwrap();
        assert_eq!(c.config_file, Some(PathBuf::from("vm.json")));
        assert!(matches!(c.log_level, Some(Level::Debug)));
        assert!(Cli::try_parse_from(["kiln"]).is_err());
        assert!(!c.no_seccomp);
        for args in [
            &["kiln", "--no-seccomp", "--config-file", "vm.json"][..],
            &["kiln", "run", "--no-seccomp", "--", "true"],
        ] {
            assert!(Cli::try_parse_from(args).unwrap().no_seccomp, "{args:?}");
        }
        assert!(
            Cli::try_parse_from(["kiln", "--config-file", "x", "--log-level", "loud"]).is_err()
        );
    }

    #[test]
    fn run_flags() {
        let c = Cli::try_parse_from([
            "kiln",
            "run",
            "--image",
            "img.tar",
            "--cpus",
            "4",
            "--memory",
            "1024",
            "--mount",
            "/a:/src",
            "--mount",
            "/b:/data:ro",
            "-e",
            "A=1",
            "-w",
            "/src",
            "-u",
            "1000:1000",
            "--timeout",
            "10m",
            "-i",
            "-t",
            "--log-level",
            "debug",
            "--",
            "make",
            "-j",
            "test",
        ])
        .unwrap();
        let Some(Command::Run(r)) = c.command else {
            panic!("no run")
        };
        assert_eq!(r.image, Some(PathBuf::from("img.tar")));
        assert_eq!((r.cpus, r.memory), (4, 1024));
        assert_eq!(
            r.mounts[1],
            MountArg {
                host: "/b".into(),
                guest: "/data".into(),
                read_only: true
            }
        );
        assert_eq!(r.timeout, Some(std::time::Duration::from_secs(600)));
        assert!(r.interactive && r.tty);
        assert_eq!(r.command, ["make", "-j", "test"]);
        assert!(matches!(c.log_level, Some(Level::Debug)));
        // Bad values name what is wrong.
        for bad in [
            &["kiln", "run", "--mount", "nocolon", "--", "x"][..],
            &["kiln", "run", "--mount", "/a:relative", "--", "x"],
            &["kiln", "run", "--mount", "/a:/x/../y", "--", "x"],
            &["kiln", "run", "--cpus", "0", "--", "x"],
            &["kiln", "run", "--timeout", "5 minutes", "--", "x"],
            &["kiln", "run", "--timeout", "0", "--", "x"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["kiln", "run", "--config-file", "x"]).is_err());
    }
}
