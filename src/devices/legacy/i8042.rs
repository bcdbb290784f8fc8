//! The i8042 keyboard controller, for one thing only: the CPU reset line a
//! guest pulls (command 0xfe to port 0x64) when it reboots with `reboot=k`.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

/// Ends the VM with [`ExitReason::Reset`].
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest reset the machine through the i8042");
        self.0.report(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60..=0x64.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status and data read as 0: no key, input buffer empty (what
        // Linux's reset path waits for).
        match u8::try_from(offset) {
            Ok(off) if data.len() == 1 => data[0] = self.0.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // Infallible.
            let _ = self.0.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0xaa]);
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        let mut wide = [0u8; 4];
        dev.read(4, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(4, &[0xfe, 0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        assert_eq!(exit.reason(), None);
        let mut b = [1u8];
        dev.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
