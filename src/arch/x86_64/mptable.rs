//! The MP table (Intel MultiProcessor Specification 1.4, chapter 4), by
//! which a guest without ACPI finds its CPUs, its IOAPIC and the ISA IRQ
//! routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};

/// ISA IRQs routed to the IOAPIC: one per pin.
const IOAPIC_PINS: u8 = 24;
const _: () = assert!(IOAPIC_PINS as u32 == IRQ_MAX + 1);

/// Entry types (MP spec, table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types (table 4-8).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_SPEC: u8 = 4;
const ISA_BUS_ID: u8 = 0;
/// Stepping/model/family of a generic modern CPU, and FPU + APIC features.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 1;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Where the table goes and how much room it has (to the end of base memory).
pub const MPTABLE_START: u64 = EBDA_START;
const MPTABLE_ROOM: usize = 0x400;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an MP table for {0} vCPUs does not fit in the {MPTABLE_ROOM} bytes below 640 KiB")]
    TooLarge(u8),
    #[error("the MP table at {0:#x} is not below 4 GiB")]
    Address(u64),
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The whole table (floating pointer, header, entries) as placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_START.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // Conforming polarity and trigger mode for ISA (flags 0).
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
    }
    // LINT0 of the BSP is ExtINT, LINT1 of every CPU is NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    let entry_count = u16::from(num_cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let header_len = 44;
    let table_len = header_len + entries.len();
    let total = 16 + table_len;
    if total > MPTABLE_ROOM {
        return Err(Error::TooLarge(num_cpus));
    }
    let table_len = u16::try_from(table_len).map_err(|_| Error::TooLarge(num_cpus))?;
    let table_addr = base
        .checked_add(16)
        .and_then(|a| u32::try_from(a).ok())
        .ok_or(Error::Address(base))?;

    let mut header = Vec::with_capacity(total);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(MPC_SPEC);
    header.push(0); // checksum, below
    header.extend_from_slice(b"KILN    ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_START.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // reserved
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // no default configuration, no IMCR
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&header);
    Ok(fp)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    let table = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        let t = build(4, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let hdr = &t[16..];
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        assert_eq!(len, hdr.len());
        assert_eq!(sum(hdr), 0);
    }

    #[test]
    fn one_processor_entry_per_cpu_bsp_first() {
        let t = build(3, MPTABLE_START).unwrap();
        let entries = &t[16 + 44..];
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        for cpu in 0..3u8 {
            let e = &entries[cpu as usize * 20..][..20];
            assert_eq!(e[0], MP_PROCESSOR);
            assert_eq!(e[1], cpu);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
        let rest = &entries[60..];
        assert_eq!(
            &rest[0..8],
            &[MP_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']
        );
        assert_eq!(rest[8], MP_IOAPIC);
        assert_eq!(rest[9], 3, "IOAPIC id follows the CPUs");
        // IRQ 4 (serial) is routed to IOAPIC pin 4.
        let irq4 = &rest[16 + 4 * 8..][..8];
        assert_eq!(irq4, &[MP_INTSRC, MP_INT, 0, 0, 0, 4, 3, 4]);
    }

    #[test]
    fn thirty_two_cpus_fit() {
        let t = build(32, MPTABLE_START).unwrap();
        assert!(t.len() <= MPTABLE_ROOM);
        assert!(MPTABLE_START + t.len() as u64 <= 0xa0000);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(matches!(
            build(255, MPTABLE_START),
            Err(Error::TooLarge(255))
        ));
    }
}
