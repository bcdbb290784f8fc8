//! ACPI tables, so that a guest kernel with ACPI can power the VM off (and
//! report a panic through pvpanic). They describe the same machine as the
//! MP table, which stays for kernels without ACPI.
//!
//! What kiln describes (ACPI 6.5, built with the `acpi_tables` crate):
//! - RSDP → XSDT → FADT, MADT; FADT → DSDT, FACS.
//! - FADT: a full (not hardware-reduced) ACPI machine, always in ACPI mode
//!   (no SMI command port), with a PM1a event block and PM1a control
//!   register on ports kiln emulates ([`crate::devices::legacy::acpi_pm`]),
//!   an SCI on IRQ [`ACPI_SCI_IRQ`] that kiln never raises, no PM timer, no
//!   GPE blocks, no VGA, no CMOS RTC, and a reset register: the i8042's
//!   reset command (0xfe to port 0x64), the same reset `reboot=k` uses.
//!   Hardware-reduced ACPI would do without the SCI and PM1 blocks, but
//!   Linux then drops the legacy PIC and the ISA IRQ numbers with it: the
//!   serial port's IRQ 4 and the IRQs kiln gives virtio-mmio devices on
//!   the command line would no longer exist, and every device would have
//!   to be described in the DSDT instead, which a kernel without ACPI
//!   cannot read.
//! - MADT: one local APIC per vCPU (APIC ID = vCPU index), the IOAPIC
//!   (ID = vCPU count, GSIs 0-23), the SCI's interrupt source override
//!   (level, active high) and LINT1 as NMI on every CPU. ISA IRQs are
//!   identity mapped, as in the MP table.
//! - DSDT: `\_S5_` (soft off: SLP_TYP [`SLP_TYP_S5`]), and the pvpanic
//!   device `\_SB.PEVT` (`QEMU0001`, port [`PVPANIC_PORT`]).

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ACPI_END, ACPI_PM1_CNT_LEN, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_LEN, ACPI_PM1_EVT_PORT,
    ACPI_SCI_IRQ, ACPI_START, APIC_START, I8042_PORT, IOAPIC_START, PVPANIC_PORT,
};

/// The OEM ID in every table.
const OEM_ID: [u8; 6] = *b"KILN  ";
const OEM_REVISION: u32 = 1;
/// The SLP_TYP value `\_S5_` gives and kiln's PM1a control register takes
/// as "soft off".
pub const SLP_TYP_S5: u8 = 5;
/// Where the RSDP is: the first bytes of the ACPI area.
pub const RSDP_ADDR: u64 = ACPI_START;

/// What the i8042 takes as "pulse the reset line".
const I8042_RESET_COMMAND: u8 = 0xfe;
/// The i8042's command port.
const I8042_COMMAND_PORT: u64 = I8042_PORT + 4;
/// FADT IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// MADT flags: the machine also has dual 8259 PICs (KVM's).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types and MPS INTI flags (ACPI 6.5, 5.2.12).
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_LEVEL: u16 = 0b11 << 2;
/// "All processors" in a local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;
/// Table revisions: DSDT 2 (64-bit integers in AML), MADT 5 (ACPI 6.x).
const DSDT_REVISION: u8 = 2;
const MADT_REVISION: u8 = 5;
/// Size of the standard table header, and of the MADT's (header, local
/// APIC address, flags).
const HEADER_LEN: u32 = 36;
const MADT_HEADER_LEN: u32 = 44;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the ACPI tables for {cpus} vCPUs take {len} bytes, more than the {} below 1 MiB",
        ACPI_END - ACPI_START
    )]
    TooLarge { cpus: u8, len: usize },
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The tables laid out one after another from [`ACPI_START`].
struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// Appends `table` at the next multiple of `align`; returns its
    /// guest physical address.
    fn place(&mut self, table: &[u8], align: usize) -> u64 {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(table);
        ACPI_START + at as u64
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// A port number as the 32-bit FADT fields hold it.
fn port32(port: u64) -> u32 {
    u32::try_from(port).unwrap_or(0)
}

fn io_register(port: u64, len: u64, access: AccessSize) -> GAS {
    let bits = u8::try_from(len * 8).unwrap_or(0);
    GAS::new(AddressSpace::SystemIo, bits, 0, access, port)
}

fn dsdt() -> Vec<u8> {
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]),
    );
    let pvpanic_port = u16::try_from(PVPANIC_PORT).unwrap_or(0);
    let io = aml::IO::new(pvpanic_port, pvpanic_port, 1, 1);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let crs = aml::Name::new("_CRS".into(), &crs);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&hid, &crs]);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&pvpanic]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    let mut table = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"KILNDSDT",
        OEM_REVISION,
    );
    table.append_slice(&body);
    table.as_slice().to_vec()
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"KILNFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        // No fixed power or sleep button, no RTC wake status.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    f.sci_int = u16::try_from(ACPI_SCI_IRQ).unwrap_or(0).into();
    // smi_cmd stays 0: the machine is always in ACPI mode.
    f.pm1a_evt_blk = port32(ACPI_PM1_EVT_PORT).into();
    f.pm1_evt_len = u8::try_from(ACPI_PM1_EVT_LEN).unwrap_or(0);
    f.x_pm1a_evt_blk = io_register(ACPI_PM1_EVT_PORT, ACPI_PM1_EVT_LEN, AccessSize::WordAccess);
    f.pm1a_cnt_blk = port32(ACPI_PM1_CNT_PORT).into();
    f.pm1_cnt_len = u8::try_from(ACPI_PM1_CNT_LEN).unwrap_or(0);
    f.x_pm1a_cnt_blk = io_register(ACPI_PM1_CNT_PORT, ACPI_PM1_CNT_LEN, AccessSize::WordAccess);
    f.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    f.reset_reg = io_register(I8042_COMMAND_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = I8042_RESET_COMMAND;
    bytes_of(&f.finalize())
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    let ioapic_id = num_cpus;
    IoApic::new(ioapic_id, IOAPIC_START, 0).to_aml_bytes(&mut entries);
    // The SCI: ISA IRQ = GSI, level triggered, active high (an active-low
    // level line that nobody drives would read as asserted).
    let sci = u8::try_from(ACPI_SCI_IRQ).unwrap_or(0);
    entries.extend_from_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, sci]);
    entries.extend_from_slice(&ACPI_SCI_IRQ.to_le_bytes());
    entries.extend_from_slice(&(MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL).to_le_bytes());
    // LINT1 of every CPU is the NMI (conforming polarity and trigger).
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    let mut table = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"KILNMADT",
        OEM_REVISION,
    );
    table.write_u32(36, APIC_START);
    table.write_u32(40, MADT_PCAT_COMPAT);
    table.append_slice(&entries);
    table.as_slice().to_vec()
}

/// All the tables for `num_cpus` vCPUs, as placed at [`ACPI_START`] (the
/// RSDP first).
pub fn build(num_cpus: u8) -> Result<Vec<u8>, Error> {
    let mut image = Image {
        // Room for the RSDP, written last: it points at the XSDT.
        bytes: vec![0; Rsdp::len()],
    };
    let dsdt = image.place(&dsdt(), 16);
    // The FACS must be 64-byte aligned.
    let facs = image.place(&bytes_of(&FACS::new()), 64);
    let fadt = image.place(&fadt(dsdt, facs), 16);
    let madt = image.place(&madt(num_cpus), 16);
    let mut xsdt = XSDT::new(OEM_ID, *b"KILNXSDT", OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = image.place(&bytes_of(&xsdt), 16);
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
    image.bytes[..rsdp.len()].copy_from_slice(&rsdp);
    let len = image.bytes.len();
    if ACPI_START + len as u64 > ACPI_END {
        return Err(Error::TooLarge {
            cpus: num_cpus,
            len,
        });
    }
    Ok(image.bytes)
}

/// Writes the tables for `num_cpus` vCPUs; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<u64, Error> {
    let image = build(num_cpus)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(Error::Write)?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
