//! The guest physical address map kiln lays out.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), then the IDT (empty)
//! 0x0000_6000  PVH start_info, module list and memory map
//! 0x0000_7000  zero page (struct boot_params), 64-bit boot protocol
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  PML4, PDPT, PD identity-mapping the first 1 GiB
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (the last KiB of base memory, where Linux scans)
//! 0x000e_0000  ACPI tables, RSDP first (the BIOS area Linux scans for it)
//! 0x0010_0000  kernel, then the rest of RAM; initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above the gap, for guests larger than 3 GiB
//! ```

/// GDT used by the boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: interrupts stay off until the kernel sets up its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (e820-style entries).
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The zero page of the Linux boot protocol (Documentation/x86/zero-page.rst).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line (below 4 GiB: the zero page holds a 32-bit pointer).
pub const CMDLINE_START_32: u32 = 0x20000;
pub const CMDLINE_START: u64 = CMDLINE_START_32 as u64;
/// Linux's x86 COMMAND_LINE_SIZE, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the MP table goes here, and RAM
/// below 1 MiB ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, the RSDP first: in the BIOS area where Linux looks for
/// the RSDP when no boot protocol field gives it, and out of the e820
/// RAM, so the guest never allocates over them.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// First address above the legacy hole (VGA, option ROMs, BIOS).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: guest RAM never overlaps it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices are placed from here, one 4 KiB page each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The in-kernel IOAPIC and the local APICs (32-bit addresses in the MP table).
pub const IOAPIC_START: u32 = 0xfec0_0000;
pub const APIC_START: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, below
/// 4 GiB and outside RAM: the top of the MMIO gap, clear of the APICs.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy IRQs of the devices kiln emulates.
pub const SERIAL_IRQ: u32 = 4;
/// The ACPI system control interrupt: a guest with ACPI must have one, kiln
/// never raises it. IRQ 3 (COM2, which kiln does not emulate), because
/// virtio devices may take every IRQ from [`VIRTIO_IRQ_START`] on,
/// including the usual 9.
pub const ACPI_SCI_IRQ: u32 = 3;
/// virtio-mmio devices get IRQs from here up to the last IOAPIC pin.
pub const VIRTIO_IRQ_START: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// Port I/O ranges.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The ACPI PM1a event block (status, enable; 2 bytes each) and, right
/// after it, the PM1a control register (2 bytes).
pub const ACPI_PM1_EVT_PORT: u64 = 0x600;
pub const ACPI_PM1_EVT_LEN: u64 = 4;
pub const ACPI_PM1_CNT_PORT: u64 = ACPI_PM1_EVT_PORT + ACPI_PM1_EVT_LEN;
pub const ACPI_PM1_CNT_LEN: u64 = 2;
/// QEMU's pvpanic device (ACPI `QEMU0001`).
pub const PVPANIC_PORT: u64 = 0x505;
pub const PVPANIC_PORT_LEN: u64 = 1;

/// The RAM ranges of a guest with `mem_size` bytes: one below the MMIO gap,
/// and one above 4 GiB for whatever does not fit under it.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

// The fixed areas do not overlap (checked at compile time).
const _: () = {
    assert!(BOOT_IDT_START < PVH_INFO_START);
    assert!(PVH_MEMMAP_START + 32 * 24 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
    assert!(PDE_START + 4096 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START + 0x400 <= ACPI_START && ACPI_END <= HIMEM_START);
    assert!(ACPI_SCI_IRQ < VIRTIO_IRQ_START && ACPI_SCI_IRQ != SERIAL_IRQ);
    assert!(KVM_IDENTITY_MAP_ADDRESS + 4096 == KVM_TSS_ADDRESS);
    assert!(KVM_TSS_ADDRESS + 3 * 4096 < MMIO_GAP_END);
    assert!(APIC_START as u64 + 4096 <= KVM_IDENTITY_MAP_ADDRESS);
    assert!(MMIO_GAP_START <= IOAPIC_START as u64);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_are_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let total: u64 = r.iter().map(|(_, len)| len).sum();
        assert_eq!(total, 4 << 30);
    }
}
