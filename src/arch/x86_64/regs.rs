//! vCPU state for the boot entry: registers, segments, page tables, FPU,
//! MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{long_mode_gdt, protected_mode_gdt, segment_from_gdt};
use super::layout::*;

/// Four 8-byte GDT entries.
const GDT_LIMIT: u16 = 4 * 8 - 1;

// Control register bits (Intel SDM vol. 3, 2.5).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// MSRs (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

// Local APIC registers (Intel SDM vol. 3, 10.4.1) and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot page tables or GDT into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {total} boot MSRs; MSR {first_refused:#x} was refused")]
    MsrsRefused {
        set: usize,
        total: usize,
        first_refused: u32,
    },
    #[error("cannot build the MSR list")]
    MsrList,
    #[error("KVM_GET_LAPIC / KVM_SET_LAPIC failed")]
    Lapic(#[source] kvm_ioctls::Error),
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, RBX = start info.
    Pvh,
}

/// Writes the GDT (and an empty IDT) and, for the 64-bit entry, page tables
/// identity-mapping the first 1 GiB with 2 MiB pages. Shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), Error> {
    let gdt = match mode {
        EntryMode::Linux64 => long_mode_gdt(),
        EntryMode::Pvh => protected_mode_gdt(),
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(Error::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(Error::Memory)?;
    if mode == EntryMode::Linux64 {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
            .map_err(Error::Memory)?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
            .map_err(Error::Memory)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
                .map_err(Error::Memory)?;
        }
    }
    Ok(())
}

/// Segments and control registers for the entry.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    let gdt = match mode {
        EntryMode::Linux64 => long_mode_gdt(),
        EntryMode::Pvh => protected_mode_gdt(),
    };
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

/// General registers for the entry at `entry`.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), Error> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => regs.rsi = ZERO_PAGE_START,
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)
}

/// The MSRs kiln sets at boot: syscall MSRs cleared, fast strings on, MTRRs
/// write-back by default.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// KVM's MSR list of `(index, value)` pairs; None when there are more than
/// a kvm_msrs can hold.
pub fn msr_list(pairs: impl IntoIterator<Item = (u32, u64)>) -> Option<Msrs> {
    let entries: Vec<kvm_msr_entry> = pairs
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).ok()
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let list = boot_msrs();
    let msrs = msr_list(list.iter().copied()).ok_or(Error::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    if set != list.len() {
        return Err(Error::MsrsRefused {
            set,
            total: list.len(),
            first_refused: list.get(set).map_or(0, |m| m.0),
        });
    }
    Ok(())
}

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        // i8 -> u8 reinterpretation of the register bytes.
        *byte = state.regs[offset + i].to_ne_bytes()[0];
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = i8::from_ne_bytes([*byte]);
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a PC's BIOS does.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut state = vcpu.get_lapic().map_err(Error::Lapic)?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&state).map_err(Error::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, long_mode_gdt()[1]);
    }

    #[test]
    fn pvh_writes_no_page_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Pvh).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, protected_mode_gdt()[1]);
    }

    #[test]
    fn lint_delivery_modes() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT0, 0x0001_0700);
        assert_eq!(lapic_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }

    #[test]
    fn boot_msrs_include_mtrr_and_misc_enable() {
        let m = boot_msrs();
        assert!(m.contains(&(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB)));
        assert!(m.contains(&(MSR_IA32_MISC_ENABLE, 1)));
    }
}
