//! The run's VM and how it starts: restored from a template (warm), or
//! booted (cold) up to the agent's `Ready`, and then saved as the template
//! when there is none. Either way the caller gets a running VM whose agent
//! waits for `Resume` and `Exec`.
//!
//! The VM runs on its own thread; [`Machine`] stops and joins it on every way
//! out, a failed start included.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::template::{Lock, Template};
use super::{initramfs, io_err, ConsoleTail, Error};
use crate::cli::NetMode;
use crate::config::{PasstConfig, VmConfig};
use crate::protocol::{self, Msg, NetworkSpec, VERSION};
use crate::vmm::exit::{ExitReason, ExitSignal};
use crate::vmm::{ConsoleIo, ConsoleOutput, RunOutcome, Snapshotter, Vmm};

/// How long a cold guest has to boot and its agent to call in.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a restored guest's agent has to call in again.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the VM has to end after the command did.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VM.
pub struct Machine {
    exit: Arc<ExitSignal>,
    ended: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<RunOutcome, crate::vmm::Error>>>,
    snapshotter: Snapshotter,
}

impl Machine {
    /// Runs `vmm` on its own thread. kiln run's signals are its own: the VM
    /// ignores them.
    fn start(vmm: Vmm) -> Result<Machine, Error> {
        let vmm = vmm.without_stop_signals();
        let exit = vmm.exit_signal();
        let snapshotter = vmm.snapshotter();
        let ended = Arc::new(AtomicBool::new(false));
        let thread = {
            let ended = ended.clone();
            std::thread::Builder::new()
                .name("kiln-vm".into())
                .spawn(move || {
                    let r = vmm.run();
                    ended.store(true, Ordering::SeqCst);
                    r
                })
                .map_err(io_err("cannot start the VM thread"))?
        };
        Ok(Machine {
            exit,
            ended,
            thread: Some(thread),
            snapshotter,
        })
    }

    pub fn ended(&self) -> &AtomicBool {
        &self.ended
    }

    fn stop(&self, why: &str) {
        self.exit.report(ExitReason::Stopped(why.to_string()));
    }

    /// Why the VM ended, once it has.
    pub fn end_reason(&self) -> Option<ExitReason> {
        self.ended
            .load(Ordering::SeqCst)
            .then(|| self.exit.reason())
            .flatten()
    }

    /// Waits for the VM to end (`powering_off`: the agent is shutting it
    /// down), stopping it if it does not within the timeout, and joins it;
    /// returns why it ended.
    pub fn finish(mut self, powering_off: bool) -> Option<ExitReason> {
        if powering_off {
            let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
            while !self.ended.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !self.ended.load(Ordering::SeqCst) {
                log::warn!("the VM did not power off after the command ended; stopping it");
            }
        }
        self.join();
        self.exit.reason()
    }

    fn join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if !self.ended.load(Ordering::SeqCst) {
            self.stop("the run is over");
        }
        match thread.join() {
            Ok(Ok(outcome)) => log::debug!("VM: {}", outcome.reason),
            Ok(Err(e)) => log::warn!("VM: {}", crate::error_chain(&e)),
            Err(_) => log::warn!("the VM thread panicked"),
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.join();
    }
}

/// The MAC of `--net`'s interface: locally administered, "kiln" in ASCII.
const GUEST_MAC: [u8; 6] = [0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x00];

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the agent configures for `--net`: passt's defaults (see
/// [`PasstConfig`]), the host's DNS forwarded through passt.
fn network_spec(net: NetMode) -> Option<NetworkSpec> {
    match net {
        NetMode::None => None,
        NetMode::Passt => {
            let p = PasstConfig::default();
            Some(NetworkSpec {
                mac: GUEST_MAC,
                address: p.address(),
                prefix_len: p.prefix_len(),
                gateway: p.gateway(),
                dns: vec![p.dns()],
            })
        }
    }
}

/// What the VM is made of.
pub struct Recipe<'a> {
    pub kernel: &'a Path,
    pub agent: &'a Path,
    /// Where a cold boot's initramfs is written.
    pub initrd: PathBuf,
    pub image: &'a Path,
    pub uds: &'a Path,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Host folder and read-only flag of each shared folder (tags m0, m1...).
    pub shares: Vec<(PathBuf, bool)>,
    pub net: NetMode,
    pub console: ConsoleTail,
}

impl Recipe<'_> {
    /// The VM's config; `initrd` only for a cold boot.
    fn config(&self, initrd: Option<&Path>) -> Result<VmConfig, Error> {
        let fs: Vec<serde_json::Value> = self
            .shares
            .iter()
            .enumerate()
            .map(|(i, (host, read_only))| {
                serde_json::json!({ "tag": format!("m{i}"), "path_on_host": host, "read_only": read_only })
            })
            .collect();
        let mut boot = serde_json::json!({
            "kernel_image_path": self.kernel,
            "boot_args": "console=ttyS0 reboot=k panic=1 quiet",
        });
        if let Some(initrd) = initrd {
            boot["initrd_path"] = serde_json::json!(initrd);
        }
        let net: Vec<serde_json::Value> = match self.net {
            NetMode::None => Vec::new(),
            NetMode::Passt => vec![serde_json::json!({
                "iface_id": "eth0", "guest_mac": mac_text(&GUEST_MAC), "passt": {},
            })],
        };
        let config = serde_json::json!({
            "boot-source": boot,
            "machine-config": { "vcpu_count": self.cpus, "mem_size_mib": self.memory_mib },
            "drives": [{
                "drive_id": "image", "path_on_host": self.image,
                "is_root_device": false, "is_read_only": true,
            }],
            "vsock": { "guest_cid": 3, "uds_path": self.uds },
            "entropy": {},
            "fs": fs,
            "network-interfaces": net,
        });
        VmConfig::from_json(&config.to_string()).map_err(Error::Config)
    }

    fn console(&self) -> ConsoleIo {
        ConsoleIo {
            output: ConsoleOutput::Writer(Box::new(self.console.clone())),
            input: None,
        }
    }
}

/// A VM whose agent waits for `Resume` and `Exec`.
pub struct Started {
    pub machine: Machine,
    pub stream: UnixStream,
    /// Restored from a template.
    pub warm: bool,
    /// The agent's (started, hello) guest uptimes in ms.
    pub uptimes: (u32, u32),
    /// When the VM was built or restored, when the agent said Hello and
    /// when it was ready, from the start of this function.
    pub built: Duration,
    pub hello: Duration,
    pub ready: Duration,
    /// Time spent saving a new template.
    pub saved: Duration,
}

/// Starts the VM: from `template` if it exists and restores, else cold
/// (and then saved as `template`). A template that cannot be restored is
/// rebuilt, with a warning; only one kiln builds a given template at a
/// time, the others wait and restore it.
pub fn start(
    recipe: &Recipe,
    listener: &UnixListener,
    template: Option<&Template>,
    progress: &mut dyn FnMut(&str),
) -> Result<Started, Error> {
    let Some(t) = template else {
        return cold(recipe, listener, None);
    };
    for _ in 0..2 {
        let lock = match warm(recipe, listener, t) {
            Ok(Some(started)) => return Ok(started),
            Ok(None) => lock_to_build(t, progress)?,
            Err(e) => {
                log::warn!(
                    "the template in {} cannot be used ({}); booting cold and making it again",
                    t.dir().display(),
                    crate::error_chain(&e)
                );
                drain(listener);
                let lock = lock_to_build(t, progress)?;
                t.remove(&lock)
                    .map_err(io_err("cannot remove the broken template"))?;
                lock
            }
        };
        if !t.exists() {
            return cold(recipe, listener, Some((t, lock)));
        }
        // Another kiln made it while this one waited: restore it.
    }
    cold(recipe, listener, None)
}

fn lock_to_build(t: &Template, progress: &mut dyn FnMut(&str)) -> Result<Lock, Error> {
    t.lock_exclusive(|| progress("waiting for another kiln to make this VM's template"))
        .map_err(io_err(format!("cannot lock {}", t.dir().display())))
}

/// Restores the template if it exists; Ok(None) if it does not.
fn warm(recipe: &Recipe, listener: &UnixListener, t: &Template) -> Result<Option<Started>, Error> {
    let start = Instant::now();
    let vmm = {
        // No kiln replaces the files while they are read and mapped.
        let _shared = t
            .lock_shared()
            .map_err(io_err(format!("cannot lock {}", t.dir().display())))?;
        if !t.exists() {
            return Ok(None);
        }
        let config = recipe.config(None)?;
        Vmm::restore(&config, recipe.console(), &t.paths()).map_err(Error::Vmm)?
    };
    let machine = Machine::start(vmm)?;
    t.touch();
    let built = start.elapsed();
    log::info!("restored the template {} in {built:?}", t.dir().display());
    let mut stream = accept_agent(listener, &machine, RECONNECT_TIMEOUT)?;
    let uptimes = greet(&mut stream)?;
    let hello = start.elapsed();
    Ok(Some(Started {
        machine,
        stream,
        warm: true,
        uptimes,
        built,
        hello,
        ready: hello,
        saved: Duration::ZERO,
    }))
}

/// Boots the kernel, has the agent build the command's root, and saves the
/// VM as the template `build` names (keeping its lock until it is saved).
fn cold(
    recipe: &Recipe,
    listener: &UnixListener,
    build: Option<(&Template, Lock)>,
) -> Result<Started, Error> {
    let start = Instant::now();
    initramfs::write(&recipe.initrd, recipe.agent).map_err(io_err("cannot write the initramfs"))?;
    let config = recipe.config(Some(&recipe.initrd))?;
    let machine = Machine::start(Vmm::build(&config, recipe.console()).map_err(Error::Vmm)?)?;
    let built = start.elapsed();
    let mut stream = accept_agent(listener, &machine, BOOT_TIMEOUT)?;
    let uptimes = greet(&mut stream)?;
    let hello = start.elapsed();
    if let Some(spec) = network_spec(recipe.net) {
        protocol::write_msg(&mut stream, &Msg::Network(Box::new(spec))).map_err(Error::Protocol)?;
    }
    protocol::write_msg(
        &mut stream,
        &Msg::Prepare {
            root_device: "/dev/vda".into(),
            // Worth its time only in a template, which many runs share.
            warm_up: build.is_some(),
        },
    )
    .map_err(Error::Protocol)?;
    match protocol::read_msg(&mut stream).map_err(Error::Protocol)? {
        Some(Msg::Ready) => {}
        Some(Msg::Failed { message, .. }) => return Err(Error::Prepare(message)),
        other => {
            return Err(Error::VmEnded(format!(
                "the agent said {other:?} instead of Ready"
            )))
        }
    }
    let ready = start.elapsed();
    if let Some((t, lock)) = build {
        let saving = Instant::now();
        match save(&machine.snapshotter, t, &lock) {
            Ok(()) => log::info!(
                "saved this VM as the template {} in {:?}",
                t.dir().display(),
                saving.elapsed()
            ),
            Err(e) => log::warn!(
                "cannot save this VM as a template (the next run boots cold too): {}",
                crate::error_chain(&e)
            ),
        }
    }
    Ok(Started {
        machine,
        stream,
        warm: false,
        uptimes,
        built,
        hello,
        ready,
        saved: start.elapsed() - ready,
    })
}

fn save(snapshotter: &Snapshotter, t: &Template, lock: &Lock) -> Result<(), Error> {
    let staging = t
        .staging()
        .map_err(io_err("cannot make the template's directory"))?;
    snapshotter.take(staging.paths()).map_err(Error::Vmm)?;
    t.commit(staging, lock).map_err(io_err(format!(
        "cannot put the template in {}",
        t.dir().display()
    )))
}

/// Drops connections a VM that was given up on may have left queued.
fn drain(listener: &UnixListener) {
    while listener.accept().is_ok() {}
}

/// Waits for the agent to connect, as long as the VM runs.
fn accept_agent(
    listener: &UnixListener,
    machine: &Machine,
    timeout: Duration,
) -> Result<UnixStream, Error> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(io_err("cannot talk to the agent"))?;
                log::info!("the agent called in after {:?}", start.elapsed());
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err("cannot accept the agent's connection")(e)),
        }
        if let Some(reason) = machine.end_reason() {
            return Err(Error::VmEnded(format!("{reason}; see the console")));
        }
        if start.elapsed() > timeout {
            return Err(Error::BootTimeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Hello both ways; returns the agent's (started, hello) guest uptimes.
fn greet(stream: &mut UnixStream) -> Result<(u32, u32), Error> {
    let uptimes = match protocol::read_msg(stream).map_err(Error::Protocol)? {
        Some(Msg::AgentHello {
            version,
            started_ms,
            hello_ms,
        }) if version == VERSION => (started_ms, hello_ms),
        Some(Msg::AgentHello { version, .. }) => return Err(Error::Version(version)),
        other => {
            return Err(Error::VmEnded(format!(
                "the agent said {other:?} instead of Hello"
            )))
        }
    };
    protocol::write_msg(stream, &Msg::HostHello { version: VERSION }).map_err(Error::Protocol)?;
    Ok(uptimes)
}
