//! The boot GDT and the segment registers loaded from it.

use kvm_bindings::kvm_segment;

/// One GDT entry from its flags (bits 8..16 and 20..24 of the high dword),
/// base and limit, in the layout of the Intel SDM vol. 3, 3.4.5.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Null, 64-bit code, data, TSS — the layout Linux's boot code expects.
pub fn long_mode_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Null, 32-bit flat code, data, TSS — for the PVH entry (protected mode).
pub fn protected_mode_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    // 20 bits: always fits.
    let raw = u32::try_from(raw).unwrap_or(u32::MAX);
    if entry & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn bit(entry: u64, n: u32) -> u8 {
    u8::from(entry & (1 << n) != 0)
}

/// The `kvm_segment` for GDT entry `index` holding `entry`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(bit(entry, 47) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_fields() {
        let gdt = long_mode_gdt();
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(
            (cs.present, cs.s, cs.l, cs.db, cs.g, cs.dpl),
            (1, 1, 1, 0, 1, 0)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = long_mode_gdt();
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.type_, ds.db, ds.l, ds.selector), (3, 1, 0, 16));
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.type_, tss.s, tss.g), (0xb, 0, 1));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn encodes_base_and_limit() {
        let e = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcd_efff);
        let pm = protected_mode_gdt();
        let cs = segment_from_gdt(pm[1], 1);
        assert_eq!((cs.db, cs.l), (1, 0));
    }
}
