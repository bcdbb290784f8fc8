//! The KVM VM: /dev/kvm, the capabilities kiln relies on, the VM file
//! descriptor with its in-kernel irqchip and PIT, and guest memory slots.

use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_API_VERSION, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

pub const KVM_PATH: &str = "/dev/kvm";

/// Every capability kiln's VM setup and vCPU loop use.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::SetIdentityMapAddr, "identity map address"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    (Cap::ImmediateExit, "immediate_exit"),
    (Cap::VcpuEvents, "vCPU events"),
    (Cap::MpState, "MP state"),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{KVM_PATH} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or run kiln on a machine with hardware virtualization)")]
    KvmMissing,
    #[error("permission denied opening {KVM_PATH}: run kiln as root or add the user to the group that owns {KVM_PATH} (usually 'kvm')")]
    KvmPermission,
    #[error("cannot open {KVM_PATH}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version is {0}, kiln needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM lacks a capability kiln needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM allows {max} vCPUs on this host, the config asks for {wanted}")]
    TooManyVcpus { wanted: u8, max: usize },
    #[error("{0} failed")]
    State(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot} at {addr:#x}")]
    SetMemory {
        slot: u32,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Opens /dev/kvm and checks the API version and capabilities.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT if !Path::new(KVM_PATH).exists() => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(e),
    })?;
    let version = kvm.get_api_version();
    if u32::try_from(version).ok() != Some(KVM_API_VERSION) {
        return Err(Error::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(Error::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// A VM with its in-kernel interrupt controllers and PIT.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub supported_cpuid: CpuId,
}

impl Vm {
    pub fn new(kvm: Kvm, vcpu_count: u8) -> Result<Self, Error> {
        let max = kvm.get_max_vcpus();
        if usize::from(vcpu_count) > max {
            return Err(Error::TooManyVcpus {
                wanted: vcpu_count,
                max,
            });
        }
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        fd.set_tss_address(usize::try_from(KVM_TSS_ADDRESS).unwrap_or(usize::MAX))
            .map_err(Error::SetTss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(Error::SetIdentityMap)?;
        fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::CreatePit)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        Ok(Vm {
            kvm,
            fd,
            supported_cpuid,
        })
    }

    /// Gives every region of `mem` to KVM, one slot each.
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), Error> {
        let flags = if track_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let addr = region.start_addr().0;
            let userspace_addr = region.as_ptr() as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps for as long as the VM exists, and its size is the
            // mapping's size.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| Error::SetMemory {
                slot,
                addr,
                source,
            })?;
        }
        Ok(())
    }
}

/// The VM-wide state KVM holds beside the vCPUs: the interrupt
/// controllers, the PIT and the kvm-clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| Error::State("KVM_GET_IRQCHIP", e))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(fd: &VmFd) -> Result<Self, Error> {
        Ok(VmState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(|e| Error::State("KVM_GET_PIT2", e))?,
            clock: fd
                .get_clock()
                .map_err(|e| Error::State("KVM_GET_CLOCK", e))?,
        })
    }

    /// Sets it into a new VM (irqchip and PIT created, no vCPU run yet).
    pub fn restore(&self, fd: &VmFd) -> Result<(), Error> {
        let set = |what, r: Result<(), kvm_ioctls::Error>| r.map_err(|e| Error::State(what, e));
        set("KVM_SET_PIT2", fd.set_pit2(&self.pit))?;
        let mut clock = self.clock;
        // KVM refuses flags it did not expect on input; the clock value is
        // what matters.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        set("KVM_SET_CLOCK", fd.set_clock(&clock))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            set("KVM_SET_IRQCHIP", fd.set_irqchip(chip))?;
        }
        Ok(())
    }
}
