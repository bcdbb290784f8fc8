//! The ACPI PM1a registers the FADT points at ([`crate::arch::x86_64::acpi`]):
//! the event block (status, enable) and the control register, six bytes
//! of port I/O. What matters is one write: SLP_EN with the SLP_TYP of
//! `\_S5_`, by which an ACPI guest powers the machine off (Linux's
//! `poweroff`); it ends the VM as [`ExitReason::PowerOff`].
//!
//! The rest is what ACPICA expects to find: the status register reads 0
//! (kiln raises no ACPI event, so there is nothing to clear), the enable
//! register keeps what the guest writes, and the control register reads
//! SCI_EN (the machine is always in ACPI mode) and keeps SLP_TYP.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::acpi::SLP_TYP_S5;
use crate::arch::x86_64::layout::{ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN};
use crate::devices::bus::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

/// Byte offsets of the registers from the start of the block.
const STATUS: u64 = 0;
const ENABLE: u64 = 2;
const CONTROL: u64 = 4;
/// The block's length: three 16-bit registers.
pub const LEN: u64 = 6;
const _: () = assert!(LEN == ACPI_PM1_EVT_LEN + ACPI_PM1_CNT_LEN);
/// PM1 control bits (ACPI 6.5, 4.8.2.1.2).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// What a snapshot keeps of the registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub enable: u16,
    pub control: u16,
}

/// The PM1a event block and control register.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    enable: u16,
    /// SLP_TYP and the other read/write bits; SCI_EN is always read as set.
    control: u16,
    /// A sleep state kiln does not offer was asked for (warned once: a
    /// guest must not flood the log).
    warned: bool,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>, state: Option<&AcpiPmState>) -> Self {
        let state = state.copied().unwrap_or_default();
        AcpiPm {
            exit,
            enable: state.enable,
            control: state.control & !SLP_EN,
            warned: false,
        }
    }

    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            enable: self.enable,
            control: self.control,
        }
    }

    fn register(&self, at: u64) -> u16 {
        match at {
            ENABLE => self.enable,
            CONTROL => self.control | SCI_EN,
            _ => 0,
        }
    }

    fn write_register(&mut self, at: u64, value: u16) {
        match at {
            ENABLE => self.enable = value,
            CONTROL => {
                self.control = value & !SLP_EN;
                if value & SLP_EN != 0 {
                    self.sleep((value & SLP_TYP_MASK) >> SLP_TYP_SHIFT);
                }
            }
            // The status bits are write-one-to-clear, and none is ever set.
            _ => {}
        }
    }

    fn sleep(&mut self, slp_typ: u16) {
        if slp_typ == u16::from(SLP_TYP_S5) {
            log::info!("the guest powered off through ACPI (S5)");
            self.exit.report(ExitReason::PowerOff);
        } else if !self.warned {
            // Only S5 is in the DSDT: a guest that asks for another state
            // gets nothing, as on a machine without it.
            self.warned = true;
            log::warn!(
                "the guest asked for ACPI sleep type {slp_typ}, which kiln does not offer; ignored \
                 (said once)"
            );
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = if at < LEN {
                let [lo, hi] = self.register(at & !1).to_le_bytes();
                if at & 1 == 0 {
                    lo
                } else {
                    hi
                }
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Byte by byte, each merged into its register: a 16-bit write is
        // its low byte, then its high byte (where SLP_EN is), and a guest
        // that writes the control register bytewise gets the same.
        for (i, &byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if at >= LEN {
                break;
            }
            let reg = at & !1;
            let [mut lo, mut hi] = match reg {
                // Writing 1s to status clears bits, so never write back
                // what was read: only this byte counts.
                STATUS => [0, 0],
                _ => self.register(reg).to_le_bytes(),
            };
            if at & 1 == 0 {
                lo = byte;
            } else {
                hi = byte;
            }
            let mut value = u16::from_le_bytes([lo, hi]);
            if reg == CONTROL && at & 1 == 0 {
                // SLP_EN only counts in the byte written.
                value &= !SLP_EN;
            }
            self.write_register(reg, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (Arc<ExitSignal>, AcpiPm) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (exit.clone(), AcpiPm::new(exit, None))
    }

    fn s5() -> u16 {
        (u16::from(SLP_TYP_S5) << SLP_TYP_SHIFT) | SLP_EN
    }

    #[test]
    fn slp_en_with_s5_powers_off() {
        let (exit, mut dev) = device();
        // What Linux does: SLP_TYP first, then SLP_TYP | SLP_EN.
        dev.write(
            CONTROL,
            &(u16::from(SLP_TYP_S5) << SLP_TYP_SHIFT).to_le_bytes(),
        );
        assert_eq!(exit.reason(), None);
        dev.write(CONTROL, &s5().to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn a_byte_write_of_the_high_half_powers_off_too() {
        let (exit, mut dev) = device();
        dev.write(CONTROL + 1, &[s5().to_le_bytes()[1]]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_no_slp_en_do_nothing() {
        let (exit, mut dev) = device();
        for typ in (0u16..8).filter(|t| *t != u16::from(SLP_TYP_S5)) {
            dev.write(CONTROL, &((typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        }
        dev.write(CONTROL, &(s5() & !SLP_EN).to_le_bytes());
        // 32-bit write across status and enable, and past the end.
        dev.write(STATUS, &[0xff; 4]);
        dev.write(LEN - 1, &[0xff; 8]);
        dev.write(u64::MAX, &[0xff; 2]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn registers_read_back_as_acpica_expects() {
        let (_, mut dev) = device();
        let mut b = [0u8; 2];
        dev.read(CONTROL, &mut b);
        assert_eq!(u16::from_le_bytes(b), SCI_EN, "always in ACPI mode");
        dev.write(ENABLE, &0x0120u16.to_le_bytes());
        dev.write(STATUS, &0xffffu16.to_le_bytes());
        let mut all = [0u8; 6];
        dev.read(STATUS, &mut all);
        assert_eq!(all, [0, 0, 0x20, 0x01, 1, 0]);
        // SLP_TYP stays; SLP_EN reads 0.
        dev.write(CONTROL, &(3u16 << SLP_TYP_SHIFT).to_le_bytes());
        dev.read(CONTROL, &mut b);
        assert_eq!(u16::from_le_bytes(b), (3 << SLP_TYP_SHIFT) | SCI_EN);
        let mut past = [0u8; 4];
        dev.read(LEN - 2, &mut past);
        assert_eq!(past, [0x01, 0x0c, 0xff, 0xff]);
        dev.read(u64::MAX, &mut past);
        assert_eq!(past, [0xff; 4]);
    }

    #[test]
    fn state_survives_a_snapshot() {
        let (exit, mut dev) = device();
        dev.write(ENABLE, &0x0100u16.to_le_bytes());
        dev.write(CONTROL, &(2u16 << SLP_TYP_SHIFT).to_le_bytes());
        let state = dev.state();
        let back = AcpiPm::new(exit, Some(&state));
        assert_eq!(back.state(), state);
        assert_eq!(back.register(ENABLE), 0x0100);
    }
}
