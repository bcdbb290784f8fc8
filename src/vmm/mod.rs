//! The VMM: builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! [`Vmm::build`] is the one recipe: KVM and the VM, guest memory, devices
//! on their buses and interrupts, kernel, initrd and command line, boot
//! tables, vCPUs. [`Vmm::run`] starts the vCPU threads, runs the device event
//! loop on the calling thread until the guest ends, then stops and joins
//! every vCPU thread.

pub mod exit;
mod signals;
mod snapshot;

pub use snapshot::Snapshotter;

use std::fs::File;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::arch::x86_64::acpi;
use crate::arch::x86_64::boot::{self, BootInfo};
use crate::arch::x86_64::cpuid::Topology;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::config::{BlockDeviceConfig, CacheType, VmConfig};
use crate::devices::bus::{self, Bus};
use crate::devices::legacy::acpi_pm::{self, AcpiPm, AcpiPmState};
use crate::devices::legacy::console::{self, ConsoleBuffer, ConsoleDrainer};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::pvpanic::PvPanic;
use crate::devices::legacy::serial::{SerialDevice, SerialInput, SerialSnapshot};
use crate::devices::virtio::block::{self, Block};
use crate::devices::virtio::fs::{self, guard::FdBudget, Fs, FsOptions};
use crate::devices::virtio::net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{self, Vsock, VsockOptions};
use crate::devices::virtio::{
    self, BlockOptions, CacheMode, MmioTransport, VirtioDevice, VirtioMmioDevice,
};
use crate::snapshot::DeviceState;
use crate::vcpu::{self, Vcpu, VcpuHandle, VcpuSetup};
use crate::{loader, memory, quirks, vm};
use exit::{ExitReason, ExitSignal};

pub use crate::devices::legacy::console::ConsoleOutput;

/// The command line when the config gives no `boot_args` (Firecracker's
/// defaults, with the console on the serial port kiln emulates).
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp";

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The console drainer (flushed at exit), and the UART and ACPI PM1
/// registers (saved in snapshots).
struct LegacyDevices {
    console: Arc<Mutex<ConsoleDrainer>>,
    serial: Arc<Mutex<SerialDevice>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error("the snapshot")]
    Snapshot(#[source] crate::snapshot::Error),
    #[error("{0}")]
    SnapshotUnsupported(String),
    #[error("the state of vCPU {0}")]
    VcpuState(u8, #[source] vcpu::state::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Regs(#[from] regs::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot place device {name}")]
    Bus {
        name: &'static str,
        #[source]
        source: bus::Error,
    },
    #[error("cannot set up {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register the interrupt of {name} (IRQ {irq})")]
    Irqfd {
        name: String,
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create virtio device {name}")]
    Virtio {
        name: String,
        #[source]
        source: virtio::Error,
    },
    #[error("cannot create the vsock device")]
    Vsock(#[source] vsock::Error),
    #[error("network-interfaces[{index}] (iface_id {iface_id:?})")]
    Net {
        index: usize,
        iface_id: String,
        #[source]
        source: net::Error,
    },
    #[error("cannot share fs[{index}] (tag {tag:?})")]
    Fs {
        index: usize,
        tag: String,
        #[source]
        source: fs::Error,
    },
    #[error("cannot create drive {drive_id:?}")]
    Block {
        drive_id: String,
        #[source]
        source: block::Error,
    },
    #[error("the state of {name}")]
    DeviceState {
        name: String,
        #[source]
        source: virtio::state::Error,
    },
    #[error("the snapshot does not match the config's devices: {0}")]
    SnapshotDevices(String),
    #[error("too many virtio devices: kiln has IRQs for {max}")]
    TooManyDevices { max: u32 },
    #[error("cannot register the queue notification of {name} at {addr:#x}")]
    Ioeventfd {
        name: String,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("the VM is not running")]
    NotRunning,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn block_options(d: &BlockDeviceConfig) -> BlockOptions {
    BlockOptions {
        path: d.path_on_host.clone(),
        read_only: d.is_read_only,
        cache: match d.cache_type {
            CacheType::Unsafe => CacheMode::Unsafe,
            CacheType::Writeback => CacheMode::Writeback,
        },
        drive_id: d.drive_id.clone(),
    }
}

/// One device the VMM attached, as snapshot/restore and `kiln run` find it.
#[derive(Clone)]
pub struct AttachedDevice {
    /// The config's name for it: `drive rootfs`, `entropy`, `vsock`.
    pub id: String,
    /// The virtio device ID (§5).
    pub device_type: u32,
    /// Guest physical address of its 4 KiB virtio-mmio window.
    pub mmio_base: u64,
    /// Its GSI.
    pub irq: u32,
    /// The transport, with the device behind it.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The one place virtio-mmio devices are wired: an MMIO page and an IRQ
/// each, the irqfd, one ioeventfd per queue, the event-loop subscriber, the
/// `virtio_mmio.device=` announcement on the command line, and the entry in
/// the device registry.
struct VirtioAttacher<'a> {
    vm: &'a vm::Vm,
    mem: &'a GuestMemoryMmap,
    mmio_bus: &'a mut Bus,
    event_manager: &'a mut EventManager<Subscriber>,
    cmdline: &'a mut String,
    devices: Vec<AttachedDevice>,
    /// On a restore, the devices the snapshot holds: each attached device
    /// must match the next one, and takes its state.
    saved: Option<&'a [DeviceState]>,
}

impl VirtioAttacher<'_> {
    fn count(&self) -> u32 {
        u32::try_from(self.devices.len()).unwrap_or(u32::MAX)
    }

    /// The drive letter the next block device gets (vda, vdb, ...).
    fn block_letter(&self) -> char {
        char::from(b'a' + u8::try_from(self.count() % 26).unwrap_or(0))
    }

    fn attach<D: VirtioDevice + 'static>(&mut self, id: &str, device: D) -> Result<(), Error> {
        let dev =
            VirtioMmioDevice::new(device, self.mem.clone()).map_err(|source| Error::Virtio {
                name: id.to_string(),
                source,
            })?;
        let count = self.count();
        let irq = VIRTIO_IRQ_START.saturating_add(count);
        if irq > IRQ_MAX {
            return Err(Error::TooManyDevices {
                max: IRQ_MAX - VIRTIO_IRQ_START + 1,
            });
        }
        let base = VIRTIO_MMIO_START + u64::from(count) * VIRTIO_MMIO_SIZE;
        let saved = match self.saved {
            Some(list) => {
                let here = (id, dev.device_type, base, irq);
                Some(snapshot::same_device(list, self.devices.len(), here)?)
            }
            None => None,
        };
        self.mmio_bus
            .insert(dev.transport.clone(), base, VIRTIO_MMIO_SIZE)
            .map_err(|source| Error::Bus {
                name: "virtio-mmio",
                source,
            })?;
        self.vm
            .fd
            .register_irqfd(&dev.irq_evt, irq)
            .map_err(|source| Error::Irqfd {
                name: id.to_string(),
                irq,
                source,
            })?;
        let notify = base + virtio::QUEUE_NOTIFY_OFFSET;
        for (i, evt) in dev.queue_evts.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            self.vm
                .fd
                .register_ioevent(evt, &IoEventAddress::Mmio(notify), index)
                .map_err(|source| Error::Ioeventfd {
                    name: id.to_string(),
                    addr: notify,
                    source,
                })?;
        }
        if let Some(saved) = saved {
            // Before the subscriber joins the event loop: it then finds
            // the device active, as after a DRIVER_OK.
            bus::lock(&dev.transport)
                .restore_state(&saved.transport)
                .map_err(|source| Error::DeviceState {
                    name: id.to_string(),
                    source,
                })?;
        }
        self.event_manager.add_subscriber(dev.subscriber);
        self.cmdline.push(' ');
        self.cmdline.push_str(&virtio::cmdline_param(base, irq));
        log::debug!("{id}: virtio-mmio at {base:#x}, IRQ {irq}");
        self.devices.push(AttachedDevice {
            id: id.to_string(),
            device_type: dev.device_type,
            mmio_base: base,
            irq,
            transport: dev.transport,
        });
        Ok(())
    }
}

/// Where the console goes and comes from.
pub struct ConsoleIo {
    /// Guest output goes through a bounded buffer, written here from the
    /// event loop: a slow or closed output never stops the guest.
    pub output: ConsoleOutput,
    /// Host input for the guest console (kiln passes its stdin), if any.
    pub input: Option<File>,
}

/// A VM, built and ready to run.
pub struct Vmm {
    vm: vm::Vm,
    // Kept alive for the VM's life: KVM maps it.
    _memory: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    /// Whether [`Vmm::run`] turns SIGTERM/SIGINT/SIGHUP into a stop.
    stop_signals: bool,
    devices: Vec<AttachedDevice>,
    console: Arc<Mutex<ConsoleDrainer>>,
    serial: Arc<Mutex<SerialDevice>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    mem_size_mib: usize,
    /// Where SIGUSR1 writes a snapshot, if anywhere.
    snapshot_to: Option<crate::snapshot::Paths>,
    snapshotter: Snapshotter,
    /// The guest kernel was asked to flag its reboots after a panic.
    panic_signal: bool,
}

/// How a run ended, with what the caller may want to check.
#[derive(Debug)]
pub struct RunOutcome {
    pub reason: ExitReason,
    /// vCPU threads that were started and have all been joined.
    pub vcpus_joined: usize,
    /// vCPU threads that panicked.
    pub vcpus_panicked: usize,
}

impl Vmm {
    /// Makes SIGTERM, SIGINT and SIGHUP wait until [`Vmm::run`] handles
    /// them (call it first thing, before building the VM, on the thread
    /// that will run it).
    pub fn hold_stop_signals() -> Result<(), Error> {
        signals::hold_stop_signals()
    }

    pub fn build(config: &VmConfig, console: ConsoleIo) -> Result<Vmm, Error> {
        Self::build_with(config, console, None)
    }

    /// Builds the VM `config` describes from the snapshot in `paths`
    /// instead of booting its kernel: guest memory mapped from the
    /// snapshot, vCPU, VM and device state restored.
    pub fn restore(
        config: &VmConfig,
        console: ConsoleIo,
        paths: &crate::snapshot::Paths,
    ) -> Result<Vmm, Error> {
        let kvm = vm::open_kvm()?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(vm::Error::SupportedCpuid)?;
        let (state, mem) = crate::snapshot::read(paths, &supported).map_err(Error::Snapshot)?;
        snapshot::check_state(config, &state)?;
        Self::build_with(config, console, Some((state, mem)))
    }

    fn build_with(
        config: &VmConfig,
        console: ConsoleIo,
        restore: Option<(crate::snapshot::MachineState, GuestMemoryMmap)>,
    ) -> Result<Vmm, Error> {
        let mc = &config.machine_config;
        let kvm = vm::open_kvm()?;
        let vm = vm::Vm::new(kvm, mc.vcpu_count)?;
        let (restore, mem) = match restore {
            Some((state, mem)) => (Some(state), mem),
            None => (None, memory::create(mc.mem_size_mib)?),
        };
        vm.register_memory(&mem, mc.track_dirty_pages)?;
        let mem_size = (mc.mem_size_mib as u64) << 20;

        let exit = Arc::new(ExitSignal::new().map_err(io_err("the exit event"))?);
        let mut event_manager = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(signals::ExitWatcher::new(
            exit.clone(),
        ))));

        let snapshotter = Snapshotter::new()?;
        event_manager.add_subscriber(Arc::new(Mutex::new(snapshotter.watcher())));

        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let legacy = Self::attach_legacy_devices(
            &vm,
            &mut io_bus,
            &mut event_manager,
            &exit,
            console,
            restore.as_ref().map(|s| (&s.serial, &s.acpi_pm)),
        )?;

        let mut cmdline = config
            .boot_source
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        let mut virtio = VirtioAttacher {
            vm: &vm,
            mem: &mem,
            mmio_bus: &mut mmio_bus,
            event_manager: &mut event_manager,
            cmdline: &mut cmdline,
            devices: Vec::new(),
            saved: restore.as_ref().map(|s| s.devices.as_slice()),
        };
        // The root drive goes first, so the guest names it /dev/vda.
        let mut drives: Vec<&BlockDeviceConfig> = config.drives.iter().collect();
        drives.sort_by_key(|d| !d.is_root_device);
        for drive in drives {
            let letter = virtio.block_letter();
            let dev = Block::new(block_options(drive)).map_err(|source| Error::Block {
                drive_id: drive.drive_id.clone(),
                source,
            })?;
            virtio.attach(&format!("drive {}", drive.drive_id), dev)?;
            if drive.is_root_device {
                let root = match &drive.partuuid {
                    Some(uuid) => format!("PARTUUID={uuid}"),
                    None => format!("/dev/vd{letter}"),
                };
                let mode = if drive.is_read_only { "ro" } else { "rw" };
                virtio.cmdline.push_str(&format!(" root={root} {mode}"));
            }
        }
        if config.entropy.is_some() {
            virtio.attach("entropy", Rng::new())?;
        }
        if let Some(v) = &config.vsock {
            let opts = VsockOptions {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.clone(),
            };
            virtio.attach("vsock", Vsock::new(&opts).map_err(Error::Vsock)?)?;
        }
        if !config.fs.is_empty() {
            // fuse-backend-rs 0.14 formats a guest-chosen opcode through an
            // unchecked transmute in a trace-level log line: with trace on,
            // a guest could reach undefined behaviour. Never log that much.
            if log::max_level() > log::LevelFilter::Debug {
                log::set_max_level(log::LevelFilter::Debug);
                log::warn!("logging at debug, not trace: virtio-fs's FUSE server cannot log at trace safely");
            }
            // One fd budget for every shared folder.
            let budget = Arc::new(FdBudget::for_this_process());
            for (index, share) in config.fs.iter().enumerate() {
                let opts = FsOptions {
                    tag: share.tag.clone(),
                    path: share.path_on_host.clone(),
                    read_only: share.read_only,
                };
                let dev = Fs::new(opts, budget.clone()).map_err(|source| Error::Fs {
                    index,
                    tag: share.tag.clone(),
                    source,
                })?;
                virtio.attach(&format!("fs {}", share.tag), dev)?;
            }
        }
        // Last, so that no other device moves for them.
        for (index, iface) in config.network_interfaces.iter().enumerate() {
            let dev = net::from_config(iface).map_err(|source| Error::Net {
                index,
                iface_id: iface.iface_id.clone(),
                source,
            })?;
            virtio.attach(&format!("net {}", iface.iface_id), dev)?;
        }
        if let Some(saved) = virtio.saved {
            snapshot::no_more_devices(saved, virtio.devices.len())?;
        }
        let devices = virtio.devices;
        // Cheap enough to ask always: see arch::x86_64::panic.
        let panic_signal = restore.is_some() || {
            match crate::arch::x86_64::panic::cmdline_option(&cmdline) {
                Some(option) => {
                    cmdline.push(' ');
                    cmdline.push_str(option);
                    true
                }
                None => false,
            }
        };
        if let Some(extra) = quirks::cmdline_additions(&cmdline) {
            log::info!("this host's KVM interprets guest kernel code ({}); adding to the kernel command line: {extra}", quirks::BACKEND_NAME);
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }

        // A restored guest is past its boot: its memory and registers are
        // the snapshot's.
        let (entry, mode) = match &restore {
            Some(_) => (0, EntryMode::Linux64),
            None => {
                let kernel = Self::load_guest(config, &mem, mem_size, &cmdline)?;
                (kernel.entry, kernel.mode)
            }
        };

        let setup = VcpuSetup {
            vm: &vm.fd,
            supported_cpuid: &vm.supported_cpuid,
            topology: Topology::new(mc.vcpu_count, mc.smt),
            entry,
            mode,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            exit: exit.clone(),
        };
        let vcpus = (0..mc.vcpu_count)
            .map(|id| Vcpu::new(id, &setup))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(state) = &restore {
            snapshot::restore_machine(&vm, &vcpus, state)?;
            for d in &devices {
                bus::lock(&d.transport).replay_interrupt();
            }
        }

        Ok(Vmm {
            vm,
            _memory: mem,
            vcpus,
            event_manager,
            exit,
            stop_signals: true,
            devices,
            console: legacy.console,
            serial: legacy.serial,
            acpi_pm: legacy.acpi_pm,
            mem_size_mib: mc.mem_size_mib,
            snapshot_to: None,
            snapshotter,
            panic_signal,
        })
    }

    /// Loads the kernel, initrd and command line and writes the boot
    /// tables; returns the kernel's entry.
    fn load_guest(
        config: &VmConfig,
        mem: &GuestMemoryMmap,
        mem_size: u64,
        cmdline: &str,
    ) -> Result<loader::LoadedKernel, Error> {
        let mc = &config.machine_config;
        let kernel = loader::load_kernel(mem, &config.boot_source.kernel_image_path)?;
        let initrd = match &config.boot_source.initrd_path {
            Some(path) => Some(loader::load_initrd(mem, mem_size, path, &kernel)?),
            None => None,
        };
        let given = config
            .boot_source
            .boot_args
            .as_deref()
            .unwrap_or(DEFAULT_BOOT_ARGS)
            .len();
        let cmdline_size = loader::load_command_line(mem, cmdline, given)?;
        let info = BootInfo {
            mem_size,
            cmdline_size,
            initrd,
            rsdp_addr: acpi::write(mem, mc.vcpu_count)?,
        };
        match kernel.mode {
            EntryMode::Linux64 => boot::write_zero_page(mem, &info, kernel.setup_header)?,
            EntryMode::Pvh => boot::write_pvh_start_info(mem, &info)?,
        }
        regs::write_boot_tables(mem, kernel.mode)?;
        mptable::write(mem, mc.vcpu_count)?;
        log::info!(
            "kernel {} entered at {:#x} ({:?}), {} vCPUs, {} MiB; command line: {cmdline}",
            config.boot_source.kernel_image_path.display(),
            kernel.entry,
            kernel.mode,
            mc.vcpu_count,
            mc.mem_size_mib
        );
        Ok(kernel)
    }

    /// The virtio devices attached, in the order the guest sees them.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// The serial console (IRQ 4 through an irqfd, output drained and input
    /// fed on the event loop), the i8042 reset line, the ACPI PM1
    /// registers and pvpanic, with the state a snapshot saved of them.
    fn attach_legacy_devices(
        vm: &vm::Vm,
        io_bus: &mut Bus,
        event_manager: &mut EventManager<Subscriber>,
        exit: &Arc<ExitSignal>,
        console: ConsoleIo,
        saved: Option<(&SerialSnapshot, &AcpiPmState)>,
    ) -> Result<LegacyDevices, Error> {
        let (serial_state, acpi_pm_state) = saved.unzip();
        let irq =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(io_err("the serial interrupt"))?;
        vm.fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|source| Error::Irqfd {
                name: "serial".into(),
                irq: SERIAL_IRQ,
                source,
            })?;
        let buffer = ConsoleBuffer::new(console::CONSOLE_BUFFER_SIZE)
            .map_err(io_err("the console buffer"))?;
        let drainer = ConsoleDrainer::new(buffer.clone(), console.output)
            .map_err(io_err("the console drainer"))?;
        let drainer = Arc::new(Mutex::new(drainer));
        event_manager.add_subscriber(drainer.clone());
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq, Box::new(buffer), serial_state)
                .map_err(io_err("the serial console"))?,
        ));
        io_bus
            .insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)
            .map_err(|source| Error::Bus {
                name: "serial",
                source,
            })?;
        let serial_dev = serial.clone();
        if let Some(input) = console.input {
            let input = SerialInput::new(serial, input).map_err(io_err("the serial input"))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
        }
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        let bus_err = |name| move |source| Error::Bus { name, source };
        io_bus
            .insert(i8042, I8042_PORT, I8042_PORT_LEN)
            .map_err(bus_err("i8042"))?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone(), acpi_pm_state)));
        io_bus
            .insert(acpi_pm.clone(), ACPI_PM1_EVT_PORT, acpi_pm::LEN)
            .map_err(bus_err("ACPI PM1"))?;
        let pvpanic = Arc::new(Mutex::new(PvPanic::new(exit.clone())));
        io_bus
            .insert(pvpanic, PVPANIC_PORT, PVPANIC_PORT_LEN)
            .map_err(bus_err("pvpanic"))?;
        Ok(LegacyDevices {
            console: drainer,
            serial: serial_dev,
            acpi_pm,
        })
    }

    /// A handle to end the run from another thread: report a reason on it
    /// (e.g. [`ExitReason::Stopped`] for a timeout) and [`Vmm::run`] returns.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Runs the VM until the guest ends it or kiln is signalled; every vCPU
    /// thread is stopped and joined before this returns.
    /// Leaves SIGTERM, SIGINT and SIGHUP to the caller (`kiln run` passes
    /// them on to the command in the guest), instead of stopping the VM.
    pub fn without_stop_signals(mut self) -> Self {
        self.stop_signals = false;
        self
    }

    pub fn run(mut self) -> Result<RunOutcome, Error> {
        if self.stop_signals {
            signals::StopSignals::install(&mut self.event_manager, self.exit.clone())?;
        }
        let snapshot_asked = match &self.snapshot_to {
            Some(_) => Some(signals::SnapshotSignal::install(&mut self.event_manager)?),
            None => None,
        };
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        let mut start_error = None;
        for vcpu in self.vcpus.drain(..) {
            match vcpu.start() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    start_error = Some(e);
                    break;
                }
            }
        }
        let mut loop_error = None;
        if let Some(e) = start_error {
            self.exit.report(ExitReason::VmmError(e.to_string()));
        }
        // Only now, before the first event: threads inherit their creator's filter.
        let snapshots = self.snapshot_to.is_some() || self.snapshotter.handed_out();
        if let Err(e) = crate::seccomp::enter(crate::seccomp::ThreadKind::Vmm { snapshots }) {
            self.exit
                .report(ExitReason::VmmError(crate::error_chain(&e)));
        }
        while self.exit.reason().is_none() {
            if let Err(e) = self.event_manager.run() {
                self.exit
                    .report(ExitReason::VmmError(format!("event loop failed: {e:?}")));
                loop_error = Some(e);
            }
            // The event loop (this thread) stands still during a snapshot.
            if let (Some(asked), Some(paths)) = (&snapshot_asked, &self.snapshot_to) {
                if asked.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    if let Err(e) = self.take_snapshot(&handles, paths) {
                        log::error!("snapshot failed: {}", crate::error_chain(&e));
                    }
                }
            }
            for request in self.snapshotter.pending() {
                let outcome = self.take_snapshot(&handles, &request.paths);
                let _ = request.reply.send(outcome);
            }
        }
        self.snapshotter.close();
        for h in &handles {
            h.kick();
        }
        let vcpus_joined = handles.len();
        let vcpus_panicked = handles
            .into_iter()
            .map(VcpuHandle::join)
            .filter(|ok| !ok)
            .count();
        if self.panic_signal && crate::arch::x86_64::panic::panicked(&self._memory) {
            self.exit.reset_was(ExitReason::GuestPanic);
        }
        // No vCPU writes the console any more: flush it, promptly when
        // kiln was asked to stop.
        let stall = match self.exit.reason() {
            Some(ExitReason::Stopped(_)) => console::FLUSH_STALL_ON_STOP,
            _ => console::FLUSH_STALL,
        };
        bus::lock(&self.console).finish(stall);
        drop(self.vm);
        if let Some(e) = loop_error {
            return Err(Error::EventLoop(e));
        }
        let reason = self
            .exit
            .reason()
            .unwrap_or(ExitReason::VmmError("no exit reason".into()));
        Ok(RunOutcome {
            reason,
            vcpus_joined,
            vcpus_panicked,
        })
    }
}
