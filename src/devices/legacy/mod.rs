//! Legacy PC devices: the 16550 serial console, the i8042 reset line, the
//! ACPI PM1 registers (power-off) and pvpanic.

pub mod acpi_pm;
pub mod console;
pub mod i8042;
pub mod output_fd;
pub mod pvpanic;
pub mod serial;
