//! Guest memory: anonymous mappings laid out around the MMIO gap, or a
//! snapshot's memory file mapped copy-on-write.

use std::fs::File;

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory of {mib} MiB is too large for this process")]
    TooLarge { mib: usize },
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        mib: usize,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map the memory file")]
    File(#[source] MmapRegionError),
}

/// The guest-physical ranges of `mem_size_mib` MiB of RAM.
fn ranges(mem_size_mib: usize) -> Result<Vec<(GuestAddress, usize)>, Error> {
    let bytes = mem_size_mib
        .checked_mul(1 << 20)
        .ok_or(Error::TooLarge { mib: mem_size_mib })?;
    ram_ranges(bytes as u64)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| Error::TooLarge { mib: mem_size_mib })
        })
        .collect()
}

/// Maps a snapshot's memory file (its regions one after another, as
/// [`crate::snapshot`] writes them) MAP_PRIVATE: pages load from the file
/// when the guest touches them, writes stay in this process, and processes
/// restoring one snapshot share its clean pages through the page cache.
pub fn from_file(file: &File, mem_size_mib: usize) -> Result<GuestMemoryMmap, Error> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ranges(mem_size_mib)? {
        let file_offset = FileOffset::new(
            file.try_clone()
                .map_err(|e| Error::File(MmapRegionError::Mmap(e)))?,
            offset,
        );
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(file_offset)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(Error::File)?;
        regions
            .push(GuestRegionMmap::new(region, addr).ok_or(Error::TooLarge { mib: mem_size_mib })?);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map {
        mib: mem_size_mib,
        source: e.into(),
    })
}

/// Maps `mem_size_mib` MiB of guest RAM (private, anonymous, not reserved:
/// pages are taken as the guest touches them).
pub fn create(mem_size_mib: usize) -> Result<GuestMemoryMmap, Error> {
    GuestMemoryMmap::from_ranges(&ranges(mem_size_mib)?).map_err(|source| Error::Map {
        mib: mem_size_mib,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemory, GuestMemoryRegion};

    #[test]
    fn large_guest_gets_two_regions() {
        let mem = create(4096).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn small_guest_one_region() {
        let mem = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }
}
