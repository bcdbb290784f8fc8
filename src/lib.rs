//! kiln: a KVM-based microVM monitor.
//!
//! One `kiln` process runs one microVM: [`vmm::Vmm`] builds it from a
//! [`config::VmConfig`] (Firecracker's JSON schema), runs one thread per vCPU
//! and one event loop for device I/O, and reports how the guest ended.

pub mod agent;
pub mod arch;
pub mod cli;
pub mod config;
pub mod devices;
pub mod elf;
#[doc(hidden)]
pub mod fuzzing;
pub mod hostfile;
pub mod image;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod protocol;
pub mod quirks;
pub mod run;
pub mod seccomp;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// `e` followed by each of its causes (`source()`), joined with `": "`: the
/// whole story of a failure, as `kiln` prints it.
///
/// Every error in kiln names only its own failure in its message and keeps
/// its cause in `source()`, so each cause appears once here.
///
/// ```
/// use kiln::config::VmConfig;
/// let err = VmConfig::from_file("/nonexistent/vm.json".as_ref()).unwrap_err();
/// assert_eq!(
///     kiln::error_chain(&err),
///     "cannot read config file \"/nonexistent/vm.json\": No such file or directory (os error 2)"
/// );
/// ```
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}
