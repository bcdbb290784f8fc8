//! Guest memory for the device harnesses: small, and fenced, so that a
//! device reading or writing past guest memory on the host side faults at
//! once instead of touching some other allocation.
//!
//! Two 64 KiB regions, guest-contiguous ([0, 64 KiB) and [64 KiB,
//! 128 KiB)) but two host mappings, each between inaccessible guard pages:
//! an access that runs off the end of a region (or one that assumes the
//! regions are contiguous on the host too) hits a guard page. Nothing is
//! mapped at or above [`MEM_END`].
//!
//! The mappings are made once per thread and never unmapped (guest memory
//! handles may outlive a run); each run gets them zeroed.

use std::cell::OnceCell;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

use crate::devices::virtio::GuestMem;

/// Bytes in each region.
pub const REGION_SIZE: usize = 0x1_0000;
/// First guest address past guest memory.
pub const MEM_END: u64 = 0x2_0000;
const PAGE: usize = 4096;

static ZEROS: [u8; 2 * REGION_SIZE] = [0; 2 * REGION_SIZE];

/// `len` read-write bytes between two PROT_NONE pages, as a vm-memory region.
fn fenced_region(len: usize) -> MmapRegion<()> {
    let total = len + 2 * PAGE;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // picks; the result is checked before use.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert!(base != libc::MAP_FAILED, "cannot map fuzzing guest memory");
    let inner = base.cast::<u8>().wrapping_add(PAGE);
    // SAFETY: [inner, inner + len) lies inside the mapping made above.
    let r = unsafe { libc::mprotect(inner.cast(), len, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(r, 0, "cannot map fuzzing guest memory");
    // SAFETY: [inner, inner + len) is a read-write part of a mapping this
    // process never unmaps, so it stays valid as long as the region.
    let region = unsafe {
        MmapRegion::build_raw(
            inner,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        )
    };
    match region {
        Ok(r) => r,
        Err(e) => panic!("cannot use fuzzing guest memory: {e}"),
    }
}

fn build() -> GuestMem {
    let regions = [0u64, 0x1_0000].map(|start| {
        match GuestRegionMmap::new(fenced_region(REGION_SIZE), GuestAddress(start)) {
            Some(r) => r,
            None => panic!("guest region at {start:#x} does not fit"),
        }
    });
    match GuestMem::from_regions(regions.into()) {
        Ok(m) => m,
        Err(e) => panic!("cannot assemble fuzzing guest memory: {e}"),
    }
}

thread_local! {
    static MEM: OnceCell<GuestMem> = const { OnceCell::new() };
}

/// This thread's fenced guest memory, all zeroes.
pub fn guest_mem() -> GuestMem {
    MEM.with(|cell| {
        let mem = cell.get_or_init(build).clone();
        if let Err(e) = mem.write_slice(&ZEROS, GuestAddress(0)) {
            panic!("cannot clear fuzzing guest memory: {e}");
        }
        mem
    })
}

/// All of guest memory, as bytes.
pub fn snapshot(mem: &GuestMem) -> Vec<u8> {
    let mut out = vec![0u8; 2 * REGION_SIZE];
    if let Err(e) = mem.read_slice(&mut out, GuestAddress(0)) {
        panic!("cannot read fuzzing guest memory: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    #[test]
    fn two_regions_fenced_and_nothing_above() {
        let mem = guest_mem();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.check_range(GuestAddress(0), 2 * REGION_SIZE));
        assert!(!mem.check_range(GuestAddress(MEM_END - 1), 2));
        // A slice across the boundary is two host mappings: vm-memory
        // refuses it as one.
        assert!(mem.get_slice(GuestAddress(0xfff0), 0x20).is_err());
        mem.write_slice(b"hi", GuestAddress(0xffff)).unwrap();
        let again = guest_mem();
        assert_eq!(snapshot(&again), ZEROS.to_vec());
    }
}
