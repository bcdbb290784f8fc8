//! The 16550 UART console at 0x3f8 (vm-superio): guest output to a writer
//! (a [`ConsoleBuffer`](super::console::ConsoleBuffer) that never blocks the
//! vCPU), host input (kiln's stdin) into the receive FIFO.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::devices::bus::{lock, BusDevice};

/// Raises an interrupt by writing an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side that the guest emptied the receive FIFO.
pub struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Saturated counter: already signalled.
        let _ = self.0.write(1);
    }
}

pub type Output = Box<dyn Write + Send>;

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputReady, Output>,
    input_ready: EventFd,
    output_failed: bool,
}

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor: [u8; 2],
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// `irq` is written when the UART raises its interrupt; `state`, when
    /// given, is a snapshot's UART (a FIFO over the UART's size is refused).
    pub fn new(irq: EventFd, out: Output, state: Option<&SerialSnapshot>) -> io::Result<Self> {
        let input_ready = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let events = InputReady(input_ready.try_clone()?);
        let uart = match state {
            None => Serial::with_events(IrqTrigger(irq), events, out),
            Some(s) => {
                let state = SerialState {
                    baud_divisor_low: s.baud_divisor[0],
                    baud_divisor_high: s.baud_divisor[1],
                    interrupt_enable: s.interrupt_enable,
                    interrupt_identification: s.interrupt_identification,
                    line_control: s.line_control,
                    line_status: s.line_status,
                    modem_control: s.modem_control,
                    modem_status: s.modem_status,
                    scratch: s.scratch,
                    in_buffer: s.in_buffer.clone(),
                };
                Serial::from_state(&state, IrqTrigger(irq), events, out)
                    .map_err(|e| io::Error::other(format!("the snapshot's serial state: {e:?}")))?
            }
        };
        Ok(SerialDevice {
            uart,
            input_ready,
            output_failed: false,
        })
    }

    /// The UART's state, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues host bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input: {e}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *value) {
                // Say it once: a guest writing the UART in a loop must not
                // flood the log.
                if !self.output_failed {
                    log::warn!("serial console failed, further failures are not logged: {e}");
                    self.output_failed = true;
                }
            }
        }
    }
}

/// Moves host input into the UART on the event loop, without losing bytes
/// when the guest is slower than the host: what does not fit in the FIFO
/// waits here, and the input fd is not read again until the guest drains it.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: File,
    ready: EventFd,
    pending: VecDeque<u8>,
    watching_input: bool,
    eof: bool,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: File) -> io::Result<Self> {
        let ready = lock(&serial).input_ready.try_clone()?;
        Ok(SerialInput {
            serial,
            input,
            ready,
            pending: VecDeque::new(),
            watching_input: false,
            eof: false,
        })
    }

    fn flush_pending(&mut self) {
        let mut serial = lock(&self.serial);
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = serial.enqueue_input(front);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }

    fn set_watching(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.watching_input {
            return;
        }
        let ev = Events::new(&self.input, EventSet::IN);
        let r = if watch { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_input = watch,
            Err(e) => {
                // /dev/null and regular files cannot be polled: no input.
                log::debug!("serial input disabled: {e:?}");
                self.eof = true;
            }
        }
    }

    fn read_input(&mut self) {
        let mut buf = [0u8; 256];
        match self.input.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.pending.extend(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("reading console input failed, input disabled: {e}");
                self.eof = true;
            }
        }
    }

    fn update_watch(&mut self, ops: &mut EventOps) {
        let want = !self.eof && self.pending.is_empty();
        self.set_watching(ops, want);
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ready.as_raw_fd() {
            let _ = self.ready.read();
        } else if events.fd() == self.input.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input();
            } else {
                // HUP or ERR without data: the input is gone.
                self.eof = true;
            }
        }
        self.flush_pending();
        self.update_watch(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.ready, EventSet::IN)) {
            log::warn!("serial input disabled: {e:?}");
            return;
        }
        self.set_watching(ops, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    // 16550 register offsets (PC16550D datasheet, table 2).
    const THR_RBR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn device() -> (SerialDevice, Sink, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        let sink = Sink::default();
        let dev =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()), None).unwrap();
        (dev, sink, irq)
    }

    fn read(dev: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        dev.read(off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut dev, sink, _) = device();
        for b in b"hi\n" {
            dev.write(THR_RBR, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_sets_data_ready_and_interrupts() {
        let (mut dev, _, irq) = device();
        dev.write(IER, &[0x01]); // received-data interrupt on
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut dev, THR_RBR), b'a');
        assert_eq!(read(&mut dev, THR_RBR), b'b');
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
        // The last read emptied the FIFO: the input side is told.
        assert_eq!(dev.input_ready.read().unwrap(), 1);
    }

    #[test]
    fn fifo_full_takes_what_fits() {
        let (mut dev, _, _) = device();
        let n = dev.enqueue_input(&[b'x'; 100]);
        assert!(n > 0 && n < 100, "{n}");
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn odd_accesses_read_ones_and_do_not_panic() {
        let (mut dev, sink, _) = device();
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
        dev.write(1 << 40, &[1]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
