//! Port-I/O exit cost: kiln's vCPU loop and bus against a raw KVM_RUN loop.
//!
//! The same tiny guest (N writes to the serial scratch register, then a
//! reset through the i8042) runs under both, in this one process, with
//! N = EXITS and N = 0; the difference over N is the cost of one exit, with
//! VM setup and teardown cancelled out. Each is repeated and the median
//! taken, as this machine is shared and noisy.
//!
//! Run: `cargo bench --bench exits` (or `tools/bench-exits`).

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kiln::arch::x86_64::cpuid::Topology;
use kiln::arch::x86_64::regs::{self, EntryMode};
use kiln::config::VmConfig;
use kiln::vmm::{ConsoleIo, ConsoleOutput, Vmm};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

const EXITS: u32 = 100_000;
const REPS: usize = 5;

fn guest(exits: u32) -> Vec<u8> {
    common::assemble(|a| {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, exits).unwrap();
        a.mov(dx, 0x3ffu32).unwrap(); // serial scratch register
        a.set_label(&mut top).unwrap();
        a.test(ecx, ecx).unwrap();
        a.jz(done).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.mov(al, 0xfeu32).unwrap();
        a.out(0x64u32, al).unwrap();
        a.hlt().unwrap();
    })
}

/// The guest under kiln: config file → Vmm::build → Vmm::run.
fn run_kiln(dir: &std::path::Path, exits: u32) -> Duration {
    let config = common::write_vm(dir, &common::elf_image(&guest(exits)), 1, "");
    let config = VmConfig::from_file(&config).unwrap();
    let start = Instant::now();
    let vmm = Vmm::build(
        &config,
        ConsoleIo {
            output: ConsoleOutput::Writer(Box::new(std::io::sink())),
            input: None,
        },
    )
    .unwrap();
    let outcome = vmm.run().unwrap();
    let t = start.elapsed();
    assert_eq!(outcome.reason.exit_code(), 0, "{}", outcome.reason);
    t
}

/// The same guest with a bare loop around KVM_RUN: no bus, no devices.
/// It uses kiln's VM and boot-state setup (so both guests start alike), but
/// services exits itself.
fn run_raw(exits: u32) -> Duration {
    let start = Instant::now();
    let vm = kiln::vm::Vm::new(kiln::vm::open_kvm().unwrap(), 1).unwrap();
    let mem = kiln::memory::create(64).unwrap();
    vm.register_memory(&mem, false).unwrap();
    mem.write_slice(&guest(exits), GuestAddress(common::LOAD_ADDR))
        .unwrap();
    regs::write_boot_tables(&mem, EntryMode::Linux64).unwrap();
    let mut vcpu = kiln::vcpu::create_fd(
        &vm.fd,
        &vm.supported_cpuid,
        Topology::new(1, false),
        EntryMode::Linux64,
        common::LOAD_ADDR,
        0,
    )
    .unwrap();
    let mut seen = 0u32;
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x64, _) => break,
            VcpuExit::IoOut(_, _) => seen += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(seen, exits);
    drop(vcpu);
    drop(vm);
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    common::require_kvm();
    let dir = common::scratch("bench-exits");
    let mut kiln_full = Vec::new();
    let mut kiln_empty = Vec::new();
    let mut raw_full = Vec::new();
    let mut raw_empty = Vec::new();
    // Interleaved, so drift in the machine's load hits both alike.
    for _ in 0..REPS {
        raw_empty.push(run_raw(0));
        kiln_empty.push(run_kiln(&dir, 0));
        raw_full.push(run_raw(EXITS));
        kiln_full.push(run_kiln(&dir, EXITS));
    }
    let per_exit = |full: Duration, empty: Duration| {
        full.saturating_sub(empty).as_nanos() as f64 / f64::from(EXITS)
    };
    let raw = per_exit(median(raw_full), median(raw_empty));
    let kiln = per_exit(median(kiln_full), median(kiln_empty));
    println!("port-I/O exits: {EXITS} per run, median of {REPS} runs");
    println!("raw KVM_RUN loop: {raw:>8.0} ns/exit");
    println!("kiln vCPU + bus:  {kiln:>8.0} ns/exit");
    println!("ratio kiln/raw:   {:>8.3} (target <= 1.10)", kiln / raw);
}
