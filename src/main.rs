//! `kiln --config-file vm.json`: boots the VM the file describes and runs it
//! until the guest powers off or reboots.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

use clap::Parser;

use kiln::cli::Cli;
use kiln::config::VmConfig;
use kiln::devices::legacy::output_fd::OutputFd;
use kiln::error_chain;
use kiln::terminal::RawMode;
use kiln::vmm::{ConsoleIo, ConsoleOutput, Vmm};

fn fail(msg: &str) -> ExitCode {
    eprintln!("kiln: error: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The logger comes first, from the parsed config, so that validation's
    // warnings reach it.
    let config = VmConfig::parse_file(&cli.config_file);
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
    let raw_mode = match RawMode::enable(stdin.as_fd()) {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot put the terminal in raw mode: {e}")),
    };
    let console = ConsoleIo { output, input };
    let result = Vmm::build(&config, console).and_then(Vmm::run);
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
