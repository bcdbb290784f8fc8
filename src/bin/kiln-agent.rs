//! kiln's guest agent: PID 1 of the initramfs `kiln run` boots (see
//! `kiln::agent`).

fn main() -> std::process::ExitCode {
    kiln::agent::main()
}
