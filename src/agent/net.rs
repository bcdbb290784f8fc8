//! The guest's network, set up with the classic socket ioctls (no netlink,
//! no tools from the image): `lo` up in every run; with a
//! [`NetworkSpec`], the interface with its MAC up with its address, the
//! default route through its gateway, and the root's `/etc/resolv.conf`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::Error;
use crate::protocol::NetworkSpec;

/// `struct rtentry` (linux/route.h), which the libc crate has not for
/// glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// linux/route.h: the route is usable, and goes through a gateway.
const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;

fn setup(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Setup {
        what: what.to_string(),
        source,
    }
}

/// An IPv4 datagram socket: what the interface ioctls are made on.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: ifreq is plain data (arrays and a union of integers,
    // sockaddrs and a pointer); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(req)
}

/// `addr` as a `sockaddr` laid out as a `sockaddr_in`: family, port 0,
/// the address in network order.
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data = [0 as libc::c_char; 14];
    for (dst, src) in sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    libc::sockaddr {
        sa_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sa_data,
    }
}

/// An ioctl on `sock` with `arg`.
fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one `T` (an ifreq or
    // an rtentry), which `arg` is and which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, std::ptr::from_mut(arg)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets IFF_UP on interface `name`.
fn up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    req.ifr_ifru.ifru_flags = flags | up;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// `lo` up: every run has a loopback (servers on localhost, tests).
pub fn loopback() -> Result<(), Error> {
    let sock = inet_socket().map_err(setup("opening a socket for lo"))?;
    up(&sock, "lo").map_err(setup("bringing lo up"))
}

/// The interface whose MAC is `mac`, from /sys/class/net.
fn find_interface(mac: &[u8; 6]) -> Option<String> {
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(&want))
        })
        .and_then(|e| e.file_name().into_string().ok())
}

/// The interface `spec` names, up, with its address and the default route.
/// Run before entering the image's root (it needs /sys).
pub fn configure(spec: &NetworkSpec) -> Result<(), Error> {
    let name = find_interface(&spec.mac).ok_or_else(|| {
        Error::User(format!(
            "no network interface with the MAC address {:02x?}",
            spec.mac
        ))
    })?;
    let sock = inet_socket().map_err(setup("opening a socket for the network"))?;
    let what = |w: &str| format!("{w} of {name}");
    let mut req = ifreq(&name).map_err(setup("naming the interface"))?;
    req.ifr_ifru.ifru_addr = sockaddr(spec.address);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req).map_err(setup(&what("setting the address")))?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(spec.prefix_len.min(32)))
        .unwrap_or(0);
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req).map_err(setup(&what("setting the netmask")))?;
    up(&sock, &name).map_err(setup(&what("bringing up")))?;
    let any = sockaddr(Ipv4Addr::UNSPECIFIED);
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: sockaddr(spec.gateway),
        rt_genmask: any,
        rt_flags: RTF_UP | RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(&sock, libc::SIOCADDRT, &mut route).map_err(setup(&format!(
        "adding the default route through {}",
        spec.gateway
    )))
}

/// The root's `/etc/resolv.conf` (in the overlay: the image is untouched),
/// replacing whatever the image has there, a symlink included.
pub fn resolv_conf(root: &Path, spec: &NetworkSpec) -> Result<(), Error> {
    if spec.dns.is_empty() {
        return Ok(());
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(setup("creating /etc"))?;
    let path = etc.join("resolv.conf");
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(setup("replacing /etc/resolv.conf")(e)),
    }
    let text: String = spec
        .dns
        .iter()
        .map(|a| format!("nameserver {a}\n"))
        .collect();
    std::fs::write(&path, format!("# written by kiln\n{text}"))
        .map_err(setup("writing /etc/resolv.conf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_replaces_a_symlink_and_keeps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let target = root.join("stub.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        std::os::unix::fs::symlink(&target, root.join("etc/resolv.conf")).unwrap();
        let spec = NetworkSpec {
            mac: [2, 0, 0, 0, 0, 1],
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
        };
        resolv_conf(root, &spec).unwrap();
        let written = std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap();
        assert!(written.ends_with("nameserver 10.0.2.3\n"), "{written}");
        assert!(!root.join("etc/resolv.conf").is_symlink());
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }

    #[test]
    fn sockaddrs_hold_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        let data: Vec<u8> = sa.sa_data.iter().map(|&c| c.to_ne_bytes()[0]).collect();
        assert_eq!(&data[2..6], &[10, 0, 2, 15]);
    }
}
