//! The `virtio_net_hdr` in front of every frame (virtio 1.2 §5.1.6): what
//! a guest may send given the features it accepted (§5.1.6.2), and what
//! it may be given (§5.1.6.4). Pure functions over the header's bytes.

use super::backend::VNET_HDR_LEN;
use super::tap;
use super::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

/// §5.1.6: `flags` bits of `virtio_net_hdr`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;
/// §5.1.6: `gso_type`: not to be segmented, TCPv4, TCPv6.
pub const HDR_GSO_NONE: u8 = 0;
pub const HDR_GSO_TCPV4: u8 = 1;
pub const HDR_GSO_TCPV6: u8 = 4;
/// §5.1.6: offset of `num_buffers` in the header.
pub const HDR_NUM_BUFFERS: usize = 10;

/// What [`check_tx_header`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum TxCheck {
    Ok,
    /// An unsegmented frame longer than the MTU allows.
    Oversized,
    /// A header the driver may not send with the features it accepted.
    Bad(&'static str),
}

/// The little-endian u16 at `at` of a header (`b` is at least a header
/// long: the callers check).
fn le16(b: &[u8], at: usize) -> usize {
    match b.get(at..at + 2) {
        Some(&[lo, hi]) => usize::from(u16::from_le_bytes([lo, hi])),
        _ => usize::MAX,
    }
}

/// Checks the header of `frame` (header included, at least header and
/// Ethernet header long) against §5.1.6.2 and the accepted features
/// `acked`; `max_frame` is the longest unsegmented frame.
pub fn check_tx_header(frame: &[u8], acked: u64, max_frame: usize) -> TxCheck {
    if frame.len() < VNET_HDR_LEN {
        return TxCheck::Bad("shorter than the header");
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    let body = frame.len() - VNET_HDR_LEN;
    // The driver never sets DATA_VALID or RSC_INFO.
    if flags & !HDR_F_NEEDS_CSUM != 0 {
        return TxCheck::Bad("flags other than NEEDS_CSUM");
    }
    let needs_csum = flags & HDR_F_NEEDS_CSUM != 0;
    if needs_csum {
        if acked & VIRTIO_NET_F_CSUM == 0 {
            return TxCheck::Bad("NEEDS_CSUM without VIRTIO_NET_F_CSUM");
        }
        // The 16-bit checksum is written at csum_start + csum_offset.
        if le16(frame, 6)
            .saturating_add(le16(frame, 8))
            .saturating_add(2)
            > body
        {
            return TxCheck::Bad("checksum outside the frame");
        }
    }
    let allowed = match gso_type {
        HDR_GSO_NONE => {
            return if body > max_frame {
                TxCheck::Oversized
            } else {
                TxCheck::Ok
            };
        }
        HDR_GSO_TCPV4 => acked & VIRTIO_NET_F_HOST_TSO4 != 0,
        HDR_GSO_TCPV6 => acked & VIRTIO_NET_F_HOST_TSO6 != 0,
        _ => false,
    };
    if !allowed {
        return TxCheck::Bad("a GSO type not negotiated");
    }
    // §5.1.6.2: segmentation needs the checksum offload, and a size.
    if !needs_csum || le16(frame, 4) == 0 {
        return TxCheck::Bad("GSO without NEEDS_CSUM or gso_size");
    }
    TxCheck::Ok
}

/// The 16-bit ones'-complement sum of `data` as big-endian words (RFC
/// 1071), an odd last byte padded with zero.
pub(super) fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(0xffff)
}

/// Does what a device taking `VIRTIO_NET_F_CSUM` owes a frame with
/// NEEDS_CSUM (§5.1.6.2) when its backend cannot: the checksum over
/// `csum_start` to the end of the frame (the driver left the pseudo-header
/// sum in the field) stored at `csum_start + csum_offset`; then the header
/// asks for nothing more. `frame` has its header first and passed
/// [`check_tx_header`]; a frame without NEEDS_CSUM is left as it is.
pub fn complete_checksum(frame: &mut [u8]) -> Result<(), &'static str> {
    if frame.len() < VNET_HDR_LEN || frame[0] & HDR_F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = VNET_HDR_LEN.saturating_add(le16(frame, 6));
    let at = start.saturating_add(le16(frame, 8));
    if at.saturating_add(2) > frame.len() {
        return Err("checksum outside the frame");
    }
    let sum = !ones_complement_sum(&frame[start..]);
    // A computed 0 is sent as its other form (UDP reads 0 as "none").
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame[0] &= !HDR_F_NEEDS_CSUM;
    frame[6..10].fill(0);
    Ok(())
}

/// The tap offloads (`TUN_F_*`) matching what the guest accepts.
pub fn tun_offloads(acked: u64) -> u32 {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        // TSO without checksum offload is not a thing (the tap refuses it).
        return 0;
    }
    let mut flags = tap::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        flags |= tap::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        flags |= tap::TUN_F_TSO6;
    }
    flags
}

/// Makes the header of a frame from the backend one the guest may get
/// (§5.1.6.4) given the features it accepted, or says why it cannot.
pub fn fix_rx_header(frame: &mut [u8], acked: u64) -> Result<(), &'static str> {
    if frame.len() < VNET_HDR_LEN {
        return Err("shorter than the header");
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    if flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
        return Err("unknown flags");
    }
    let allowed = match gso_type {
        HDR_GSO_NONE => true,
        HDR_GSO_TCPV4 => acked & VIRTIO_NET_F_GUEST_TSO4 != 0,
        HDR_GSO_TCPV6 => acked & VIRTIO_NET_F_GUEST_TSO6 != 0,
        _ => false,
    };
    if !allowed {
        return Err("a GSO type the guest did not accept");
    }
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        // The tap marks frames it checked DATA_VALID; without GUEST_CSUM
        // flags must be 0 (the guest checks for itself). A partial
        // checksum cannot be handed over.
        if flags & HDR_F_NEEDS_CSUM != 0 {
            return Err("a partial checksum the guest did not accept");
        }
        frame[..VNET_HDR_LEN].fill(0);
    } else if flags & HDR_F_NEEDS_CSUM != 0 {
        let body = frame.len() - VNET_HDR_LEN;
        if le16(frame, 6)
            .saturating_add(le16(frame, 8))
            .saturating_add(2)
            > body
        {
            return Err("checksum outside the frame");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_checksums_verify() {
        // IPv4/UDP-like: 12-byte header, then a body whose checksum field
        // (at 6..8 of the body's "transport" part) holds a seed value.
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame[0] = HDR_F_NEEDS_CSUM;
        let body: Vec<u8> = (0..101u8).map(|i| i.wrapping_mul(37)).collect();
        frame.extend_from_slice(&body);
        let (start, offset) = (20usize, 6usize);
        frame[6..8].copy_from_slice(&u16::try_from(start).unwrap().to_le_bytes());
        frame[8..10].copy_from_slice(&u16::try_from(offset).unwrap().to_le_bytes());
        let seed = [0x12, 0x34];
        let at = VNET_HDR_LEN + start + offset;
        frame[at..at + 2].copy_from_slice(&seed);
        complete_checksum(&mut frame).unwrap();
        // As a receiver checks it: the range (the checksum in place of the
        // seed) plus the seed (the pseudo-header's sum) is all ones.
        // (The range is 81 bytes: an odd one, padded.)
        let sum = u32::from(ones_complement_sum(&frame[VNET_HDR_LEN + start..]))
            + u32::from(u16::from_be_bytes(seed));
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
        assert_eq!(frame[0] & HDR_F_NEEDS_CSUM, 0);
        assert_eq!(&frame[6..10], &[0, 0, 0, 0]);
        // Without NEEDS_CSUM nothing changes; outside the frame is refused.
        let before = frame.clone();
        complete_checksum(&mut frame).unwrap();
        assert_eq!(frame, before);
        frame[0] = HDR_F_NEEDS_CSUM;
        frame[6..8].copy_from_slice(&200u16.to_le_bytes());
        assert!(complete_checksum(&mut frame).is_err());
    }

    #[test]
    fn ones_complement_sum_folds_and_pads() {
        assert_eq!(ones_complement_sum(&[]), 0);
        assert_eq!(ones_complement_sum(&[0xff, 0xff, 0x00, 0x01]), 0x0001);
        assert_eq!(ones_complement_sum(&[0x01]), 0x0100);
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn short_headers_are_refused_not_indexed() {
        for len in 0..VNET_HDR_LEN {
            let mut b = vec![0u8; len];
            assert!(matches!(
                check_tx_header(&b, u64::MAX, 1500),
                TxCheck::Bad(_)
            ));
            assert!(fix_rx_header(&mut b, u64::MAX).is_err());
        }
    }
}
