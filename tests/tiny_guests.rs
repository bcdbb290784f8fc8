//! KVM integration tests with tiny guests: a few dozen instructions
//! assembled here, booted by the `kiln` binary.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test guests are built from small constants: truncation cannot happen.
#![allow(clippy::cast_possible_truncation)]

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

/// The 16-bit startup code of the application processors, placed at
/// 0x8000 (SIPI vector 8): print the x2APIC ID, count in, halt.
fn ap_trampoline() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut halt = a.create_label();
    a.mov(ecx, 0x1bu32).unwrap(); // IA32_APIC_BASE
    a.rdmsr().unwrap();
    a.or(eax, 0xc00u32).unwrap(); // xAPIC enable + x2APIC mode
    a.wrmsr().unwrap();
    a.mov(ecx, 0x802u32).unwrap(); // x2APIC ID
    a.rdmsr().unwrap();
    a.add(al, b'0' as u32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.xor(bx, bx).unwrap();
    a.mov(ds, bx).unwrap();
    a.lock().inc(dword_ptr(AP_COUNTER as u32)).unwrap();
    a.cli().unwrap();
    a.set_label(&mut halt).unwrap();
    a.hlt().unwrap();
    a.jmp(halt).unwrap();
    a.assemble(AP_TRAMPOLINE).unwrap()
}

const AP_TRAMPOLINE: u64 = 0x8000;
const AP_COUNTER: u64 = 0x8800;

#[test]
fn four_vcpus_each_print_their_id() {
    require_kvm();
    let dir = scratch("smp");
    let tramp = ap_trampoline();
    let code = assemble(|a| {
        let mut data = a.create_label();
        let mut wait = a.create_label();
        // Copy the AP startup code below 1 MiB.
        a.lea(rsi, ptr(data)).unwrap();
        a.mov(edi, AP_TRAMPOLINE as u32).unwrap();
        a.mov(ecx, tramp.len() as u32).unwrap();
        a.rep().movsb().unwrap();
        a.mov(dword_ptr(AP_COUNTER), 0).unwrap();
        // x2APIC on, print our own ID.
        a.mov(ecx, 0x1bu32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0xc00u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x802u32).unwrap();
        a.rdmsr().unwrap();
        a.add(al, b'0' as u32).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.out(dx, al).unwrap();
        // INIT, then SIPI to 0x8000, to all but self (x2APIC ICR).
        a.mov(ecx, 0x830u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(eax, 0x000c_4500u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, 0x000c_4600u32 | (AP_TRAMPOLINE >> 12) as u32)
            .unwrap();
        a.wrmsr().unwrap();
        // Wait for the three APs, then reset.
        a.set_label(&mut wait).unwrap();
        a.pause().unwrap();
        a.cmp(dword_ptr(AP_COUNTER), 3).unwrap();
        a.jne(wait).unwrap();
        reset(a);
        a.set_label(&mut data).unwrap();
        a.db(&tramp).unwrap();
    });
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 4, ""), TIMEOUT);
    let mut ids: Vec<u8> = out.stdout.clone();
    ids.sort_unstable();
    assert_eq!(
        text(&ids),
        "0123",
        "stdout: {:?} stderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

/// Writes the byte in `al` to the serial port.
fn putc(a: &mut CodeAssembler, c: u8) {
    a.mov(al, c as u32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
}

#[test]
fn int3_returns_through_injected_bp_and_fwait_is_stepped_over() {
    require_kvm();
    let dir = scratch("int3");
    let code = assemble(|a| {
        let mut idt = a.create_label();
        let mut idtr = a.create_label();
        let mut handler = a.create_label();
        // IDT entry 3: 64-bit interrupt gate to `handler`, code selector 8.
        a.lea(rdi, ptr(idt)).unwrap();
        a.lea(rax, ptr(handler)).unwrap();
        a.mov(word_ptr(rdi + 3 * 16), ax).unwrap();
        a.mov(word_ptr(rdi + 3 * 16 + 2), 8).unwrap();
        a.mov(word_ptr(rdi + 3 * 16 + 4), 0x8e00).unwrap();
        a.shr(rax, 16).unwrap();
        a.mov(word_ptr(rdi + 3 * 16 + 6), ax).unwrap();
        a.shr(rax, 16).unwrap();
        a.mov(dword_ptr(rdi + 3 * 16 + 8), eax).unwrap();
        a.lea(rax, ptr(idtr)).unwrap();
        a.mov(qword_ptr(rax + 2), rdi).unwrap();
        a.lidt(ptr(rax)).unwrap();
        a.int3().unwrap();
        putc(a, b'A');
        a.wait().unwrap();
        putc(a, b'W');
        reset(a);
        a.set_label(&mut handler).unwrap();
        putc(a, b'B');
        a.iretq().unwrap();
        a.set_label(&mut idtr).unwrap();
        a.dw(&[4 * 16 - 1]).unwrap();
        a.dq(&[0]).unwrap();
        a.set_label(&mut idt).unwrap();
        a.db(&[0u8; 4 * 16]).unwrap();
    });
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 1, ""), TIMEOUT);
    assert_eq!(text(&out.stdout), "BAW", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn an_instruction_kvm_cannot_emulate_ends_the_vm_naming_it() {
    require_kvm();
    let dir = scratch("popcnt");
    let code = assemble(|a| {
        putc(a, b'1');
        a.popcnt(rax, rbx).unwrap();
        putc(a, b'2');
        reset(a);
    });
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 1, ""), TIMEOUT);
    let stderr = text(&out.stderr);
    if kiln::quirks::is_pvm_host() {
        // This host's KVM interprets CPL0 code and rejects POPCNT.
        assert_eq!(text(&out.stdout), "1", "stderr: {stderr}");
        assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
        assert!(stderr.contains("popcnt rax,rbx"), "{stderr}");
        assert!(stderr.contains("f3 48 0f b8 c3"), "{stderr}");
        assert!(stderr.contains("clearcpuid=popcnt"), "{stderr}");
        assert!(stderr.contains("RIP 0x10000"), "{stderr}");
    } else {
        // Hardware KVM runs it natively.
        assert_eq!(text(&out.stdout), "12", "stderr: {stderr}");
        assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    }
}

/// A SIGTERM that comes while kiln is still starting (before the guest
/// runs) stops it the documented way, 130, not by the default action
/// (143, and a terminal left raw).
#[test]
fn sigterm_while_starting_exits_130() {
    use std::process::{Command, Stdio};
    require_kvm();
    let dir = scratch("sigterm-early");
    let code = assemble(|a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap();
    });
    let config = write_vm(&dir, &elf_image(&code), 1, "");
    for delay_ms in [5, 20, 60] {
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--config-file")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "SIGTERM {delay_ms} ms after start: {:?}, stderr: {}",
            out.status,
            text(&out.stderr)
        );
    }
}

#[test]
fn sigterm_stops_a_spinning_guest_and_joins_its_vcpus() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    require_kvm();
    let dir = scratch("sigterm");
    let code = assemble(|a| {
        let mut spin = a.create_label();
        putc(a, b'R');
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap();
    });
    let config = write_vm(&dir, &elf_image(&code), 2, "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"R");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let start = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(130),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("SIGTERM"),
        "{}",
        text(&out.stderr)
    );
}

/// Writes `count` bytes to the serial port (forever if None), then resets.
fn flood(a: &mut CodeAssembler, count: Option<u32>) {
    let mut top = a.create_label();
    a.mov(ecx, count.unwrap_or(1)).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, u32::from(b'x')).unwrap();
    a.set_label(&mut top).unwrap();
    a.out(dx, al).unwrap();
    if count.is_some() {
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
    } else {
        a.jmp(top).unwrap();
    }
    reset(a);
}

/// A kiln child with piped stdout and stderr, killed if the test fails
/// before it ends.
struct Kiln(std::process::Child);

impl Kiln {
    fn start(config: &std::path::Path, stdin: std::process::Stdio) -> Kiln {
        use std::process::{Command, Stdio};
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--config-file")
            .arg(config)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Kiln(child)
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        wait_timeout(&mut self.0, TIMEOUT)
            .unwrap_or_else(|| panic!("kiln did not exit within {TIMEOUT:?}"))
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(" WARN")).collect()
}

#[test]
fn sigterm_ends_kiln_within_a_second_while_nobody_reads_its_stdout() {
    use std::io::{BufRead, BufReader};
    use std::time::Instant;
    require_kvm();
    let dir = scratch("flood-sigterm");
    let config = write_vm(&dir, &elf_image(&assemble(|a| flood(a, None))), 1, "");
    let mut kiln = Kiln::start(&config, std::process::Stdio::null());
    // Held open and never read: once the pipe is full, writes to it block.
    let _stdout = kiln.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(kiln.0.stderr.take().unwrap());
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The drop warning says the pipe and kiln's buffer are full, and the
    // guest went on writing past them.
    let start = Instant::now();
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("console output is being dropped") => break,
            Ok(_) => {}
            Err(_) => panic!("no console drop warning within {TIMEOUT:?}: the guest is stuck, or kiln does not say so"),
        }
    }
    let pid = i32::try_from(kiln.0.id()).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let killed = Instant::now();
    let status = kiln.0.wait().unwrap();
    let took = killed.elapsed();
    let stderr = stderr.join().unwrap();
    // The deadline, not a performance figure: stopping takes
    // milliseconds; a blocked console write used to make it never happen.
    assert!(
        took < std::time::Duration::from_secs(1),
        "kiln took {took:?} to exit after SIGTERM with its stdout not read (deadline 1 s); stderr: {stderr}"
    );
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    let dropped: Vec<&str> = warnings(&stderr)
        .into_iter()
        .filter(|l| l.contains("console output is being dropped"))
        .collect();
    assert_eq!(dropped.len(), 1, "the drop is reported once: {stderr}");
    assert!(
        stderr.contains("bytes of guest console output were lost"),
        "the total is reported at exit: {stderr}"
    );
}

/// Enough output to run on well after the reader is gone (~1 s here).
const FLOOD_BYTES: u32 = 100_000;

#[test]
fn a_closed_stdout_ends_only_the_console_output() {
    use std::io::Read;
    require_kvm();
    let dir = scratch("flood-closed");
    let config = write_vm(
        &dir,
        &elf_image(&assemble(|a| flood(a, Some(FLOOD_BYTES)))),
        1,
        "",
    );
    let mut kiln = Kiln::start(&config, std::process::Stdio::null());
    let stderr = read_all(kiln.0.stderr.take().unwrap());
    // `kiln | head -c 100`
    let mut stdout = kiln.0.stdout.take().unwrap();
    let mut first = [0u8; 100];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(first, [b'x'; 100]);
    drop(stdout);
    let status = kiln.wait();
    let stderr = text(&stderr.join().unwrap());
    // The guest wrote everything and reset: only its output ended.
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let warnings = warnings(&stderr);
    assert_eq!(warnings.len(), 1, "one warning, no flood: {stderr}");
    assert!(warnings[0].contains("console output failed"), "{stderr}");
}

#[test]
fn a_reader_that_keeps_up_gets_all_the_output() {
    require_kvm();
    let dir = scratch("flood-all");
    let config = write_vm(
        &dir,
        &elf_image(&assemble(|a| flood(a, Some(FLOOD_BYTES)))),
        1,
        "",
    );
    let out = run_kiln(&config, TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(out.stdout.len(), FLOOD_BYTES as usize, "stderr: {stderr}");
    assert!(out.stdout.iter().all(|&b| b == b'x'));
    assert!(warnings(&stderr).is_empty(), "{stderr}");
}

#[test]
fn console_input_reaches_the_guest_and_its_echo_comes_back() {
    use std::io::Write;
    require_kvm();
    let dir = scratch("echo");
    // Echo what the UART receives until a 'q', then reset.
    let code = assemble(|a| {
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut wait).unwrap();
        a.mov(dx, 0x3fdu32).unwrap(); // LSR
        a.in_(al, dx).unwrap();
        a.test(al, 1u32).unwrap(); // data ready
        a.jz(wait).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        a.in_(al, dx).unwrap();
        a.cmp(al, u32::from(b'q')).unwrap();
        a.je(done).unwrap();
        a.out(dx, al).unwrap();
        a.jmp(wait).unwrap();
        a.set_label(&mut done).unwrap();
        reset(a);
    });
    let config = write_vm(&dir, &elf_image(&code), 1, "");
    let mut kiln = Kiln::start(&config, std::process::Stdio::piped());
    let mut stdin = kiln.0.stdin.take().unwrap();
    stdin.write_all(b"typed into the console\nq").unwrap();
    drop(stdin);
    let stdout = read_all(kiln.0.stdout.take().unwrap());
    let stderr = read_all(kiln.0.stderr.take().unwrap());
    let status = kiln.wait();
    let stderr = text(&stderr.join().unwrap());
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(
        text(&stdout.join().unwrap()),
        "typed into the console\n",
        "stderr: {stderr}"
    );
}

/// Spins until kiln stops the vCPU: whatever ended the VM came before.
fn spin(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.pause().unwrap();
    a.jmp(top).unwrap();
}

/// The ACPI power-off an OS does, with the port found where an OS finds
/// it: the RSDP at 0xe0000 (checked by signature), its XSDT, the XSDT's
/// first entry (the FADT), the FADT's PM1a_CNT_BLK; there, SLP_TYP 5 (what
/// the DSDT's `\_S5_` says) with SLP_EN. kiln exits 0.
#[test]
fn acpi_s5_power_off_exits_zero() {
    require_kvm();
    let dir = scratch("acpi-s5");
    let code = assemble(|a| {
        let mut bad = a.create_label();
        a.mov(esi, 0xe_0000u32).unwrap();
        a.mov(rax, u64::from_le_bytes(*b"RSD PTR ")).unwrap();
        a.cmp(qword_ptr(rsi), rax).unwrap();
        a.jne(bad).unwrap();
        a.mov(rsi, qword_ptr(rsi + 24)).unwrap(); // XsdtAddress
        a.mov(rsi, qword_ptr(rsi + 36)).unwrap(); // first entry
        a.cmp(dword_ptr(rsi), u32::from_le_bytes(*b"FACP")).unwrap();
        a.jne(bad).unwrap();
        a.mov(ebx, dword_ptr(rsi + 64)).unwrap(); // PM1a_CNT_BLK
        putc(a, b'S');
        a.mov(edx, ebx).unwrap();
        a.mov(ax, (5u32 << 10) | (1 << 13)).unwrap();
        a.out(dx, ax).unwrap();
        spin(a);
        a.set_label(&mut bad).unwrap();
        putc(a, b'?');
        reset(a);
    });
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 1, ""), TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(text(&out.stdout), "S", "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
}

/// A write of "panicked" to the pvpanic port ends kiln with 3 at once.
#[test]
fn pvpanic_exits_3() {
    require_kvm();
    let dir = scratch("pvpanic");
    let code = assemble(|a| {
        putc(a, b'P');
        a.mov(al, 1u32).unwrap();
        a.mov(dx, 0x505u32).unwrap();
        a.out(dx, al).unwrap();
        spin(a);
    });
    let out = run_kiln(&write_vm(&dir, &elf_image(&code), 1, ""), TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(text(&out.stdout), "P", "stderr: {stderr}");
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
}
