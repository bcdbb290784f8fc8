//! virtio-mmio transport tests.
