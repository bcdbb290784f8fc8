use super::*;
use crate::arch::x86_64::mptable;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The table at guest address `addr` in `image`, after checking its
/// signature, that its length fits and that it sums to 0.
fn table<'a>(image: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
    let off = usize::try_from(addr - ACPI_START).unwrap();
    let hdr = &image[off..];
    assert_eq!(&hdr[0..4], signature, "table at {addr:#x}");
    let len = u32_at(hdr, 4) as usize;
    assert!(
        len >= 36 && off + len <= image.len(),
        "{signature:?}: {len}"
    );
    let t = &hdr[..len];
    assert_eq!(sum(t), 0, "{signature:?} checksum");
    assert_eq!(&t[10..16], &OEM_ID);
    t
}

/// The generic address structure at `off`: (space, bit width, access size, address).
fn gas(t: &[u8], off: usize) -> (u8, u8, u8, u64) {
    (t[off], t[off + 1], t[off + 3], u64_at(t, off + 4))
}

struct Parsed<'a> {
    fadt: &'a [u8],
    madt: &'a [u8],
    dsdt: &'a [u8],
    facs_addr: u64,
}

fn parse(image: &[u8]) -> Parsed<'_> {
    let rsdp = &image[..36];
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2: the XSDT is used");
    assert_eq!(u32_at(rsdp, 20), 36, "length");
    let xsdt = table(image, u64_at(rsdp, 24), b"XSDT");
    assert_eq!(xsdt.len(), 36 + 2 * 8);
    let fadt = table(image, u64_at(xsdt, 36), b"FACP");
    let madt = table(image, u64_at(xsdt, 44), b"APIC");
    let dsdt = table(image, u64_at(fadt, 140), b"DSDT");
    let facs_addr = u64_at(fadt, 132);
    Parsed {
        fadt,
        madt,
        dsdt,
        facs_addr,
    }
}

#[test]
fn every_table_is_reachable_from_the_rsdp_with_good_checksums() {
    let image = build(2).unwrap();
    let p = parse(&image);
    assert_eq!(p.fadt.len(), 276, "a full ACPI 6 FADT");
    assert_eq!((p.fadt[8], p.fadt[131]), (6, 5), "FADT revision 6.5");
    // The FACS: 64-byte aligned, no checksum, its own length.
    assert_eq!(p.facs_addr % 64, 0);
    let off = usize::try_from(p.facs_addr - ACPI_START).unwrap();
    assert_eq!(&image[off..off + 4], b"FACS");
    assert_eq!(u32_at(&image, off + 4), 64);
    assert!(ACPI_START + image.len() as u64 <= ACPI_END);
}

#[test]
fn fadt_describes_the_pm1_registers_the_sci_and_the_reset() {
    let image = build(1).unwrap();
    let f = parse(&image).fadt;
    let flags = u32_at(f, 112);
    assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
    assert_ne!(flags & (1 << 10), 0, "reset register supported");
    assert_ne!(flags & (1 << 4), 0, "no fixed power button");
    assert_eq!(u16_at(f, 46), 3, "SCI_INT");
    assert_eq!(u32_at(f, 48), 0, "no SMI command port: always in ACPI mode");
    assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(f[88], 4, "PM1_EVT_LEN");
    assert_eq!(gas(f, 148), (1, 32, 2, 0x600), "X_PM1a_EVT_BLK");
    assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(f[89], 2, "PM1_CNT_LEN");
    assert_eq!(gas(f, 172), (1, 16, 2, 0x604), "X_PM1a_CNT_BLK");
    assert_eq!((u32_at(f, 76), f[91]), (0, 0), "no PM timer");
    assert_eq!((u32_at(f, 80), f[92]), (0, 0), "no GPE0 block");
    assert_eq!(u16_at(f, 109), (1 << 2) | (1 << 5), "no VGA, no CMOS RTC");
    assert_eq!(gas(f, 116), (1, 8, 1, 0x64), "RESET_REG: the i8042");
    assert_eq!(f[128], 0xfe, "RESET_VALUE");
    // The PM1 blocks are the ports the device sits at.
    assert_eq!(
        (ACPI_PM1_EVT_PORT, ACPI_PM1_CNT_PORT),
        (u64::from(u32_at(f, 56)), u64::from(u32_at(f, 64)))
    );
}

#[test]
fn madt_matches_the_mp_table() {
    for cpus in [1u8, 2, 4] {
        let image = build(cpus).unwrap();
        let m = parse(&image).madt;
        assert_eq!(u32_at(m, 36), APIC_START);
        assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            assert!(len >= 2 && off + len <= m.len(), "entry at {off}");
            let e = &m[off..off + len];
            match kind {
                0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                2 => overrides.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8))),
                4 => nmis.push((e[2], u16_at(e, 3), e[5])),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, m.len());
        let want: Vec<_> = (0..cpus).map(|c| (c, c, 1)).collect();
        assert_eq!(
            lapics, want,
            "one enabled local APIC per vCPU, APIC ID = index"
        );
        // The MP table's IOAPIC entry: type 2, id, version, flags, address.
        let mp = mptable::build(cpus, mptable::MPTABLE_START).unwrap();
        let at = 16 + 44 + 20 * usize::from(cpus) + 8;
        assert_eq!(mp[at], 2);
        assert_eq!(ioapics, vec![(mp[at + 1], u32_at(&mp, at + 4), 0)]);
        assert_eq!(ioapics[0].1, IOAPIC_START);
        assert_eq!(
            overrides,
            vec![(0, 3, 3, 0b1101)],
            "SCI: level, active high"
        );
        assert_eq!(nmis, vec![(0xff, 0, 1)], "LINT1 of every CPU is the NMI");
    }
}

#[test]
fn dsdt_has_s5_and_the_pvpanic_device() {
    let image = build(1).unwrap();
    let d = parse(&image).dsdt;
    assert_eq!(d[8], 2, "revision 2");
    let body = &d[36..];
    let find = |needle: &[u8]| body.windows(needle.len()).position(|w| w == needle);
    // Name(_S5_, Package(4) {5, 5, 0, 0}): NameOp, name, PackageOp,
    // PkgLength, NumElements, BytePrefix 5, BytePrefix 5, Zero, Zero.
    let s5 = find(b"_S5_").expect("_S5_");
    assert_eq!(body[s5 - 1], 0x08, "NameOp");
    assert_eq!(
        &body[s5 + 4..s5 + 4 + 9],
        &[0x12, 8, 4, 0x0a, SLP_TYP_S5, 0x0a, SLP_TYP_S5, 0, 0]
    );
    assert!(find(b"_SB_").is_some());
    assert!(find(b"PEVT").is_some());
    assert!(find(b"_HID\x0dQEMU0001\0").is_some(), "_HID string");
    // IO(Decode16, 0x505, 0x505, 1, 1), then the end tag.
    assert!(find(&[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1, 0x79]).is_some());
    assert_eq!(PVPANIC_PORT, 0x505);
}

#[test]
fn many_cpus_fit_and_the_tables_land_in_guest_memory() {
    let image = build(255).unwrap();
    assert_eq!(parse(&image).madt.len(), 44 + 255 * 8 + 12 + 10 + 6);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    assert_eq!(write(&mem, 3).unwrap(), RSDP_ADDR);
    let mut back = vec![0u8; build(3).unwrap().len()];
    mem.read_slice(&mut back, GuestAddress(RSDP_ADDR)).unwrap();
    assert_eq!(back, build(3).unwrap());
    // No memory there: an error, not a panic.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(write(&small, 1), Err(Error::Write(_))));
}
