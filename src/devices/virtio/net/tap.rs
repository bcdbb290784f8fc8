//! [`Tap`]: a virtio-net [`Backend`] on an existing tap device opened by
//! name, as Firecracker does (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): the
//! tap moves each frame behind a `virtio_net_hdr` itself, and takes
//! checksum and segmentation offloads when the host kernel allows.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::backend::{Backend, VNET_HDR_LEN};
use super::Error;

/// linux/if_tun.h: `TUNSETIFF`, `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// linux/if_tun.h: `TUNSETOFFLOAD`, `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// linux/if_tun.h: `TUNSETVNETHDRSZ`, `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// linux/if_tun.h `TUN_F_*`: what the tap may hand us, for TUNSETOFFLOAD.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// An existing tap device, attached to by name.
pub struct Tap {
    file: File,
    offloads: bool,
}

/// `ifreq` for TUNSETIFF: the name and the flags.
fn ifreq(name: &str, flags: libc::c_int) -> Option<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: ifreq is plain old data (arrays and a union of integers,
    // sockaddrs and a pointer); all-zero bytes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).ok()?;
    Some(req)
}

impl Tap {
    /// Attaches to the tap `name` (it must exist, and this process must be
    /// allowed to: CAP_NET_ADMIN, or the tap's `user`/`group`), with frames
    /// behind a 12-byte virtio-net header and no offloads.
    pub fn open(name: &str) -> Result<Self, Error> {
        let tap = |op: &'static str| {
            let name = name.to_string();
            move |source| Error::Tap { name, op, source }
        };
        // TUNSETIFF would make a new tap of a name nobody made (given
        // CAP_NET_ADMIN), which nothing on the host would route to.
        let cname = std::ffi::CString::new(name)
            .map_err(|_| tap("name")(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(tap("find")(io::Error::last_os_error()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(tap("open /dev/net/tun for"))?;
        let mut req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
            .ok_or_else(|| tap("name")(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and
        // which outlives the call; `file` is an open tun fd.
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF, &mut req) } < 0 {
            return Err(tap("attach to")(io::Error::last_os_error()));
        }
        let size = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        if unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(tap("set the virtio-net header size of")(
                io::Error::last_os_error(),
            ));
        }
        let mut t = Self {
            file,
            offloads: false,
        };
        // Offered to the guest only if the tap takes them; off until the
        // guest accepts them.
        t.offloads = t
            .tun_set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok();
        t.tun_set_offload(0).map_err(tap("turn offloads off on"))?;
        Ok(t)
    }

    /// `TUNSETOFFLOAD`: which `TUN_F_*` offloads the tap may hand us.
    fn tun_set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; `file` is a
        // tun fd attached to a tap.
        if unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a frame in one write, or none of it.
        self.file.write(frame).map(|_| ())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn offloads(&self) -> bool {
        self.offloads
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.tun_set_offload(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_names() {
        assert!(ifreq("tap0", libc::IFF_TAP).is_some());
        assert!(ifreq("", libc::IFF_TAP).is_none());
        assert!(ifreq("sixteen-bytes-xx", libc::IFF_TAP).is_none());
        assert!(ifreq("a\0b", libc::IFF_TAP).is_none());
    }

    #[test]
    fn a_missing_tap_is_refused_not_made() {
        let e = Tap::open("kiln-no-such").err().unwrap();
        assert!(e.to_string().contains("\"kiln-no-such\""), "{e}");
        // SAFETY: a NUL-terminated literal.
        assert_eq!(unsafe { libc::if_nametoindex(c"kiln-no-such".as_ptr()) }, 0);
    }
}
