//! x86_64 guest setup: memory layout, boot parameters, CPU state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod panic;
pub mod regs;
