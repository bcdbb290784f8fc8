//! How a Linux guest tells kiln that its kernel panicked, at no cost to the
//! boot: kiln asks the kernel (`reboot=panic_warm`) to reboot warm after a
//! panic and cold otherwise, and x86 Linux records that choice for the
//! BIOS before it resets: the word at physical address 0x472 is 0x1234 for
//! a warm reset, 0 for a cold one. When the guest resets (i8042), kiln
//! reads that word. (ACPI and a pvpanic device would say the same at the
//! price of an ACPI interpreter in the guest's boot.)
//!
//! A guest that chose warm reboots itself (`reboot=w...`) is not asked, and
//! its resets are plain reboots.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The BIOS data area's reset flag.
const RESET_FLAG: GuestAddress = GuestAddress(0x472);
const WARM: u16 = 0x1234;

/// The option to add to the kernel command line, unless the user's own
/// `reboot=` options already choose a reboot mode for panics or a warm
/// mode for every reboot.
pub fn cmdline_option(cmdline: &str) -> Option<&'static str> {
    let chosen = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("reboot="))
        .flat_map(|v| v.split(','))
        .any(|o| o.starts_with("panic_") || o.starts_with('w'));
    (!chosen).then_some("reboot=panic_warm")
}

/// After a reset: whether it was the kernel's reboot after a panic.
pub fn panicked(mem: &GuestMemoryMmap) -> bool {
    mem.read_obj::<u16>(RESET_FLAG).ok() == Some(WARM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_unless_the_user_chose() {
        assert_eq!(
            cmdline_option("console=ttyS0 reboot=k panic=1"),
            Some("reboot=panic_warm")
        );
        assert_eq!(cmdline_option("reboot=k,panic_cold"), None);
        assert_eq!(cmdline_option("reboot=warm"), None);
        assert_eq!(cmdline_option("reboot=t reboot=w"), None);
    }

    #[test]
    fn reads_the_reset_flag() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(!panicked(&mem));
        mem.write_obj(WARM, RESET_FLAG).unwrap();
        assert!(panicked(&mem));
    }
}
