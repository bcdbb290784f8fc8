//! [`Stream`]: a virtio-net [`Backend`] on a connected UNIX stream socket
//! speaking QEMU's stream protocol, as passt does: each Ethernet frame is a
//! 4-byte big-endian length, then the frame, with no `virtio_net_hdr`.
//!
//! Both ways are bounded:
//! - **from the peer**: bytes are read into a fixed buffer and whole frames
//!   handed out from it; nothing more is read while a frame waits for a
//!   guest buffer. A frame longer than the caller's buffer is cut (the
//!   device drops it) and the rest of it skipped.
//! - **to the peer**: a frame the socket takes only part of keeps its rest
//!   (at most one frame) until the socket is writable again; meanwhile
//!   [`Stream::write_frame`] answers `WouldBlock` and the guest's frames wait
//!   in its own transmit queue ([`Backend::backpressure`]).
//!
//! Frames from the peer get a header with `DATA_VALID`: the peer made them
//! from socket data, so their checksums are right (the device clears the
//! flag for a guest that did not accept `VIRTIO_NET_F_GUEST_CSUM`). Frames
//! to the peer must carry no offload: the device completes checksums for
//! backends without offloads.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::backend::{Backend, VNET_HDR_LEN};
use super::header::HDR_F_DATA_VALID;

/// The length prefix of every frame.
const LEN_PREFIX: usize = 4;
/// How much is read from the socket ahead of the guest: several frames of
/// the largest size the device takes.
const READ_AHEAD: usize = 256 * 1024;

/// Who is at the other end, for a failure's explanation.
pub trait Peer: Send {
    /// The peer's last words, if it said any, and whether it ended.
    fn last_words(&mut self) -> Option<String>;
}

pub struct Stream {
    sock: UnixStream,
    /// Bytes read from the socket, `head..tail` not yet handed out.
    inbuf: Vec<u8>,
    head: usize,
    tail: usize,
    /// Bytes of a too-long frame still to skip.
    skip: usize,
    /// The part of a frame the socket has not taken yet.
    pending: Vec<u8>,
    peer: Option<Box<dyn Peer>>,
}

impl Stream {
    /// Uses `sock` (made non-blocking here); `peer` explains failures.
    pub fn new(sock: UnixStream, peer: Option<Box<dyn Peer>>) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            inbuf: vec![0; READ_AHEAD],
            head: 0,
            tail: 0,
            skip: 0,
            pending: Vec::new(),
            peer,
        })
    }

    /// Reads more from the socket into `inbuf`; `UnexpectedEof` at the end
    /// of the stream.
    fn fill(&mut self) -> io::Result<()> {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.tail == self.inbuf.len() {
            self.inbuf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        match self.sock.read(&mut self.inbuf[self.tail..]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )),
            Ok(n) => {
                self.tail += n;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The next whole frame's length, if `inbuf` holds its prefix.
    fn next_len(&self) -> Option<usize> {
        let prefix = self.inbuf[..self.tail].get(self.head..self.head + LEN_PREFIX)?;
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        Some(usize::try_from(len).unwrap_or(usize::MAX))
    }
}

impl Backend for Stream {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = buf.len().saturating_sub(VNET_HDR_LEN);
        loop {
            let held = self.tail - self.head;
            if self.skip > 0 {
                let n = self.skip.min(held);
                self.head += n;
                self.skip -= n;
                if self.skip > 0 {
                    self.fill()?;
                }
                continue;
            }
            if let Some(len) = self.next_len() {
                if len == 0 {
                    self.head += LEN_PREFIX;
                    continue;
                }
                if len > room {
                    // Too long for the caller: it sees a full buffer and
                    // drops it; the frame's bytes are skipped.
                    self.head += LEN_PREFIX;
                    self.skip = len;
                    buf[..VNET_HDR_LEN].fill(0);
                    return Ok(buf.len());
                }
                if len <= room && held >= LEN_PREFIX + len {
                    let start = self.head + LEN_PREFIX;
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[0] = HDR_F_DATA_VALID;
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len]
                        .copy_from_slice(&self.inbuf[start..start + len]);
                    self.head = start + len;
                    return Ok(VNET_HDR_LEN + len);
                }
            }
            self.fill()?;
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.flush()?;
        let body = frame.get(VNET_HDR_LEN..).unwrap_or_default();
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        let prefix = len.to_be_bytes();
        let total = LEN_PREFIX + body.len();
        let written = match self
            .sock
            .write_vectored(&[IoSlice::new(&prefix), IoSlice::new(body)])
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        if written < total {
            // The frame is taken: keep what the socket did not.
            self.pending.clear();
            if written < LEN_PREFIX {
                self.pending.extend_from_slice(&prefix[written..]);
                self.pending.extend_from_slice(body);
            } else {
                self.pending
                    .extend_from_slice(&body[written - LEN_PREFIX..]);
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn offloads(&self) -> bool {
        false
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn backpressure(&self) -> bool {
        true
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.sock.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn explain_failure(&mut self) -> Option<String> {
        self.peer.as_mut()?.last_words()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Stream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Stream::new(ours, None).unwrap(), theirs)
    }

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn frames_come_whole_behind_a_data_valid_header() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; 2048];
        assert_eq!(
            s.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let bytes = framed(&[b"first frame", b"second"]);
        // Byte by byte: a frame is handed out only once it is whole.
        for (i, b) in bytes.iter().enumerate() {
            peer.write_all(&[*b]).unwrap();
            if i + 1 < 4 + 11 {
                assert_eq!(
                    s.read_frame(&mut buf).unwrap_err().kind(),
                    io::ErrorKind::WouldBlock
                );
            } else if i + 1 == 4 + 11 {
                let n = s.read_frame(&mut buf).unwrap();
                assert_eq!(&buf[VNET_HDR_LEN..n], b"first frame");
                assert_eq!(buf[0], HDR_F_DATA_VALID);
                assert!(buf[1..VNET_HDR_LEN].iter().all(|&b| b == 0));
            }
        }
        let n = s.read_frame(&mut buf).unwrap();
        assert_eq!(&buf[VNET_HDR_LEN..n], b"second");
    }

    #[test]
    fn a_frame_too_long_is_cut_and_the_rest_skipped() {
        let (mut s, mut peer) = pair();
        let big = vec![7u8; 100_000];
        peer.write_all(&framed(&[&big, b"after"])).unwrap();
        let mut buf = vec![0u8; VNET_HDR_LEN + 1000];
        // The caller sees a full buffer: a frame that did not fit.
        assert_eq!(s.read_frame(&mut buf).unwrap(), buf.len());
        let n = s.read_frame(&mut buf).unwrap();
        assert_eq!(&buf[VNET_HDR_LEN..n], b"after");
        // A frame of length 0 is nothing at all.
        peer.write_all(&framed(&[b"", b"x"])).unwrap();
        let n = s.read_frame(&mut buf).unwrap();
        assert_eq!(&buf[VNET_HDR_LEN..n], b"x");
    }

    #[test]
    fn the_peer_closing_is_an_error() {
        let (mut s, peer) = pair();
        drop(peer);
        let mut buf = vec![0u8; 100];
        assert_eq!(
            s.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_full_socket_keeps_one_frame_and_pushes_back() {
        let (mut s, mut peer) = pair();
        peer.set_nonblocking(true).unwrap();
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend((0..60_000u32).map(|i| u8::try_from(i % 253).unwrap()));
        let mut sent = 0usize;
        // Until the socket is full: the frame that filled it is kept.
        loop {
            match s.write_frame(&frame) {
                Ok(()) => sent += 1,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
            assert!(sent < 10_000, "the socket never filled");
        }
        assert!(!s.pending.is_empty());
        assert!(s.pending.len() <= frame.len() - VNET_HDR_LEN + LEN_PREFIX);
        // The peer reads everything: every frame arrives whole, in order.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let want = sent * (LEN_PREFIX + frame.len() - VNET_HDR_LEN);
        while got.len() < want {
            match peer.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.flush().unwrap_or(()),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), want);
        for chunk in got.chunks(LEN_PREFIX + frame.len() - VNET_HDR_LEN) {
            assert_eq!(&chunk[..4], &60_000u32.to_be_bytes());
            assert_eq!(&chunk[4..], &frame[VNET_HDR_LEN..]);
        }
        assert!(s.pending.is_empty());
    }
}
