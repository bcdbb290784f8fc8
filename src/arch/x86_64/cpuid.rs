//! CPUID for each vCPU: what KVM supports, normalized so the guest sees its
//! own APIC ID, a topology matching the vCPU count, and the hypervisor bit.
//!
//! On some hosts (kvm_pvm) CPUID is answered by the host and these values are
//! not what the guest sees; they are still what KVM itself uses (e.g. for the
//! APIC ID), so they are set everywhere.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

/// CPUID.1:ECX.hypervisor (bit 31) and CPUID.1:EDX.HTT (bit 28).
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in CPUID.0xB:ECX[15:8] (Intel SDM vol. 2A, CPUID).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The guest's CPU topology: one socket, `cores` cores of `threads` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub vcpu_count: u8,
    pub threads_per_core: u8,
}

impl Topology {
    pub fn new(vcpu_count: u8, smt: bool) -> Self {
        let threads_per_core = if smt && vcpu_count > 1 { 2 } else { 1 };
        Topology {
            vcpu_count,
            threads_per_core,
        }
    }

    pub fn cores(&self) -> u8 {
        self.vcpu_count.div_ceil(self.threads_per_core)
    }
}

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn set_bits(reg: u32, lo: u32, width: u32, value: u32) -> u32 {
    // width is 1..=32.
    let mask = u32::MAX >> (32 - width);
    (reg & !(mask << lo)) | ((value & mask) << lo)
}

/// Rewrites one CPUID entry for vCPU `id`.
fn normalize_entry(e: &mut kvm_cpuid_entry2, id: u8, topo: Topology) {
    let apic_id = u32::from(id);
    let threads = u32::from(topo.threads_per_core);
    let total = u32::from(topo.vcpu_count);
    match e.function {
        LEAF_FEATURES => {
            e.ebx = set_bits(e.ebx, 24, 8, apic_id);
            e.ebx = set_bits(e.ebx, 16, 8, total);
            e.ecx |= ECX_HYPERVISOR;
            if total > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing
            // this cache - 1 (a core's threads for L1/L2, all for L3).
            let level = (e.eax >> 5) & 0x7;
            if e.eax & 0x1f != 0 {
                let sharing = if level >= 3 { total } else { threads };
                e.eax = set_bits(e.eax, 26, 6, u32::from(topo.cores()) - 1);
                e.eax = set_bits(e.eax, 14, 12, sharing - 1);
            }
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = id_bits(threads);
                    e.ebx = threads;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = id_bits(total);
                    e.ebx = total;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_AMD_SIZES => {
            // ECX[7:0]: number of threads - 1; ECX[15:12]: APIC ID bits.
            e.ecx = set_bits(e.ecx, 0, 8, total - 1);
            e.ecx = set_bits(e.ecx, 12, 4, id_bits(total));
        }
        _ => {}
    }
}

/// Normalizes `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `id`.
pub fn normalize(cpuid: &mut CpuId, id: u8, topo: Topology) {
    for e in cpuid.as_mut_slice() {
        normalize_entry(e, id, topo);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_apic_id_count_and_hypervisor() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            ebx: 0x0008_0800,
            ..entry(1, 0)
        }])
        .unwrap();
        normalize(&mut cpuid, 3, Topology::new(4, false));
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            edx: EDX_HTT,
            ..entry(1, 0)
        }])
        .unwrap();
        normalize(&mut cpuid, 0, Topology::new(1, false));
        assert_eq!(cpuid.as_slice()[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_levels() {
        let mut cpuid =
            CpuId::from_entries(&[entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]).unwrap();
        normalize(&mut cpuid, 5, Topology::new(6, true));
        let e = cpuid.as_slice();
        assert_eq!(
            (e[0].eax, e[0].ebx, e[0].ecx >> 8, e[0].edx),
            (1, 2, LEVEL_SMT, 5)
        );
        assert_eq!(
            (e[1].eax, e[1].ebx, e[1].ecx >> 8, e[1].edx),
            (3, 6, LEVEL_CORE, 5)
        );
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx & 0xff), (0, 0, 2));
    }

    #[test]
    fn cache_leaf_sharing() {
        let l1 = kvm_cpuid_entry2 {
            eax: (1 << 5) | 1,
            ..entry(4, 0)
        };
        let l3 = kvm_cpuid_entry2 {
            eax: (3 << 5) | 3,
            ..entry(4, 3)
        };
        let mut cpuid = CpuId::from_entries(&[l1, l3]).unwrap();
        normalize(&mut cpuid, 0, Topology::new(4, true));
        let e = cpuid.as_slice();
        assert_eq!(e[0].eax >> 26, 1, "2 cores");
        assert_eq!(
            (e[0].eax >> 14) & 0xfff,
            1,
            "L1 shared by the core's 2 threads"
        );
        assert_eq!((e[1].eax >> 14) & 0xfff, 3, "L3 shared by all 4");
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
        assert_eq!(Topology::new(3, true).cores(), 2);
        assert_eq!(Topology::new(1, true).threads_per_core, 1);
    }
}
