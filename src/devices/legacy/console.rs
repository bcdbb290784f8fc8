//! Guest console output, from the vCPU that writes it to the host's output,
//! without a vCPU ever waiting for the host.
//!
//! The UART appends each byte the guest sends to a [`ConsoleBuffer`] on the
//! vCPU thread: what does not fit is dropped and counted. The
//! [`ConsoleDrainer`], on the event loop, writes the buffer to the output,
//! woken by an eventfd when output arrives while it is idle, and by EPOLLOUT
//! when the output was full. Once woken it stays awake for [`LINGER`] after
//! the last output it found, looking again on a timer: a guest printing
//! steadily (one byte per VM exit) then costs its vCPU no wake-up per byte,
//! and the first byte after a quiet spell, a shell's echo, goes out at once.
//! When kiln's stdout is not read, only console output is lost, once
//! reported; the guest and kiln run on.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::output_fd::OutputFd;
use crate::devices::bus::lock;

/// How much guest console output waits for a slow reader before new output
/// is dropped. The emulated UART moves one byte per VM exit (about 100 KB/s
/// at best on the project's machines), a real 16550 at 115200 baud 11.5
/// KB/s: 64 KiB covers a reader that pauses for a second or more, and more
/// is of no use to a reader that has stopped.
pub const CONSOLE_BUFFER_SIZE: usize = 64 << 10;

/// The most the drainer copies out of the buffer at once; the vCPU waits at
/// most for this copy when it appends.
const DRAIN_CHUNK: usize = 16 << 10;

/// How long the drainer stays awake after it last found output: the most
/// a byte waits when it follows another closely.
pub const LINGER: Duration = Duration::from_millis(1);

/// At exit, how long kiln waits for a reader that takes nothing before it
/// gives up on the rest of the output (any progress restarts the wait).
pub const FLUSH_STALL: Duration = Duration::from_secs(1);

/// The same when kiln was asked to stop (SIGTERM...): stop promptly.
pub const FLUSH_STALL_ON_STOP: Duration = Duration::from_millis(100);

/// Where the drainer writes the guest's console output.
pub enum ConsoleOutput {
    /// An fd such as kiln's stdout, written without blocking.
    Fd(OutputFd),
    /// Any writer, written on the event loop: it must not block for long,
    /// and an error (WouldBlock included) ends the console output.
    Writer(Box<dyn Write + Send>),
}

impl ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOutput::Fd(fd) => fd.write(buf),
            ConsoleOutput::Writer(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOutput::Fd(fd) => fd.flush(),
            ConsoleOutput::Writer(w) => w.flush(),
        }
    }

    fn poll_fd(&self) -> Option<RawFd> {
        match self {
            ConsoleOutput::Fd(fd) => fd.poll_fd(),
            ConsoleOutput::Writer(_) => None,
        }
    }
}

/// The bounded buffer itself, without locking or waking: what fits, in order.
#[derive(Debug)]
struct Ring {
    data: VecDeque<u8>,
    capacity: usize,
    /// Bytes dropped because the buffer was full.
    dropped: u64,
    /// Bytes discarded because the output is closed.
    discarded: u64,
    closed: bool,
    /// The drainer will look at the buffer without being woken.
    drainer_awake: bool,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Ring {
            // Allocated once: appends never reallocate.
            data: VecDeque::with_capacity(capacity),
            capacity,
            dropped: 0,
            discarded: 0,
            closed: false,
            drainer_awake: false,
        }
    }

    /// Appends what fits of `bytes`; true if the drainer should be woken:
    /// it is idle, or this is the first drop (to report it).
    fn push(&mut self, bytes: &[u8]) -> bool {
        let len = bytes.len() as u64;
        if self.closed {
            self.discarded += len;
            return false;
        }
        let fit = bytes.len().min(self.capacity - self.data.len());
        self.data.extend(&bytes[..fit]);
        let lost = len - fit as u64;
        let first_drop = lost > 0 && self.dropped == 0;
        self.dropped += lost;
        let wake = fit > 0 && !self.drainer_awake;
        self.drainer_awake |= fit > 0;
        wake || first_drop
    }

    /// The drainer goes idle if nothing waits; false if something does.
    fn idle(&mut self) -> bool {
        self.drainer_awake = !self.data.is_empty();
        !self.drainer_awake
    }

    /// Copies the oldest bytes into `out`, leaving them in the buffer.
    fn copy_front(&self, out: &mut [u8]) -> usize {
        let (front, _) = self.data.as_slices();
        let n = front.len().min(out.len());
        out[..n].copy_from_slice(&front[..n]);
        n
    }

    fn consume(&mut self, n: usize) {
        self.data.drain(..n.min(self.data.len()));
    }

    /// From now on everything is discarded, what is buffered too.
    fn close(&mut self) {
        self.discarded += self.data.len() as u64;
        self.data.clear();
        self.closed = true;
    }
}

struct Shared {
    ring: Mutex<Ring>,
    wake: EventFd,
}

/// The vCPU's side: a `Write` that appends to the buffer and never fails
/// or waits (the lock is held by the drainer only to copy a chunk out).
#[derive(Clone)]
pub struct ConsoleBuffer(Arc<Shared>);

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(ConsoleBuffer(Arc::new(Shared {
            ring: Mutex::new(Ring::new(capacity)),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })))
    }

    pub fn push(&self, bytes: &[u8]) {
        if lock(&self.0.ring).push(bytes) {
            // Fails only when the counter is saturated: already woken.
            let _ = self.0.wake.write(1);
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        lock(&self.0.ring)
    }
}

impl Write for ConsoleBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a drain ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// Everything buffered was written.
    Empty,
    /// The output takes no more now: wait for EPOLLOUT.
    Blocked,
    /// The output failed or closed: its output is discarded from now on.
    Closed,
}

/// Writes the buffer to the output, on the event loop.
pub struct ConsoleDrainer {
    buffer: ConsoleBuffer,
    output: ConsoleOutput,
    /// Ticks every [`LINGER`] while the drainer is awake.
    timer: TimerFd,
    ticking: bool,
    chunk: Box<[u8]>,
    /// Bytes written to the output: progress, while flushing at exit.
    written: u64,
    watching_output: bool,
    drop_reported: bool,
}

impl ConsoleDrainer {
    pub fn new(buffer: ConsoleBuffer, output: ConsoleOutput) -> io::Result<Self> {
        Ok(ConsoleDrainer {
            buffer,
            output,
            timer: TimerFd::new()?,
            ticking: false,
            chunk: vec![0; DRAIN_CHUNK].into_boxed_slice(),
            written: 0,
            watching_output: false,
            drop_reported: false,
        })
    }

    /// Writes until the buffer is empty or the output takes no more.
    fn drain(&mut self) -> Drained {
        loop {
            let n = {
                let ring = self.buffer.ring();
                if ring.closed {
                    return Drained::Closed;
                }
                ring.copy_front(&mut self.chunk)
            };
            if n == 0 {
                if let Err(e) = self.output.flush() {
                    self.close(&e);
                    return Drained::Closed;
                }
                return Drained::Empty;
            }
            match self.output.write(&self.chunk[..n]) {
                Ok(0) => {
                    self.close(&io::ErrorKind::WriteZero.into());
                    return Drained::Closed;
                }
                Ok(k) => {
                    self.buffer.ring().consume(k);
                    self.written += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && self.output.poll_fd().is_some() =>
                {
                    return Drained::Blocked;
                }
                Err(e) => {
                    self.close(&e);
                    return Drained::Closed;
                }
            }
        }
    }

    fn close(&mut self, e: &io::Error) {
        self.buffer.ring().close();
        // The guest can write forever: say it once.
        log::warn!(
            "console output failed ({e}): guest console output is discarded from now on; the guest keeps running"
        );
    }

    /// Says once that output is being dropped; the total comes at exit.
    fn report_first_drop(&mut self) {
        if !self.drop_reported && self.buffer.ring().dropped > 0 {
            self.drop_reported = true;
            log::warn!(
                "guest console output is being dropped: kiln's output is not read fast enough \
                 ({} KiB buffered); the total is reported at exit",
                CONSOLE_BUFFER_SIZE >> 10
            );
        }
    }

    /// Runs the timer while awake; false if it cannot, and the drainer must
    /// not go to sleep counting on it.
    fn tick(&mut self, on: bool) -> bool {
        if on == self.ticking {
            return true;
        }
        let r = if on {
            self.timer.reset(LINGER, Some(LINGER))
        } else {
            self.timer.clear()
        };
        match r {
            Ok(()) => self.ticking = on,
            Err(e) => log::debug!("console drainer timer: {e}"),
        }
        on == self.ticking
    }

    /// Waits for EPOLLOUT on the output, or stops; false if it cannot.
    fn watch_output(&mut self, ops: &mut EventOps, watch: bool) -> bool {
        let Some(fd) = self.output.poll_fd() else {
            return !watch;
        };
        if watch == self.watching_output {
            return true;
        }
        let ev = Events::new_raw(fd, EventSet::OUT);
        let r = if watch { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_output = watch,
            Err(e) => log::debug!("cannot watch the console output: {e:?}"),
        }
        watch == self.watching_output
    }

    /// At exit, once no vCPU runs: writes what is left, waiting for the
    /// output as long as it takes something within `stall`, then reports
    /// what was lost.
    pub fn finish(&mut self, stall: Duration) {
        let mut progress = (self.written, Instant::now());
        while self.drain() == Drained::Blocked {
            if self.written != progress.0 {
                progress = (self.written, Instant::now());
            }
            let left = stall.saturating_sub(progress.1.elapsed());
            let waited = match &self.output {
                ConsoleOutput::Fd(fd) if !left.is_zero() => fd.wait_writable(left),
                _ => Ok(false),
            };
            if let Err(e) = &waited {
                log::debug!("waiting for the console output: {e}");
            }
            if !waited.unwrap_or(false) {
                break;
            }
        }
        let mut ring = self.buffer.ring();
        let unwritten = ring.data.len() as u64;
        ring.dropped += unwritten;
        ring.data.clear();
        if ring.dropped > 0 {
            log::warn!(
                "{} bytes of guest console output were lost: kiln's output was not read fast enough",
                ring.dropped
            );
        }
        if ring.discarded > 0 {
            log::info!(
                "{} bytes of guest console output were discarded after the output closed",
                ring.discarded
            );
        }
    }
}

impl MutEventSubscriber for ConsoleDrainer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.buffer.0.wake.as_raw_fd() {
            let _ = self.buffer.0.wake.read();
        } else if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
        }
        let drained = loop {
            let before = self.written;
            let drained = self.drain();
            if drained != Drained::Empty {
                break drained;
            }
            // Output came since the last look: look again in LINGER.
            if self.written != before && self.tick(true) {
                break drained;
            }
            // None came (or no timer): sleep until the vCPU wakes us, unless
            // output arrived in the meantime.
            self.tick(false);
            if self.buffer.ring().idle() {
                break drained;
            }
        };
        self.report_first_drop();
        match drained {
            // EPOLLOUT wakes a blocked drainer (the timer if it cannot).
            Drained::Blocked => {
                let watched = self.watch_output(ops, true);
                self.tick(!watched);
            }
            Drained::Empty => {
                self.watch_output(ops, false);
            }
            Drained::Closed => {
                self.watch_output(ops, false);
                self.tick(false);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.buffer.0.wake.as_raw_fd(), "buffer"),
            (self.timer.as_raw_fd(), "timer"),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch the console {what}, console output stops: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn the_ring_keeps_what_fits_and_counts_the_rest() {
        let mut r = Ring::new(8);
        assert!(r.push(b"abc"), "output wakes an idle drainer");
        assert!(!r.push(b"def"), "an awake one is not woken again");
        assert!(r.push(b"ghij"), "the first drop wakes");
        assert_eq!((r.data.len(), r.dropped), (8, 2));
        assert!(!r.push(b"k"), "later drops do not");
        assert_eq!(r.dropped, 3);
        let mut out = [0u8; 16];
        let n = r.copy_front(&mut out);
        assert_eq!(&out[..n], b"abcdefgh");
        assert_eq!(r.data.len(), 8, "copying leaves the bytes");
        r.consume(n);
        assert!(r.data.is_empty());
        assert!(r.idle());
        assert!(r.push(b"x"), "an idle drainer is woken again");
        assert!(!r.idle(), "no sleep while output waits");
        assert!(!r.push(b"y"));
    }

    #[test]
    fn the_ring_keeps_order_across_the_wrap() {
        let mut r = Ring::new(8);
        let mut seen = Vec::new();
        let mut out = [0u8; 3];
        for round in 0..20u8 {
            let bytes: Vec<u8> = (0..5).map(|i| round * 5 + i).collect();
            r.push(&bytes);
            // Drain less than was pushed at first, so the ring fills and the
            // front moves round the end of the storage.
            while r.data.len() > 3 {
                let n = r.copy_front(&mut out);
                seen.extend_from_slice(&out[..n]);
                r.consume(n);
            }
        }
        while !r.data.is_empty() {
            let n = r.copy_front(&mut out);
            seen.extend_from_slice(&out[..n]);
            r.consume(n);
        }
        assert_eq!(r.dropped, 0);
        assert_eq!(seen, (0..100).collect::<Vec<u8>>());
    }

    #[test]
    fn a_closed_ring_discards_without_waking() {
        let mut r = Ring::new(8);
        r.push(b"abc");
        r.close();
        assert!(!r.push(b"defghijklm"));
        assert_eq!((r.data.len(), r.dropped, r.discarded), (0, 0, 13));
    }

    #[test]
    fn the_buffer_wakes_the_drainer_when_it_gets_data() {
        let buf = ConsoleBuffer::new(8).unwrap();
        buf.push(b"a");
        buf.push(b"b");
        assert_eq!(buf.0.wake.read().unwrap(), 1);
    }

    fn drainer_to_pipe(capacity: usize) -> (ConsoleBuffer, ConsoleDrainer, io::PipeReader) {
        let (reader, writer) = io::pipe().unwrap();
        let out = OutputFd::new(writer.as_fd()).unwrap();
        let buf = ConsoleBuffer::new(capacity).unwrap();
        let drainer = ConsoleDrainer::new(buf.clone(), ConsoleOutput::Fd(out)).unwrap();
        (buf, drainer, reader)
    }

    /// Bytes that show a lost or reordered chunk.
    fn pattern(len: usize) -> Vec<u8> {
        (0..=250u8).cycle().take(len).collect()
    }

    /// What a pipe holds before a write would block.
    fn pipe_capacity(r: &io::PipeReader) -> usize {
        // SAFETY: F_GETPIPE_SZ only reads a property of a pipe we own.
        let n = unsafe { libc::fcntl(r.as_fd().as_raw_fd(), libc::F_GETPIPE_SZ) };
        usize::try_from(n).unwrap()
    }

    #[test]
    fn the_drainer_waits_for_a_stopped_reader_and_gives_up_at_exit() {
        let (buf, mut drainer, mut reader) = drainer_to_pipe(1 << 20);
        let cap = pipe_capacity(&reader);
        let data = pattern(cap * 2);
        buf.push(&data);
        assert_eq!(drainer.drain(), Drained::Blocked);
        assert_eq!(drainer.written, cap as u64);
        // A reader that takes a little lets the drainer go on.
        let mut got = vec![0u8; cap];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(drainer.drain(), Drained::Empty);
        assert_eq!(drainer.written, 2 * cap as u64);
        // At exit, a stopped reader costs the stall time, not forever.
        buf.push(b"lost");
        assert_eq!(drainer.drain(), Drained::Blocked);
        let start = Instant::now();
        drainer.finish(Duration::from_millis(50));
        let took = start.elapsed();
        assert!(took < Duration::from_secs(5), "finish took {took:?}");
        assert_eq!(buf.ring().dropped, 4);
        let mut rest = vec![0u8; cap];
        reader.read_exact(&mut rest).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, data);
    }

    #[test]
    fn the_drainer_flushes_everything_to_a_live_reader_at_exit() {
        let (buf, mut drainer, mut reader) = drainer_to_pipe(1 << 20);
        let data = pattern(pipe_capacity(&reader) * 4);
        buf.push(&data);
        let want = data.len();
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; want];
            reader.read_exact(&mut got).unwrap();
            got
        });
        drainer.finish(Duration::from_secs(30));
        assert_eq!(t.join().unwrap(), data);
        assert_eq!(buf.ring().dropped, 0);
    }

    #[test]
    fn a_closed_reader_ends_only_the_console_output() {
        let (buf, mut drainer, reader) = drainer_to_pipe(64);
        drop(reader);
        buf.push(b"abc");
        assert_eq!(drainer.drain(), Drained::Closed);
        buf.push(&[b'x'; 1000]);
        assert_eq!(drainer.drain(), Drained::Closed);
        let ring = buf.ring();
        assert_eq!((ring.discarded, ring.dropped), (1003, 0));
    }

    #[test]
    fn the_event_loop_drains_when_woken() {
        use event_manager::{EventManager, SubscriberOps};
        let capture = Arc::new(Mutex::new(Vec::new()));
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl Write for Capture {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = ConsoleBuffer::new(64).unwrap();
        let drainer = ConsoleDrainer::new(
            buf.clone(),
            ConsoleOutput::Writer(Box::new(Capture(capture.clone()))),
        )
        .unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(drainer)));
        let mut run = || assert_eq!(em.run_with_timeout(10_000).unwrap(), 1);
        buf.push(b"hello");
        run(); // woken by the eventfd
        assert_eq!(&*capture.lock().unwrap(), b"hello");
        assert!(buf.ring().drainer_awake);
        buf.push(b", world");
        run(); // the timer, LINGER later
        assert_eq!(&*capture.lock().unwrap(), b"hello, world");
        run(); // the timer again: nothing came, the drainer sleeps
        assert!(!buf.ring().drainer_awake);
        buf.push(b"!");
        run(); // woken by the eventfd again
        assert_eq!(&*capture.lock().unwrap(), b"hello, world!");
        assert_eq!(
            buf.0.wake.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
