//! kiln: a KVM-based microVM monitor.
//!
//! One `kiln` process runs one microVM: [`vmm::Vmm`] builds it from a
//! [`config::VmConfig`] (Firecracker's JSON schema), runs one thread per vCPU
//! and one event loop for device I/O, and reports how the guest ended.

pub mod arch;
pub mod cli;
pub mod config;
pub mod devices;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod quirks;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod vmm;
