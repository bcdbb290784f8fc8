//! How the VM ends: the first reason reported wins, and the event loop is
//! woken to tear the VM down.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::devices::bus::lock;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042, triple fault or KVM system event).
    Reset,
    /// The guest's kernel panicked (and then reset the machine).
    GuestPanic,
    /// The guest powered off.
    PowerOff,
    /// kiln was asked to stop (SIGTERM, SIGINT).
    Stopped(String),
    /// The guest did something kiln cannot continue from; the message says what.
    GuestError(String),
    /// kiln itself failed.
    VmmError(String),
}

impl ExitReason {
    /// Process exit code: 0 when the guest shut itself down.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::PowerOff => 0,
            ExitReason::Stopped(_) => 130,
            ExitReason::GuestError(_) => 2,
            ExitReason::GuestPanic => 3,
            ExitReason::VmmError(_) => 1,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest rebooted"),
            ExitReason::GuestPanic => write!(f, "the guest kernel panicked"),
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::Stopped(why) => write!(f, "stopped: {why}"),
            ExitReason::GuestError(why) => write!(f, "guest error: {why}"),
            ExitReason::VmmError(why) => write!(f, "error: {why}"),
        }
    }
}

/// Shared between vCPU threads, devices and the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the loop.
    pub fn report(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            log::debug!("VM exit: {reason:?}");
            *r = Some(reason);
        }
        drop(r);
        // A failed write only means the counter is saturated: already woken.
        let _ = self.evt.write(1);
    }

    /// Replaces a recorded reset with what it turned out to be (the
    /// kernel's reboot after a panic).
    pub fn reset_was(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if *r == Some(ExitReason::Reset) {
            *r = Some(reason);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// The fd the event loop waits on.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.report(ExitReason::Reset);
        s.report(ExitReason::GuestError("x".into()));
        assert_eq!(s.reason(), Some(ExitReason::Reset));
        assert_eq!(s.event().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::GuestPanic.exit_code(), 3);
        assert_ne!(ExitReason::GuestError(String::new()).exit_code(), 0);
        assert_ne!(ExitReason::VmmError(String::new()).exit_code(), 0);
    }
}
