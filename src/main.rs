//! `kiln --config-file vm.json`: boots the VM the file describes and runs it
//! until the guest powers off or reboots.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

use clap::Parser;

use kiln::cli::{Cli, Command};
use kiln::config::VmConfig;
use kiln::devices::legacy::output_fd::OutputFd;
use kiln::error_chain;
use kiln::snapshot;
use kiln::terminal::RawMode;
use kiln::vmm::{ConsoleIo, ConsoleOutput, Vmm};

fn fail(msg: &str) -> ExitCode {
    eprintln!("kiln: error: {msg}");
    ExitCode::FAILURE
}

/// Whether the command line is a `kiln run` (for the exit code of a usage
/// error: 125 there, as `docker run` does).
fn is_run() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "run")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.exit_code() {
                0 => ExitCode::SUCCESS,
                _ if is_run() => ExitCode::from(kiln::run::code::KILN_FAILED),
                // README's table: 1 is "kiln could not start the VM"; 2
                // means the guest failed, never a bad flag.
                _ => ExitCode::FAILURE,
            };
        }
    };
    // Before any thread starts: the SIGSYS handler, and whether each thread
    // installs its filter.
    let seccomp = kiln::seccomp::Options {
        enabled: !cli.no_seccomp,
        exit_code: match cli.command {
            Some(Command::Run(_)) => kiln::run::code::KILN_FAILED,
            None => kiln::seccomp::EXIT_FORBIDDEN,
        },
    };
    if let Err(e) = kiln::seccomp::init(seccomp) {
        eprintln!("kiln: error: {}", error_chain(&e));
        return ExitCode::from(seccomp.exit_code);
    }
    match cli.command {
        Some(Command::Run(args)) => {
            ExitCode::from(kiln::run::main(args, cli.log_level.map(|l| l.filter())))
        }
        None => boot_config(&cli),
    }
}

/// The files in a `--snapshot-dir`: vm.state and vm.mem.
const SNAPSHOT_NAME: &str = "vm";

/// `kiln --config-file vm.json`.
fn boot_config(cli: &Cli) -> ExitCode {
    // A SIGTERM from here on stops the VM in order (exit 130), even one that
    // comes while it is being built.
    if let Err(e) = Vmm::hold_stop_signals() {
        return fail(&error_chain(&e));
    }
    let Some(config_file) = cli.config_file.as_deref() else {
        return fail("--config-file is required");
    };
    // The logger comes first, from the parsed config, so that validation's
    // warnings reach it.
    let config = VmConfig::parse_file(config_file);
    let logger = config.as_ref().ok().and_then(|c| c.logger.as_ref());
    let log_options = kiln::logger::Options::new(logger, cli.log_level.map(|l| l.filter()));
    if let Err(e) = kiln::logger::init(&log_options) {
        return fail(&error_chain(&e));
    }
    let config = match config.and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        Err(e) => return fail(&error_chain(&e)),
    };

    let output = match OutputFd::stdout() {
        Ok(fd) => ConsoleOutput::Fd(fd),
        Err(e) => {
            log::warn!("stdout cannot take the console ({e}): guest console output is discarded");
            ConsoleOutput::Writer(Box::new(std::io::sink()))
        }
    };
    let stdin = std::io::stdin();
    let input = stdin.as_fd().try_clone_to_owned().ok().map(File::from);
    let console = ConsoleIo { output, input };
    let build = match &cli.restore_from {
        Some(dir) => Vmm::restore(&config, console, &snapshot::Paths::new(dir, SNAPSHOT_NAME)),
        None => Vmm::build(&config, console),
    };
    let build = build.and_then(|vmm| match &cli.snapshot_dir {
        Some(dir) => vmm.with_snapshot_to(snapshot::Paths::new(dir, SNAPSHOT_NAME)),
        None => Ok(vmm),
    });
    let vmm = match build {
        Ok(vmm) => vmm,
        Err(e) => return fail(&error_chain(&e)),
    };
    // Raw mode only now, when nothing is left that can fail or block before
    // the guest runs: until here Ctrl-C and SIGTERM end kiln the usual way
    // and leave the terminal as it was.
    let raw_mode = match RawMode::enable(stdin.as_fd()) {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot put the terminal in raw mode: {e}")),
    };
    let result = vmm.run();
    drop(raw_mode);
    match result {
        Ok(outcome) => {
            let code = outcome.reason.exit_code();
            if code != 0 {
                eprintln!("kiln: {}", outcome.reason);
            } else {
                log::info!("{}", outcome.reason);
            }
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => fail(&error_chain(&e)),
    }
}
