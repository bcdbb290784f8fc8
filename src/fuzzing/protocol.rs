//! The `kiln run` agent protocol: one message payload for
//! [`Msg::decode`], and a byte stream read frame by frame both ways kiln
//! reads it: blocking ([`read_msg`]) and incremental ([`Decoder`], fed in
//! chunks of the fuzzer's sizes). Both readers must see the same
//! messages and fail at the same frame, and every message that decodes
//! must survive encoding: `decode(encode(m)) == m`.
//!
//! Input: a flags byte (bit 0: feed the decoder more than it asks for),
//! the chunk sizes (a count, then one byte each; 0 means "what the
//! decoder wants"), a kind byte and a payload for `decode`, then the
//! stream.

use std::io::Cursor;

use super::input::{Input, Seed};
use crate::protocol::{read_msg, Decoder, Error, ExecSpec, ExitStatus, Mount, Msg, VERSION};

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let sizes = input.bytes(64).to_vec();
    let kind = input.u8();
    let payload = input.bytes(usize::MAX);
    if let Ok(m) = Msg::decode(kind, payload) {
        round_trip(&m);
    }
    let stream = input.rest();

    let mut blocking = Vec::new();
    let mut r = Cursor::new(stream);
    loop {
        match read_msg(&mut r) {
            Ok(Some(m)) => blocking.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                blocking.push(Err(e));
                break;
            }
        }
    }

    let mut incremental: Vec<Result<Msg, Error>> = Vec::new();
    let mut dec = Decoder::default();
    let mut rest = stream;
    let mut k = 0usize;
    'feed: while !rest.is_empty() {
        let wanted = dec.wants();
        let size = match sizes.get(k % sizes.len().max(1)).copied().unwrap_or(0) {
            0 => wanted,
            s if flags & 1 != 0 => usize::from(s),
            s => usize::from(s).min(wanted),
        };
        k += 1;
        let (now, later) = rest.split_at(size.clamp(1, rest.len()));
        rest = later;
        dec.push(now);
        loop {
            match dec.next_msg() {
                Ok(Some(m)) => incremental.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    incremental.push(Err(e));
                    break 'feed;
                }
            }
        }
    }
    // A stream that ends inside a frame: the blocking reader says so (its
    // only I/O error on a byte slice); the decoder waits for the rest.
    if matches!(blocking.last(), Some(Err(Error::Io(_))))
        && !matches!(incremental.last(), Some(Err(_)))
    {
        blocking.pop();
    }

    assert_eq!(
        blocking.len(),
        incremental.len(),
        "read_msg and Decoder read {} and {} frames",
        blocking.len(),
        incremental.len()
    );
    for (i, (a, b)) in blocking.iter().zip(&incremental).enumerate() {
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "frame {i} read differently");
                round_trip(a);
            }
            (Err(a), Err(b)) => assert_eq!(
                a.to_string(),
                b.to_string(),
                "frame {i} refused differently"
            ),
            _ => panic!("frame {i}: read_msg gave {a:?}, Decoder {b:?}"),
        }
    }
}

/// `decode(encode(m)) == m`, and the frame's length says its size.
fn round_trip(m: &Msg) {
    let frame = m.encode();
    assert!(frame.len() >= 5, "a frame of {} bytes", frame.len());
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
    assert_eq!(usize::try_from(len).ok(), Some(frame.len() - 4));
    match Msg::decode(frame[4], &frame[5..]) {
        Ok(back) => assert_eq!(&back, m, "the message changed through encode and decode"),
        Err(e) => panic!("{m:?} encodes to a frame that does not decode: {e}"),
    }
}

/// The seed corpus: every message as a frame, a conversation in one
/// stream, and broken frames.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let all = vec![
        Msg::AgentHello {
            version: VERSION,
            started_ms: 28_000,
            hello_ms: 28_100,
        },
        Msg::Started,
        Msg::Stdout(b"out\n".to_vec()),
        Msg::Stderr(vec![0, 255, 10]),
        Msg::StdinConsumed { bytes: 4096 },
        Msg::Exited(ExitStatus::Code(42)),
        Msg::Exited(ExitStatus::Signal(9)),
        Msg::Failed {
            code: 127,
            message: "nope: not found".into(),
        },
        Msg::Ready,
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
        Msg::Stdin(b"input".to_vec()),
        Msg::StdinEof,
        Msg::Signal { signo: 15 },
        Msg::Resize {
            rows: 50,
            cols: 132,
        },
        Msg::Prepare {
            root_device: "/dev/vda".into(),
            warm_up: true,
        },
        Msg::Resume {
            unix_ns: 1_795_000_000_123_456_789,
            entropy: vec![0xa5; 32],
        },
        Msg::Network(Box::new(crate::protocol::NetworkSpec {
            mac: [2, 0x6b, 0x69, 0x6c, 0x6e, 0],
            address: std::net::Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: std::net::Ipv4Addr::new(10, 0, 2, 2),
            dns: vec![std::net::Ipv4Addr::new(10, 0, 2, 3)],
        })),
    ];
    let mut out = Vec::new();
    let mut s = Seed::default();
    for (i, m) in all.iter().enumerate() {
        let f = m.encode();
        s.u8(0).bytes(&[0]).u8(f[4]).bytes(&f[5..]).raw(&f);
        out.push((format!("msg-{i:02}"), s.take()));
    }
    let stream: Vec<u8> = all.iter().flat_map(Msg::encode).collect();
    s.u8(0).bytes(&[1, 3, 0, 7]).u8(0).bytes(b"").raw(&stream);
    out.push(("conversation".into(), s.take()));
    s.u8(1).bytes(&[200]).u8(0).bytes(b"").raw(&stream);
    out.push(("conversation-big-chunks".into(), s.take()));
    // A frame over the limit, an unknown kind, a truncated frame.
    let mut bad = Msg::Started.encode();
    bad.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 3]);
    s.u8(0).bytes(&[2]).u8(99).bytes(b"x").raw(&bad);
    out.push(("oversized".into(), s.take()));
    let mut trunc = Msg::Stdout(b"cut short".to_vec()).encode();
    trunc.truncate(9);
    s.u8(0).bytes(&[0]).u8(1).bytes(&[2, 0, 0, 0]).raw(&trunc);
    out.push(("truncated".into(), s.take()));
    out
}
