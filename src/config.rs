//! The VM configuration: Firecracker's JSON schema.
