use super::*;

fn all_messages() -> Vec<Msg> {
    vec![
        Msg::AgentHello {
            version: VERSION,
            started_ms: 28_000,
            hello_ms: 28_100,
        },
        Msg::Started,
        Msg::Stdout(b"out".to_vec()),
        Msg::Stderr(vec![0, 255, 10]),
        Msg::StdinConsumed { bytes: 4096 },
        Msg::Exited(ExitStatus::Code(42)),
        Msg::Exited(ExitStatus::Signal(9)),
        Msg::Failed {
            code: 127,
            message: "nope: not found".into(),
        },
        Msg::HostHello { version: VERSION },
        Msg::Exec(Box::new(ExecSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=1".into()],
            cwd: "/src".into(),
            user: Some("1000:1000".into()),
            hostname: "kiln".into(),
            tty: true,
            winsize: Some((24, 80)),
            stdin: true,
            mounts: vec![Mount {
                tag: "m0".into(),
                path: "/src".into(),
                read_only: true,
            }],
        })),
        Msg::Stdin(vec![1; MAX_DATA]),
        Msg::StdinEof,
        Msg::Signal { signo: 15 },
        Msg::Resize {
            rows: 50,
            cols: 132,
        },
        Msg::Ready,
        Msg::Prepare {
            root_device: "/dev/vda".into(),
            warm_up: true,
        },
        Msg::Prepare {
            root_device: "/dev/vdb".into(),
            warm_up: false,
        },
        Msg::Resume {
            unix_ns: 1_795_000_000_123_456_789,
            entropy: vec![0xa5; ENTROPY_MAX],
        },
        Msg::Network(Box::new(NetworkSpec {
            mac: [2, 0x4b, 0x49, 0x4c, 0x4e, 0],
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.2.2".parse().unwrap(),
            dns: vec!["10.0.2.3".parse().unwrap()],
        })),
    ]
}

#[test]
fn every_message_round_trips_through_both_readers() {
    let mut stream = Vec::new();
    for m in all_messages() {
        write_msg(&mut stream, &m).unwrap();
    }
    // Blocking reader.
    let mut r = stream.as_slice();
    for m in all_messages() {
        assert_eq!(read_msg(&mut r).unwrap(), Some(m));
    }
    assert_eq!(read_msg(&mut r).unwrap(), None);
    // Incremental decoder, fed a byte at a time and in odd chunks.
    for chunk in [1usize, 3, 7, 4096] {
        let mut d = Decoder::default();
        let mut got = Vec::new();
        let mut rest = stream.as_slice();
        while !rest.is_empty() {
            let n = d.wants().min(chunk).min(rest.len());
            d.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(m) = d.next_msg().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all_messages(), "chunk {chunk}");
    }
}

#[test]
fn hostile_frames_are_errors() {
    let frame = |len: u32, kind: u8, payload: &[u8]| {
        let mut f = len.to_le_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(payload);
        f
    };
    let cases: Vec<Vec<u8>> = vec![
        0u32.to_le_bytes().to_vec(),
        frame(MAX_FRAME + 1, 3, b""),
        frame(u32::MAX, 3, b""),
        frame(1, 99, b""),
        frame(1, 0, b""),
        frame(3, 1, b"ab"),                   // Hello too short
        frame(2, 2, b"x"),                    // Started with a payload
        frame(1, 3, b""),                     // empty Stdout
        frame(3, 6, b"\x02a"),                // Exited bad tag / short
        frame(6, 6, b"\x00\xff\xff\xff\xff"), // exit code past i32: 0xffffffff is -1 as i32? no: u32 > i32::MAX
        frame(1, 7, b""),                     // Failed without a code
        frame(4, 17, b"{x}"),                 // Exec not JSON
        frame(3, 21, b"ab"),                  // Resize short
        frame(2, 8, b"x"),                    // Ready with a payload
        frame(1, 22, b""),                    // Prepare without flags
        frame(2, 22, b"\x01"),                // Prepare without a device
        frame(4, 22, b"\x02/a"),              // Prepare, unknown flag
        frame(4, 22, b"\x00\xff\xfe"),        // Prepare not UTF-8
        frame(8, 23, b"1234567"),             // Resume without a full time
        frame(2 + 257, 22, &[b'a'; 258]),     // Prepare, device name too long
        frame(9 + 31, 23, &[0; 8 + 31]),      // Resume, too little entropy
        frame(9 + 257, 23, &[0; 8 + 257]),    // Resume, too much entropy
        frame(3, 24, b"{}"),                  // Network without fields
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let mut r = bytes.as_slice();
        assert!(read_msg(&mut r).is_err(), "case {i}");
        let mut d = Decoder::default();
        d.push(bytes);
        assert!(d.next_msg().is_err() || d.wants() > 0, "case {i}");
    }
    // A Network with a prefix length past 32, no prefix, more name servers
    // than the C library reads, a field this version does not know.
    let net = |prefix: u8, dns: usize, extra: &str| {
        format!(
            r#"{{"mac":[2,0,0,0,0,1],"address":"10.0.2.15","prefix_len":{prefix},"gateway":"10.0.2.2","dns":[{}]{extra}}}"#,
            vec![r#""10.0.2.3""#; dns].join(",")
        )
    };
    assert!(Msg::decode(24, net(24, 3, "").as_bytes()).is_ok());
    for bad in [
        net(33, 1, ""),
        net(0, 1, ""),
        net(24, 4, ""),
        net(24, 1, r#","x":1"#),
    ] {
        assert!(Msg::decode(24, bad.as_bytes()).is_err(), "{bad}");
    }
    // An Exec with a field this version does not know.
    let p = br#"{"argv":[],"env":[],"cwd":"/","user":null,"hostname":"h","tty":false,"winsize":null,"stdin":false,"mounts":[],"extra":1}"#;
    assert!(Msg::decode(17, p).is_err());
    // A frame cut short is an error, not a clean end.
    let mut cut = Msg::Stdout(b"abcdef".to_vec()).encode();
    cut.truncate(7);
    assert!(read_msg(&mut cut.as_slice()).is_err());
}

#[test]
fn random_bytes_never_panic() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = usize::try_from(x % 64).unwrap();
        let bytes: Vec<u8> = (0..n)
            .map(|i| x.rotate_left(u32::try_from(i % 64).unwrap()).to_le_bytes()[0])
            .collect();
        let _ = read_msg(&mut bytes.as_slice());
        let kind = bytes.first().copied().unwrap_or(0);
        let _ = Msg::decode(kind, bytes.get(1..).unwrap_or(&[]));
    }
}

/// A Hello from another version is reported as that version, whatever
/// follows its version field; this version's Hello must be whole.
#[test]
fn hello_of_another_version() {
    let other = Msg::decode(kind::AGENT_HELLO, &7u32.to_le_bytes()).unwrap();
    assert!(matches!(other, Msg::AgentHello { version: 7, .. }));
    assert!(Msg::decode(kind::AGENT_HELLO, &VERSION.to_le_bytes()).is_err());
    assert!(Msg::decode(kind::AGENT_HELLO, &[1, 0]).is_err());
}
