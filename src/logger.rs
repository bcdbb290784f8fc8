//! kiln's logger: `log` records to stderr, or to the config's `logger.log_path`.
//!
//! A line is `[kiln LEVEL file:line] message`; `logger.show_level: false`
//! drops the level, `logger.show_log_origin: true` adds the origin, and
//! `logger.module` keeps only records from that module and its children.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LoggerConfig;
use crate::hostfile::{self, Kind, Quoted};

/// Why the logger could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `logger.log_path` cannot be opened for appending.
    #[error("cannot open logger.log_path {}", Quoted(path))]
    Open {
        /// The path as written in the config.
        path: PathBuf,
        /// The OS error, or the wrong kind of file.
        #[source]
        source: hostfile::Error,
    },
}

/// What to log, where and how: the config's `logger` section, with the
/// command line's `--log-level` over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Most verbose level logged.
    pub level: LevelFilter,
    /// File or named pipe to append to; `None` is stderr.
    pub log_path: Option<PathBuf>,
    /// Put the record's level in the prefix.
    pub show_level: bool,
    /// Put the record's source file and line in the prefix.
    pub show_origin: bool,
    /// Only log records whose target is this module path or inside it
    /// (`kiln::devices` keeps `kiln::devices::virtio::block`).
    pub module: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            level: LevelFilter::Warn,
            log_path: None,
            show_level: true,
            show_origin: false,
            module: None,
        }
    }
}

impl Options {
    /// Options from the config's `logger` section (absent fields keep the
    /// defaults: warnings and errors, to stderr, with their level) and the
    /// command line's level, which wins over `logger.level`.
    pub fn new(config: Option<&LoggerConfig>, level_override: Option<LevelFilter>) -> Options {
        let defaults = Options::default();
        let Some(config) = config else {
            return Options {
                level: level_override.unwrap_or(defaults.level),
                ..defaults
            };
        };
        let module = config
            .module
            .as_deref()
            .map(|m| m.trim_end_matches("::"))
            .filter(|m| !m.is_empty())
            .map(str::to_string);
        Options {
            level: level_override
                .or(config.level.map(|l| l.to_level_filter()))
                .unwrap_or(defaults.level),
            log_path: config.log_path.clone(),
            show_level: config.show_level.unwrap_or(defaults.show_level),
            show_origin: config.show_log_origin.unwrap_or(defaults.show_origin),
            module,
        }
    }
}

struct Logger {
    file: Option<Mutex<File>>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

impl Logger {
    /// The line written for `record`, newline included.
    fn line(&self, record: &Record) -> String {
        let mut line = String::from("[kiln");
        if self.show_level {
            let _ = write!(line, " {}", record.level());
        }
        if let (true, Some(file), Some(number)) = (self.show_origin, record.file(), record.line()) {
            let _ = write!(line, " {file}:{number}");
        }
        let _ = writeln!(line, "] {}", record.args());
        line
    }
}

/// Whether `target` is the module path `module` or inside it.
fn in_module(module: &str, target: &str) -> bool {
    target
        .strip_prefix(module)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Crates whose messages a guest can cause (the FUSE server logs malformed
/// requests as errors, with their bytes): kiln shows them at debug only, so
/// a guest cannot flood kiln's log at the default level.
const GUEST_DRIVEN_CRATES: &[&str] = &["fuse_backend_rs"];

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let target = metadata.target();
        if GUEST_DRIVEN_CRATES.iter().any(|c| in_module(c, target))
            && log::max_level() < log::LevelFilter::Debug
        {
            return false;
        }
        match &self.module {
            Some(module) => in_module(module, target),
            None => true,
        }
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = self.line(record);
        match &self.file {
            Some(f) => {
                let _ = crate::devices::bus::lock(f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger; only the first call in a process takes effect.
pub fn init(options: &Options) -> Result<(), Error> {
    let file = match &options.log_path {
        Some(path) => {
            // A named pipe with no reader fails at once (ENXIO) instead
            // of blocking kiln in open.
            let file = hostfile::open(
                path,
                OpenOptions::new().create(true).append(true),
                Kind::RegularOrFifo,
            )
            .map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
            Some(Mutex::new(file))
        }
        None => None,
    };
    let logger = Box::new(Logger {
        file,
        show_level: options.show_level,
        show_origin: options.show_origin,
        module: options.module.clone(),
    });
    if log::set_logger(Box::leak(logger)).is_ok() {
        log::set_max_level(options.level);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use log::Level;

    use super::*;
    use crate::config::LogLevel;

    fn logger(options: &Options) -> Logger {
        Logger {
            file: None,
            show_level: options.show_level,
            show_origin: options.show_origin,
            module: options.module.clone(),
        }
    }

    /// The line `options` writes for a warning from `kiln::config` at
    /// src/config/mod.rs:12, or `None` when it is filtered out.
    fn line(options: &Options) -> Option<String> {
        let logger = logger(options);
        let record = Record::builder()
            .level(Level::Warn)
            .target("kiln::config")
            .file(Some("src/config/mod.rs"))
            .line(Some(12))
            .args(format_args!("hello"))
            .build();
        logger
            .enabled(record.metadata())
            .then(|| logger.line(&record))
    }

    fn config(json: serde_json::Value) -> LoggerConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_without_a_logger_section() {
        let options = Options::new(None, None);
        assert_eq!(options, Options::default());
        assert_eq!(options.level, LevelFilter::Warn);
        assert_eq!(line(&options).unwrap(), "[kiln WARN] hello\n");
        let options = Options::new(None, Some(LevelFilter::Debug));
        assert_eq!(options.level, LevelFilter::Debug);
    }

    #[test]
    fn command_line_level_wins_over_the_config() {
        let config = config(serde_json::json!({ "level": "Error" }));
        assert_eq!(Options::new(Some(&config), None).level, LevelFilter::Error);
        let options = Options::new(Some(&config), Some(LevelFilter::Trace));
        assert_eq!(options.level, LevelFilter::Trace);
        assert_eq!(config.level, Some(LogLevel::Error));
    }

    #[test]
    fn show_level_and_origin() {
        let shown = config(serde_json::json!({ "show_level": true, "show_log_origin": true }));
        assert_eq!(
            line(&Options::new(Some(&shown), None)).unwrap(),
            "[kiln WARN src/config/mod.rs:12] hello\n"
        );
        let hidden = config(serde_json::json!({ "show_level": false }));
        assert_eq!(
            line(&Options::new(Some(&hidden), None)).unwrap(),
            "[kiln] hello\n"
        );
        let origin_only =
            config(serde_json::json!({ "show_level": false, "show_log_origin": true }));
        assert_eq!(
            line(&Options::new(Some(&origin_only), None)).unwrap(),
            "[kiln src/config/mod.rs:12] hello\n"
        );
    }

    #[test]
    fn module_keeps_that_module_and_its_children() {
        let module =
            |m: &str| Options::new(Some(&config(serde_json::json!({ "module": m }))), None);
        for kept in ["kiln", "kiln::config", "kiln::config::", ""] {
            assert!(
                line(&module(kept)).is_some(),
                "{kept:?} should keep kiln::config"
            );
        }
        for dropped in [
            "kiln::conf",
            "kiln::devices",
            "kiln::config::sections",
            "api_server",
        ] {
            assert!(
                line(&module(dropped)).is_none(),
                "{dropped:?} should drop kiln::config"
            );
        }
        assert_eq!(
            module("kiln::config::").module.as_deref(),
            Some("kiln::config")
        );
        assert_eq!(module("").module, None);
    }

    #[test]
    fn log_path_must_be_a_file_or_a_pipe_someone_reads() {
        let dir = std::env::temp_dir().join(format!("kiln-logger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("log\u{1b}[2J");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let options = |path: &std::path::Path| Options {
            log_path: Some(path.to_path_buf()),
            ..Options::default()
        };
        // Refused at once rather than waiting for a reader; the path is
        // named, its escape sequence escaped.
        let err = init(&options(&fifo)).unwrap_err();
        let msg = crate::error_chain(&err);
        assert_eq!(
            msg,
            format!(
                "cannot open logger.log_path {:?}: it is a named pipe that nothing reads from",
                fifo
            )
        );
        assert!(!msg.contains('\u{1b}'), "{msg}");
        let err = init(&options(std::path::Path::new("/dev/null"))).unwrap_err();
        assert_eq!(
            crate::error_chain(&err),
            "cannot open logger.log_path \"/dev/null\": \
             it is a character device, not a regular file or a named pipe"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
