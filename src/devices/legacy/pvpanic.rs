//! QEMU's pvpanic device, one I/O port (0x505, ACPI `QEMU0001` in the
//! DSDT): Linux's pvpanic driver writes "panicked" to it from its panic
//! notifier, before the kernel waits out `panic=N` and resets. kiln ends
//! the VM there as [`ExitReason::GuestPanic`]: sooner than the reset, and
//! also for a kernel that would not reset (`panic=0`). Kernels without
//! the driver still get caught by the reset flag
//! ([`crate::arch::x86_64::panic`]).

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

/// Events (QEMU's docs/specs/pvpanic.rst): the kernel panicked; a crash
/// kernel is loaded (kdump is about to run).
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: Arc<ExitSignal>,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        PvPanic { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The driver reads which events the device supports.
        data.fill(0xff);
        if let (0, [byte]) = (offset, data) {
            *byte = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [event]) = (offset, data) else {
            return;
        };
        if event & PANICKED != 0 {
            log::info!("the guest kernel reported a panic (pvpanic)");
            self.exit.report(ExitReason::GuestPanic);
        } else if event & CRASH_LOADED != 0 {
            // The guest boots its crash kernel and goes on.
            log::info!("the guest kernel crashed into its crash kernel (pvpanic)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_ends_the_vm_crash_loaded_does_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = PvPanic::new(exit.clone());
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [PANICKED | CRASH_LOADED]);
        dev.write(0, &[CRASH_LOADED]);
        dev.write(0, &[0]);
        dev.write(0, &[PANICKED, 0]);
        dev.write(1, &[PANICKED]);
        assert_eq!(exit.reason(), None);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, &[PANICKED]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPanic));
    }
}
