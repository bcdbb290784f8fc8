//! kiln's logger: `log` records to stderr, or to the config's `logger.log_path`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

/// Why the logger could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `logger.log_path` cannot be opened for appending.
    #[error("cannot open logger.log_path {}", path.display())]
    Open {
        /// The path as written in the config.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

struct Logger {
    file: Option<Mutex<File>>,
    show_origin: bool,
}

impl Log for Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let origin = match (self.show_origin, record.file(), record.line()) {
            (true, Some(f), Some(l)) => format!(" {f}:{l}"),
            _ => String::new(),
        };
        let line = format!("[kiln {}{origin}] {}\n", record.level(), record.args());
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

/// Installs the logger once per process; later calls only change the level.
pub fn init(level: LevelFilter, path: Option<&Path>, show_origin: bool) -> Result<(), Error> {
    let file = match path {
        Some(p) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| Error::Open {
                    path: p.to_path_buf(),
                    source,
                })?;
            Some(Mutex::new(file))
        }
        None => None,
    };
    let logger = Box::new(Logger { file, show_origin });
    if log::set_logger(Box::leak(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}
