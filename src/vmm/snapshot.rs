//! Snapshots of a running VM and VMs started from one: pause every vCPU,
//! save vCPU, VM and device state and guest memory ([`crate::snapshot`]),
//! resume; or build the VM from those files instead of booting.
//!
//! Only VMs without virtio devices can be snapshotted yet: the virtio
//! transport and device state is the next step, and a snapshot that lost it
//! would restore a guest whose devices no longer answer.

use std::sync::Arc;
use std::time::Instant;

use crate::config::VmConfig;
use crate::devices::bus;
use crate::snapshot::{self, MachineState, Paths};
use crate::vcpu::{state, Vcpu, VcpuHandle};
use crate::vm::{self, VmState};

use super::{Error, Vmm};

/// Refuses a config whose devices a snapshot cannot hold yet.
pub(super) fn check_config(config: &VmConfig) -> Result<(), Error> {
    let mut devices = Vec::new();
    if !config.drives.is_empty() {
        devices.push("drives");
    }
    if config.entropy.is_some() {
        devices.push("entropy");
    }
    if config.vsock.is_some() {
        devices.push("vsock");
    }
    if !config.fs.is_empty() {
        devices.push("fs");
    }
    if devices.is_empty() {
        Ok(())
    } else {
        Err(Error::SnapshotUnsupported(format!(
            "snapshots of VMs with virtio devices ({}) are not supported yet",
            devices.join(", ")
        )))
    }
}

/// Refuses a snapshot of another machine than the config describes.
pub(super) fn check_state(config: &VmConfig, state: &MachineState) -> Result<(), Error> {
    let mc = &config.machine_config;
    if state.mem_size_mib != mc.mem_size_mib || state.vcpus.len() != usize::from(mc.vcpu_count) {
        return Err(Error::SnapshotUnsupported(format!(
            "the snapshot is of a VM with {} vCPUs and {} MiB, the config asks for {} vCPUs and {} MiB",
            state.vcpus.len(),
            state.mem_size_mib,
            mc.vcpu_count,
            mc.mem_size_mib
        )));
    }
    Ok(())
}

/// Sets the VM's and each vCPU's saved state (before any vCPU runs).
pub(super) fn restore_machine(
    vm: &vm::Vm,
    vcpus: &[Vcpu],
    state: &MachineState,
) -> Result<(), Error> {
    state.vm.restore(&vm.fd)?;
    for (vcpu, s) in vcpus.iter().zip(&state.vcpus) {
        vcpu.restore_state(s)
            .map_err(|e| Error::VcpuState(vcpu.id(), e))?;
    }
    Ok(())
}

impl Vmm {
    /// On SIGUSR1, [`Vmm::run`] pauses the VM, writes a snapshot to
    /// `paths` and resumes it. Refused for VMs whose devices a snapshot
    /// cannot hold yet.
    pub fn with_snapshot_to(mut self, config: &VmConfig, paths: Paths) -> Result<Self, Error> {
        check_config(config)?;
        if let Some(dir) = paths.state.parent() {
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(dir)
            .map_err(|source| Error::Io {
                what: "the snapshot directory",
                source,
            })?;
        }
        self.snapshot_to = Some(paths);
        Ok(self)
    }

    /// Pauses every vCPU, writes the snapshot, resumes them (also when
    /// writing fails).
    pub(super) fn take_snapshot(&self, handles: &[VcpuHandle]) -> Result<(), Error> {
        let Some(paths) = &self.snapshot_to else {
            return Ok(());
        };
        let start = Instant::now();
        let mut paused = 0;
        let mut result = Ok(());
        for h in handles {
            match h.pause() {
                Ok(()) => paused += 1,
                Err(e) => {
                    result = Err(Error::Vcpu(e));
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.save_paused(handles, paths);
        }
        for h in &handles[..paused] {
            if let Err(e) = h.resume() {
                self.exit.report(super::ExitReason::VmmError(format!(
                    "after a snapshot: {e}"
                )));
            }
        }
        if result.is_ok() {
            log::info!(
                "snapshot written to {} and {} in {:?}",
                paths.state.display(),
                paths.memory.display(),
                start.elapsed()
            );
        }
        result
    }

    fn save_paused(&self, handles: &[VcpuHandle], paths: &Paths) -> Result<(), Error> {
        let msrs: Arc<[u32]> = state::msr_index_list(&self.vm.kvm)
            .map_err(|e| Error::VcpuState(0, e))?
            .into();
        let vcpus = handles
            .iter()
            .map(|h| h.save_state(msrs.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let state = MachineState {
            mem_size_mib: self.mem_size_mib,
            vm: VmState::save(&self.vm.fd)?,
            vcpus,
            serial: bus::lock(&self.serial).snapshot(),
        };
        snapshot::write(paths, &state, &self._memory, &self.vm.supported_cpuid)
            .map_err(Error::Snapshot)
    }
}
