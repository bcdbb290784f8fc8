//! Boot parameters: the e820 map, the Linux zero page and the PVH start info.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

/// e820 entry types (ACPI spec, "Address Range Types").
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Boot-protocol constants (Documentation/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: LOADED_HIGH (kernel at 1 MiB), CAN_USE_HEAP.
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
/// `hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    #[error("cannot write the boot parameters into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map the guest sees: base memory up to the EBDA, then RAM from
/// 1 MiB, split around the MMIO gap; the gap's architectural holes are left
/// out (not RAM) so the guest never allocates from them.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for (start, len) in ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the initrd goes: page aligned, as high as possible in the RAM below
/// the MMIO gap and below `max_addr` (the kernel's `initrd_addr_max`).
/// Returns None when it does not fit above `lowest` (the kernel's end).
pub fn initrd_address(mem_size: u64, initrd_size: u64, max_addr: u64, lowest: u64) -> Option<u64> {
    let low_ram_end = mem_size.min(MMIO_GAP_START);
    let top = low_ram_end.min(max_addr.saturating_add(1));
    let addr = top.checked_sub(initrd_size)? & !0xfff;
    (addr >= lowest).then_some(addr)
}

/// What the boot entry needs to know about the loaded images.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootInfo {
    pub mem_size: u64,
    pub cmdline_size: usize,
    /// (address, size) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Where the ACPI RSDP is (0: no ACPI tables).
    pub rsdp_addr: u64,
}

/// Writes the zero page for the 64-bit boot protocol. `header` is the
/// bzImage's setup header, or None for an ELF vmlinux.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = CMDLINE_START_32;
    params.hdr.cmdline_size = u32::try_from(info.cmdline_size).unwrap_or(u32::MAX);
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = info.initrd {
        // Both below 4 GiB: the initrd is placed under the MMIO gap.
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    // Read by Linux 5.0 and later (boot protocol 2.14); older kernels
    // find the RSDP by scanning the BIOS area.
    params.acpi_rsdp_addr = info.rsdp_addr;
    let map = e820_map(info.mem_size);
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
        };
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| Error::TooManyE820Entries(map.len()))?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::Write)
}

/// Writes the PVH start info, its memory map and module list.
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), Error> {
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        rsdp_paddr: info.rsdp_addr,
        ..Default::default()
    };
    if let Some((addr, size)) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(Error::Write)?;
        start.nr_modules = 1;
        start.modlist_paddr = PVH_MODLIST_START;
    }
    let map = e820_map(info.mem_size);
    let mut addr = PVH_MEMMAP_START;
    for e in &map {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(Error::Write)?;
        addr += std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    }
    start.memmap_entries =
        u32::try_from(map.len()).map_err(|_| Error::TooManyE820Entries(map.len()))?;
    mem.write_obj(start, GuestAddress(PVH_INFO_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), usize::try_from(l).unwrap()))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (128 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_gap() {
        let map = e820_map(5 << 30);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MMIO_GAP_END,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        assert_eq!(
            initrd_address(64 << 20, 0x1801, u64::MAX, 0),
            Some((64 << 20) - 0x2000)
        );
        // Capped by initrd_addr_max.
        assert_eq!(
            initrd_address(1 << 30, 0x1000, 0x37ff_ffff, 0),
            Some(0x3800_0000 - 0x1000)
        );
        // Capped by the gap for big guests.
        assert_eq!(
            initrd_address(8 << 30, 0x1000, u64::MAX, 0),
            Some(MMIO_GAP_START - 0x1000)
        );
        // Does not fit above the kernel.
        assert_eq!(initrd_address(32 << 20, 31 << 20, u64::MAX, 16 << 20), None);
        assert_eq!(initrd_address(1 << 20, 2 << 20, u64::MAX, 0), None);
    }

    #[test]
    fn zero_page_fields() {
        let m = mem(64 << 20);
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_size: 10,
            initrd: Some((0x300_0000, 0x1234)),
            rsdp_addr: 0xe_0000,
        };
        write_zero_page(&m, &info, None).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START_32);
        assert_eq!({ p.hdr.cmdline_size }, 10);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, HIMEM_START);
        assert_eq!(m.num_regions(), 1);
    }

    #[test]
    fn pvh_start_info_fields() {
        let m = mem(64 << 20);
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_size: 10,
            initrd: Some((0x300_0000, 0x10)),
            rsdp_addr: 0xe_0000,
        };
        write_pvh_start_info(&m, &info).unwrap();
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(s.rsdp_paddr, 0xe_0000);
        assert_eq!(s.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(s.memmap_entries, 2);
        assert_eq!(s.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x10));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.type_), (HIMEM_START, E820_RAM));
    }
}
