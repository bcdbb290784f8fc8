//! Guest memory: anonymous mappings laid out around the MMIO gap.

use vm_memory::{GuestAddress, GuestMemoryMmap};

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
}

/// Maps `mem_size_mib` MiB of guest RAM (private, anonymous, not reserved:
/// pages are taken as the guest touches them).
pub fn create(mem_size_mib: usize) -> Result<GuestMemoryMmap, Error> {
    let bytes = mem_size_mib
        .checked_mul(1 << 20)
        .ok_or(Error::TooLarge { mib: mem_size_mib })?;
    let ranges = ram_ranges(bytes as u64)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| Error::TooLarge { mib: mem_size_mib })
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map {
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
