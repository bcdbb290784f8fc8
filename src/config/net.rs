//! `network-interfaces`: virtio-net devices on host tap devices, as in
//! Firecracker (an existing tap, opened by name), or on a passt process kiln
//! starts (`passt`, kiln's own).

use std::net::Ipv4Addr;

use super::{Error, NetworkInterfaceConfig, PasstConfig};

/// Longest interface name Linux takes (`IFNAMSIZ` minus the NUL).
pub const MAX_HOST_DEV_NAME: usize = 15;

/// Smallest MTU kiln announces: IPv4's minimum (RFC 791).
pub const MIN_MTU: u16 = 68;

/// passt's largest (and default) MTU: the largest IPv4 packet less an
/// Ethernet header, rounded down to 32-bit words.
pub const PASST_MAX_MTU: u16 = 65520;

/// Parses `"06:00:AC:10:00:02"`: six two-digit hex octets, colon-separated.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        // from_str_radix would take a sign ("+6").
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Why `name` cannot name a network interface (Linux's `dev_valid_name`).
fn bad_dev_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_HOST_DEV_NAME {
        Some("must be 1 to 15 bytes")
    } else if name == "." || name == ".." {
        Some("is not an interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("must not contain '/', ':', NUL or white space")
    } else {
        None
    }
}

/// Checks passt's addresses: the guest's, in its subnet with the gateway and
/// apart from it and the DNS address. Returns the field and what is wrong.
fn check_passt(p: &PasstConfig) -> Result<(), (&'static str, String)> {
    let prefix = p.prefix_len();
    if !(8..=30).contains(&prefix) {
        return Err(("prefix_len", format!("must be 8 to 30, got {prefix}")));
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    let net = |a: Ipv4Addr| u32::from(a) & mask;
    let (address, gateway, dns) = (p.address(), p.gateway(), p.dns());
    let usable = |a: Ipv4Addr| {
        !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
    };
    for (field, a) in [("address", address), ("gateway", gateway), ("dns", dns)] {
        if !usable(a) {
            return Err((field, format!("{a} cannot be used here")));
        }
    }
    let host = u32::from(address) & !mask;
    if host == 0 || host == !mask {
        return Err((
            "address",
            format!("{address} is its subnet's network or broadcast address"),
        ));
    }
    if net(gateway) != net(address) {
        return Err(("gateway", format!("{gateway} is not in {address}/{prefix}")));
    }
    if gateway == address {
        return Err(("gateway", format!("{gateway} is the guest's own address")));
    }
    if dns == address {
        return Err(("dns", format!("{dns} is the guest's own address")));
    }
    Ok(())
}

/// Checks every entry: ids non-empty and unique, tap names valid and
/// unique, MACs well-formed unicast addresses and unique, MTUs in range.
pub fn check(ifaces: &[NetworkInterfaceConfig]) -> Result<(), Error> {
    for (index, iface) in ifaces.iter().enumerate() {
        let bad = |field: &str, reason: String| Error::NetInterface {
            field: format!(
                "network-interfaces[{index}].{field} (iface_id {:?})",
                iface.iface_id
            ),
            reason,
        };
        let earlier = &ifaces[..index];
        if iface.iface_id.is_empty() {
            return Err(bad("iface_id", "must not be empty".into()));
        }
        if let Some(first) = earlier.iter().position(|o| o.iface_id == iface.iface_id) {
            return Err(bad(
                "iface_id",
                format!("is already used by network-interfaces[{first}]"),
            ));
        }
        match (&iface.host_dev_name, &iface.passt) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "passt",
                    "give either host_dev_name (a tap) or passt, not both".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "host_dev_name",
                    "is missing: name the host's tap, or ask for \"passt\": {}".into(),
                ))
            }
            (None, Some(passt)) => check_passt(passt)
                .map_err(|(field, reason)| bad(&format!("passt.{field}"), reason))?,
            (Some(name), None) => {
                if let Some(reason) = bad_dev_name(name) {
                    return Err(bad("host_dev_name", format!("{name:?} {reason}")));
                }
                let same = |o: &NetworkInterfaceConfig| o.host_dev_name.as_ref() == Some(name);
                if let Some(first) = earlier.iter().position(same) {
                    return Err(bad(
                        "host_dev_name",
                        format!("{name:?} is already used by network-interfaces[{first}]"),
                    ));
                }
            }
        }
        if let Some(text) = &iface.guest_mac {
            let Some(mac) = parse_mac(text) else {
                return Err(bad(
                    "guest_mac",
                    format!("{text:?} is not a MAC address like \"06:00:AC:10:00:02\""),
                ));
            };
            // Bit 0 of the first octet: a group address.
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(bad(
                    "guest_mac",
                    format!("{text:?} is not a unicast address"),
                ));
            }
            let same = |o: &NetworkInterfaceConfig| {
                o.guest_mac.as_deref().and_then(parse_mac) == Some(mac)
            };
            if let Some(first) = earlier.iter().position(same) {
                return Err(bad(
                    "guest_mac",
                    format!("{text:?} is already used by network-interfaces[{first}]"),
                ));
            }
        }
        if let Some(mtu) = iface.mtu {
            let max = if iface.passt.is_some() {
                PASST_MAX_MTU
            } else {
                u16::MAX
            };
            if !(MIN_MTU..=max).contains(&mtu) {
                return Err(bad(
                    "mtu",
                    format!("must be between {MIN_MTU} and {max}, got {mtu}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{err_of, from_value, set, Files};
    use super::parse_mac;

    fn with_net(files: &Files, net: serde_json::Value) -> serde_json::Value {
        set(files.minimal(), "network-interfaces", "", net)
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "",
            "06:00:AC:10:00",
            "06:00:AC:10:00:02:03",
            "6:00:AC:10:00:02",
            "0g:00:00:00:00:00",
            "06-00-AC-10-00-02",
            "+6:00:AC:10:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn interfaces_load_and_are_checked() {
        let files = Files::new();
        let ok = with_net(
            &files,
            json!([
                { "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02",
                  "rx_rate_limiter": { "bandwidth": { "size": 1, "refill_time": 1 } } },
                { "iface_id": "eth1", "host_dev_name": "tap1", "mtu": 9000 }
            ]),
        );
        let config = from_value(&ok).unwrap();
        assert_eq!(config.network_interfaces.len(), 2);
        let cases = [
            (
                json!([{ "iface_id": "", "host_dev_name": "tap0" }]),
                "network-interfaces[0].iface_id (iface_id \"\"): must not be empty",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0" },
                       { "iface_id": "a", "host_dev_name": "tap1" }]),
                "network-interfaces[1].iface_id (iface_id \"a\"): is already used by network-interfaces[0]",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "" }]),
                "network-interfaces[0].host_dev_name (iface_id \"a\"): \"\" must be 1 to 15 bytes",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "a-very-long-name" }]),
                "network-interfaces[0].host_dev_name (iface_id \"a\"): \"a-very-long-name\" must be 1 to 15 bytes",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "../tap" }]),
                "network-interfaces[0].host_dev_name (iface_id \"a\"): \"../tap\" must not contain '/', ':', NUL or white space",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0" },
                       { "iface_id": "b", "host_dev_name": "tap0" }]),
                "network-interfaces[1].host_dev_name (iface_id \"b\"): \"tap0\" is already used by network-interfaces[0]",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0", "guest_mac": "06:00:AC" }]),
                "network-interfaces[0].guest_mac (iface_id \"a\"): \"06:00:AC\" is not a MAC address like \"06:00:AC:10:00:02\"",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01" }]),
                "network-interfaces[0].guest_mac (iface_id \"a\"): \"01:00:5e:00:00:01\" is not a unicast address",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01" },
                       { "iface_id": "b", "host_dev_name": "tap1", "guest_mac": "06:00:00:00:00:01" }]),
                "network-interfaces[1].guest_mac (iface_id \"b\"): \"06:00:00:00:00:01\" is already used by network-interfaces[0]",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0", "mtu": 67 }]),
                "network-interfaces[0].mtu (iface_id \"a\"): must be between 68 and 65535, got 67",
            ),
        ];
        for (net, want) in cases {
            assert_eq!(err_of(&with_net(&files, net)), want);
        }
        let typo = with_net(&files, json!([{ "iface_id": "a", "host_dev": "tap0" }]));
        assert!(
            err_of(&typo).contains("unknown field `host_dev`"),
            "{}",
            err_of(&typo)
        );
    }

    #[test]
    fn passt_interfaces_load_and_are_checked() {
        let files = Files::new();
        let ok = with_net(
            &files,
            json!([
                { "iface_id": "eth0", "passt": {} },
                { "iface_id": "eth1", "passt": { "address": "192.168.7.2", "prefix_len": 28,
                  "gateway": "192.168.7.1", "dns": "192.168.7.1" }, "mtu": 65520 }
            ]),
        );
        let config = from_value(&ok).unwrap();
        let p = config.network_interfaces[0].passt.clone().unwrap();
        assert_eq!(p.address().to_string(), "10.0.2.15");
        assert_eq!(p.gateway().to_string(), "10.0.2.2");
        assert_eq!(p.dns().to_string(), "10.0.2.3");
        assert_eq!(p.prefix_len(), 24);
        let cases = [
            (
                json!([{ "iface_id": "a" }]),
                "network-interfaces[0].host_dev_name (iface_id \"a\"): is missing: name the host's tap, or ask for \"passt\": {}",
            ),
            (
                json!([{ "iface_id": "a", "host_dev_name": "tap0", "passt": {} }]),
                "network-interfaces[0].passt (iface_id \"a\"): give either host_dev_name (a tap) or passt, not both",
            ),
            (
                json!([{ "iface_id": "a", "passt": { "prefix_len": 31 } }]),
                "network-interfaces[0].passt.prefix_len (iface_id \"a\"): must be 8 to 30, got 31",
            ),
            (
                json!([{ "iface_id": "a", "passt": { "gateway": "10.0.3.1" } }]),
                "network-interfaces[0].passt.gateway (iface_id \"a\"): 10.0.3.1 is not in 10.0.2.15/24",
            ),
            (
                json!([{ "iface_id": "a", "passt": { "gateway": "10.0.2.15" } }]),
                "network-interfaces[0].passt.gateway (iface_id \"a\"): 10.0.2.15 is the guest's own address",
            ),
            (
                json!([{ "iface_id": "a", "passt": { "address": "10.0.2.0" } }]),
                "network-interfaces[0].passt.address (iface_id \"a\"): 10.0.2.0 is its subnet's network or broadcast address",
            ),
            (
                json!([{ "iface_id": "a", "passt": { "dns": "127.0.0.53" } }]),
                "network-interfaces[0].passt.dns (iface_id \"a\"): 127.0.0.53 cannot be used here",
            ),
            (
                json!([{ "iface_id": "a", "passt": {}, "mtu": 65535 }]),
                "network-interfaces[0].mtu (iface_id \"a\"): must be between 68 and 65520, got 65535",
            ),
        ];
        for (net, want) in cases {
            assert_eq!(err_of(&with_net(&files, net)), want);
        }
        let typo = with_net(
            &files,
            json!([{ "iface_id": "a", "passt": { "adress": "10.0.2.9" } }]),
        );
        assert!(
            err_of(&typo).contains("unknown field `adress`"),
            "{}",
            err_of(&typo)
        );
        let bad = with_net(
            &files,
            json!([{ "iface_id": "a", "passt": { "address": "10.0.2" } }]),
        );
        assert!(
            err_of(&bad).contains("invalid IPv4 address"),
            "{}",
            err_of(&bad)
        );
    }
}
