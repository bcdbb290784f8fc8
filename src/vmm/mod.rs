//! The VMM: builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! [`Vmm::build`] is the one recipe: KVM and the VM, guest memory, devices
//! on their buses and interrupts, kernel, initrd and command line, boot
//! tables, vCPUs. [`Vmm::run`] starts the vCPU threads, runs the device event
//! loop on the calling thread until the guest ends, then stops and joins
//! every vCPU thread.

pub mod exit;
mod signals;

use std::fs::File;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{self, BootInfo};
use crate::arch::x86_64::cpuid::Topology;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable;
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::config::VmConfig;
use crate::devices::bus::{self, Bus};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{Output, SerialDevice, SerialInput};
use crate::vcpu::{self, Vcpu, VcpuHandle, VcpuSetup};
use crate::{loader, memory, quirks, vm};
use exit::{ExitReason, ExitSignal};

/// The command line when the config gives no `boot_args` (Firecracker's
/// defaults, with the console on the serial port kiln emulates).
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp";

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
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
        name: &'static str,
        irq: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Where the console goes and comes from.
pub struct ConsoleIo {
    pub output: Output,
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
    cmdline: String,
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
    pub fn build(config: &VmConfig, console: ConsoleIo) -> Result<Vmm, Error> {
        let mc = &config.machine_config;
        let kvm = vm::open_kvm()?;
        let vm = vm::Vm::new(kvm, mc.vcpu_count)?;
        let mem = memory::create(mc.mem_size_mib)?;
        vm.register_memory(&mem, mc.track_dirty_pages)?;
        let mem_size = (mc.mem_size_mib as u64) << 20;

        let exit = Arc::new(ExitSignal::new().map_err(io_err("the exit event"))?);
        let mut event_manager = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(signals::ExitWatcher::new(
            exit.clone(),
        )?)));

        let mut io_bus = Bus::new();
        let mmio_bus = Bus::new();
        Self::attach_legacy_devices(&vm, &mut io_bus, &mut event_manager, &exit, console)?;

        let mut cmdline = config
            .boot_source
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        if let Some(extra) = quirks::cmdline_additions(&cmdline) {
            log::info!("this host's KVM interprets guest kernel code ({}); adding to the kernel command line: {extra}", quirks::BACKEND_NAME);
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }

        let kernel = loader::load_kernel(&mem, &config.boot_source.kernel_image_path)?;
        let initrd = match &config.boot_source.initrd_path {
            Some(path) => Some(loader::load_initrd(&mem, mem_size, path, &kernel)?),
            None => None,
        };
        let cmdline_size = loader::load_command_line(&mem, &cmdline)?;
        let info = BootInfo {
            mem_size,
            cmdline_size,
            initrd,
        };
        match kernel.mode {
            EntryMode::Linux64 => boot::write_zero_page(&mem, &info, kernel.setup_header)?,
            EntryMode::Pvh => boot::write_pvh_start_info(&mem, &info)?,
        }
        regs::write_boot_tables(&mem, kernel.mode)?;
        mptable::write(&mem, mc.vcpu_count)?;
        log::info!(
            "kernel {} entered at {:#x} ({:?}), {} vCPUs, {} MiB; command line: {cmdline}",
            config.boot_source.kernel_image_path.display(),
            kernel.entry,
            kernel.mode,
            mc.vcpu_count,
            mc.mem_size_mib
        );

        let setup = VcpuSetup {
            vm: &vm.fd,
            supported_cpuid: &vm.supported_cpuid,
            topology: Topology::new(mc.vcpu_count, mc.smt),
            entry: kernel.entry,
            mode: kernel.mode,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            exit: exit.clone(),
        };
        let vcpus = (0..mc.vcpu_count)
            .map(|id| Vcpu::new(id, &setup))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Vmm {
            vm,
            _memory: mem,
            vcpus,
            event_manager,
            exit,
            cmdline,
        })
    }

    /// The serial console (IRQ 4 through an irqfd, input from the event
    /// loop) and the i8042 reset line.
    fn attach_legacy_devices(
        vm: &vm::Vm,
        io_bus: &mut Bus,
        event_manager: &mut EventManager<Subscriber>,
        exit: &Arc<ExitSignal>,
        console: ConsoleIo,
    ) -> Result<(), Error> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("the serial interrupt"))?;
        vm.fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|source| Error::Irqfd {
                name: "serial",
                irq: SERIAL_IRQ,
                source,
            })?;
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(irq, console.output).map_err(io_err("the serial console"))?,
        ));
        io_bus
            .insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)
            .map_err(|source| Error::Bus {
                name: "serial",
                source,
            })?;
        if let Some(input) = console.input {
            let input = SerialInput::new(serial, input).map_err(io_err("the serial input"))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
        }
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        io_bus
            .insert(i8042, I8042_PORT, I8042_PORT_LEN)
            .map_err(|source| Error::Bus {
                name: "i8042",
                source,
            })?;
        Ok(())
    }

    /// The kernel command line the guest gets.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM until the guest ends it or kiln is signalled; every vCPU
    /// thread is stopped and joined before this returns.
    pub fn run(mut self) -> Result<RunOutcome, Error> {
        let _signals = signals::StopSignals::install(&mut self.event_manager, self.exit.clone())?;
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
        while self.exit.reason().is_none() {
            if let Err(e) = self.event_manager.run() {
                self.exit
                    .report(ExitReason::VmmError(format!("event loop failed: {e:?}")));
                loop_error = Some(e);
            }
        }
        for h in &handles {
            h.kick();
        }
        let vcpus_joined = handles.len();
        let vcpus_panicked = handles
            .into_iter()
            .map(VcpuHandle::join)
            .filter(|ok| !ok)
            .count();
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
