//! Legacy PC devices: the 16550 serial console and the i8042 reset line.

pub mod console;
pub mod i8042;
pub mod output_fd;
pub mod serial;
