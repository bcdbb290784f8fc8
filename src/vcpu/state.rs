//! A vCPU's architectural state, as KVM holds it, saved to and restored
//! from plain serializable data (snapshots).
//!
//! What is saved: general and special registers, the FPU (FXSAVE layout;
//! kiln's guests run with `noxsave` on hosts that reject XSAVE, and XSAVE
//! state is added where the host has it), the MSRs KVM lists as saveable,
//! the local APIC, pending events (exceptions, interrupts, NMI, SMI), the MP
//! state, debug registers, XCRs where supported, the CPUID the vCPU was
//! given, and the TSC frequency. Restore sets them in the order KVM needs:
//! CPUID before anything that depends on it, MSRs before the registers that
//! select modes, the LAPIC before the MP state and events.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, CpuId,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::arch::x86_64::regs::msr_list;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("the host's KVM cannot restore MSR {index:#x} (a snapshot from a different host?)")]
    Msr { index: u32 },
    #[error("too many {0} in the saved state")]
    TooMany(&'static str),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// One vCPU's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// kHz; None where KVM cannot tell.
    pub tsc_khz: Option<u32>,
}

/// The FPU state in KVM_GET_FPU's layout (FXSAVE's content), which
/// kvm-bindings does not serialize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The MSRs KVM lists as saveable on this host ([`VcpuState::save`] skips
/// those it then cannot read: some exist only with some CPU features).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// IA32_TSC_DEADLINE (Intel SDM vol. 4, table 2-2).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// KVM_GET_MSRS reads at most this many per call.
const MSR_CHUNK: usize = 128;

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN (paused).
    pub fn save(vcpu: &VcpuFd, cpuid: &CpuId, msr_indices: &[u32]) -> Result<Self, Error> {
        let mut msrs = Vec::with_capacity(msr_indices.len());
        let mut rest: &[u32] = msr_indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let mut wanted =
                msr_list(chunk.iter().map(|&index| (index, 0))).ok_or(Error::TooMany("MSRs"))?;
            let read = vcpu
                .get_msrs(&mut wanted)
                .map_err(kvm_err("KVM_GET_MSRS"))?;
            msrs.extend(
                wanted.as_slice()[..read.min(chunk.len())]
                    .iter()
                    .map(|e| (e.index, e.data)),
            );
            // KVM stops at the first MSR it cannot read: skip that one.
            let done = if read < chunk.len() { read + 1 } else { read };
            rest = &rest[done.min(rest.len())..];
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: Fpu::from(&vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?),
            xcrs: vcpu.get_xcrs().ok(),
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Sets the state into a new vCPU (created, never run).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| Error::TooMany("CPUID entries"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // Same host, same frequency: only a scaling host needs it.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))?;
            }
        }
        set_msrs(vcpu, &self.msrs)?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(kvm_err("KVM_SET_FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        // KVM drops a TSC deadline written while the LAPIC timer is not in
        // TSC-deadline mode, as it is before KVM_SET_LAPIC: without this
        // second write a guest sleeping on the timer never wakes.
        if let Some(&deadline) = self.msrs.iter().find(|m| m.0 == MSR_IA32_TSC_DEADLINE) {
            set_msrs(vcpu, &[deadline])?;
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Writes `msrs`, as many per KVM_SET_MSRS as it takes; an MSR KVM refuses
/// is named.
fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), Error> {
    for chunk in msrs.chunks(MSR_CHUNK) {
        let list = msr_list(chunk.iter().copied()).ok_or(Error::TooMany("MSRs"))?;
        let written = vcpu.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != chunk.len() {
            let index = chunk.get(written).map_or(0, |m| m.0);
            return Err(Error::Msr { index });
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
