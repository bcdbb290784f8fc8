//! Snapshots of a running VM and VMs started from one: pause every vCPU,
//! save vCPU, VM and device state and guest memory ([`crate::snapshot`]),
//! resume; or build the VM from those files instead of booting.
//!
//! Virtio devices are saved through their transports
//! ([`crate::devices::virtio::state`]). vsock connections are not kept: a
//! restored guest gets a transport reset. An fs share is saved only while
//! the guest has not mounted it; a restore serves the folder its config
//! names (chosen per run).

use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::devices::bus;
use crate::snapshot::{self, DeviceState, MachineState, Paths};
use crate::vcpu::{state, Vcpu, VcpuHandle};
use crate::vm::{self, VmState};

use super::{Error, Vmm};

/// The saved state of device `index`, if the snapshot's device there is
/// the one the config attaches there: `here` is its id, type, MMIO base
/// and IRQ.
pub(super) fn same_device<'a>(
    saved: &'a [DeviceState],
    index: usize,
    here: (&str, u32, u64, u32),
) -> Result<&'a DeviceState, Error> {
    let (id, device_type, base, irq) = here;
    let describe = |id: &str, t: u32, base: u64, irq: u32| {
        format!("{id} (virtio type {t}) at {base:#x}, IRQ {irq}")
    };
    let config = describe(id, device_type, base, irq);
    match saved.get(index) {
        None => Err(Error::SnapshotDevices(format!(
            "device {index} is {config} in the config, the snapshot has {} devices",
            saved.len()
        ))),
        Some(s)
            if s.id != id
                || s.device_type != device_type
                || s.mmio_base != base
                || s.irq != irq =>
        {
            Err(Error::SnapshotDevices(format!(
                "device {index} is {} in the snapshot, {config} in the config",
                describe(&s.id, s.device_type, s.mmio_base, s.irq)
            )))
        }
        Some(s) => Ok(s),
    }
}

/// Refuses a snapshot with devices beyond the `attached` the config has.
pub(super) fn no_more_devices(saved: &[DeviceState], attached: usize) -> Result<(), Error> {
    match saved.get(attached) {
        Some(s) => Err(Error::SnapshotDevices(format!(
            "the snapshot has {} devices, the config {attached}; the first missing is {} (virtio type {}) at {:#x}, IRQ {}",
            saved.len(),
            s.id,
            s.device_type,
            s.mmio_base,
            s.irq
        ))),
        None => Ok(()),
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

/// A snapshot asked for from another thread, and where its outcome goes.
pub(super) struct Request {
    pub paths: Paths,
    pub reply: mpsc::Sender<Result<(), Error>>,
}

/// Asks a running [`Vmm`] for snapshots from another thread (`kiln run`
/// makes its templates so). Each is taken between two rounds of the event
/// loop, like SIGUSR1's.
#[derive(Clone)]
pub struct Snapshotter {
    /// None once the VM has ended.
    queue: Arc<Mutex<Option<Vec<Request>>>>,
    wake: Arc<EventFd>,
}

impl Snapshotter {
    pub(super) fn new() -> Result<Self, Error> {
        Ok(Snapshotter {
            queue: Arc::new(Mutex::new(Some(Vec::new()))),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| {
                Error::Io {
                    what: "the snapshot request event",
                    source,
                }
            })?),
        })
    }

    /// Pauses the VM, writes a snapshot to `paths` (its directory must
    /// exist) and resumes the VM; returns once the files are written.
    pub fn take(&self, paths: Paths) -> Result<(), Error> {
        let (reply, outcome) = mpsc::channel();
        match bus::lock(&self.queue).as_mut() {
            Some(q) => q.push(Request { paths, reply }),
            None => return Err(Error::NotRunning),
        }
        self.wake.write(1).map_err(|source| Error::Io {
            what: "the snapshot request event",
            source,
        })?;
        // The VMM answers every request, or drops it when the VM ends.
        outcome.recv().map_err(|_| Error::NotRunning)?
    }

    /// The requests waiting.
    pub(super) fn pending(&self) -> Vec<Request> {
        bus::lock(&self.queue)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The VM has ended: drops waiting requests (their callers get
    /// [`Error::NotRunning`]) and refuses new ones.
    pub(super) fn close(&self) {
        bus::lock(&self.queue).take();
    }

    /// Whether a handle went to another thread ([`Vmm::snapshotter`]):
    /// snapshots may then be asked for while the VM runs.
    pub(super) fn handed_out(&self) -> bool {
        Arc::strong_count(&self.queue) > 1
    }

    /// The event-loop subscriber that wakes the loop for a request.
    pub(super) fn watcher(&self) -> RequestWatcher {
        RequestWatcher(self.wake.clone())
    }
}

/// Drains the request event so the loop wakes up and serves the requests.
pub(super) struct RequestWatcher(Arc<EventFd>);

impl MutEventSubscriber for RequestWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("cannot watch snapshot requests: {e:?}");
        }
    }
}

impl Vmm {
    /// A handle to take snapshots of this VM while it runs.
    pub fn snapshotter(&self) -> Snapshotter {
        self.snapshotter.clone()
    }

    /// On SIGUSR1, [`Vmm::run`] pauses the VM, writes a snapshot to
    /// `paths` and resumes it (a device that cannot be saved at that moment,
    /// such as a mounted fs share, fails the snapshot, not the VM).
    pub fn with_snapshot_to(mut self, paths: Paths) -> Result<Self, Error> {
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
    pub(super) fn take_snapshot(&self, handles: &[VcpuHandle], paths: &Paths) -> Result<(), Error> {
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
        let devices =
            self.devices
                .iter()
                .map(|d| {
                    let transport = bus::lock(&d.transport).save_state().map_err(|source| {
                        Error::DeviceState {
                            name: d.id.clone(),
                            source,
                        }
                    })?;
                    Ok(DeviceState {
                        id: d.id.clone(),
                        device_type: d.device_type,
                        mmio_base: d.mmio_base,
                        irq: d.irq,
                        transport,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
        let state = MachineState {
            mem_size_mib: self.mem_size_mib,
            vm: VmState::save(&self.vm.fd)?,
            vcpus,
            serial: bus::lock(&self.serial).snapshot(),
            acpi_pm: bus::lock(&self.acpi_pm).state(),
            devices,
        };
        snapshot::write(paths, &state, &self._memory, &self.vm.supported_cpuid)
            .map_err(Error::Snapshot)
    }
}
