//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// kiln: a KVM microVM monitor. One process runs one microVM, described by a
/// Firecracker-style JSON config file.
///
/// The guest's serial console is kiln's stdin and stdout (raw mode when
/// stdin is a terminal). kiln exits 0 when the guest powers off or reboots,
/// and non-zero with a message when the VM cannot be built or the guest
/// fails.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about)]
pub struct Cli {
    /// The VM to boot: a JSON file with Firecracker's config-file schema
    /// (boot-source, machine-config, drives, entropy, logger, ...).
    #[arg(long, value_name = "FILE")]
    pub config_file: PathBuf,

    /// How much kiln logs to stderr (or to logger.log_path). Overrides the
    /// config's logger.level. Default: warning.
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<Level>,

    /// Accepted for compatibility with `firecracker --no-api`; kiln has no
    /// API socket.
    #[arg(long, hide = true)]
    pub no_api: bool,
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
        assert_eq!(c.config_file, PathBuf::from("vm.json"));
        assert!(matches!(c.log_level, Some(Level::Debug)));
        assert!(Cli::try_parse_from(["kiln"]).is_err());
        assert!(
            Cli::try_parse_from(["kiln", "--config-file", "x", "--log-level", "loud"]).is_err()
        );
    }
}
