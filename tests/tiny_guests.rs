//! KVM integration tests with tiny guests: a few dozen instructions
//! assembled here, booted by the `kiln` binary.

mod common;

use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Code that writes `msg` to the serial port, then resets through the i8042.
fn print_and_reset(a: &mut CodeAssembler, msg: &[u8]) {
    let mut data = a.create_label();
    a.mov(dx, 0x3f8u32).unwrap();
    a.lea(rsi, ptr(data)).unwrap();
    a.mov(ecx, msg.len() as u32).unwrap();
    a.rep().outsb().unwrap();
    reset(a);
    a.set_label(&mut data).unwrap();
    a.db(msg).unwrap();
}

/// out 0x64, 0xfe: pulse the reset line.
fn reset(a: &mut CodeAssembler) {
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u32, al).unwrap();
    a.hlt().unwrap();
}

#[test]
fn serial_output_then_i8042_reset_exits_zero() {
    require_kvm();
    let dir = scratch("serial");
    let code = assemble(|a| print_and_reset(a, b"hello from a tiny guest\n"));
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 1, ""), TIMEOUT);
    assert_eq!(
        text(&out.stdout),
        "hello from a tiny guest\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}
