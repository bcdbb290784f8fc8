//! What `kiln run --image` accepts, made into an ext4 file the VM attaches.

pub mod busybox;
