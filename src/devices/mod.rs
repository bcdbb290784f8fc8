//! Emulated devices. Each is reached by the guest through [`bus::BusDevice`].

pub mod bus;
pub mod legacy;
pub mod virtio;
