//! Save a running guest's vCPU and VM state, restore it into a new VM with a
//! copy of its memory, and check the guest goes on where it was.

use super::*;
use crate::vcpu::test_guest::{new_guest, new_vm, next_out, ENTRY};
use crate::vm::{Vm, VmState};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

/// A vCPU thread (the BSP, id 0) running CODE in 32-bit protected mode,
/// and the MSRs to save.
fn vcpu_thread(vm: &Vm) -> (crate::vcpu::VcpuHandle, Arc<[u32]>) {
    use crate::arch::x86_64::cpuid::Topology;
    use crate::arch::x86_64::regs::EntryMode;
    use crate::devices::bus::Bus;
    use crate::vmm::exit::ExitSignal;
    let setup = crate::vcpu::VcpuSetup {
        vm: &vm.fd,
        supported_cpuid: &vm.supported_cpuid,
        topology: Topology::new(1, false),
        entry: ENTRY,
        mode: EntryMode::Pvh,
        io_bus: Arc::new(Bus::new()),
        mmio_bus: Arc::new(Bus::new()),
        exit: Arc::new(ExitSignal::new().unwrap()),
    };
    let handle = crate::vcpu::Vcpu::new(0, &setup).unwrap().start().unwrap();
    let msrs = msr_index_list(&vm.kvm).unwrap().into();
    (handle, msrs)
}

#[test]
fn a_restored_guest_goes_on_where_it_was() {
    let mut a = new_guest();
    a.start_real_mode();
    for i in 1..=10 {
        assert_eq!(next_out(&mut a.vcpu), i);
    }
    let msrs = msr_index_list(&a.vm.kvm).unwrap();
    assert!(!msrs.is_empty());
    let cpuid = a
        .vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let state = VcpuState::save(&a.vcpu, &cpuid, &msrs).unwrap();
    let vm_state = VmState::save(&a.vm.fd).unwrap();
    // Through the serialized form, as a snapshot file holds it.
    let state: VcpuState = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
    let vm_state: VmState =
        serde_json::from_slice(&serde_json::to_vec(&vm_state).unwrap()).unwrap();

    let mut b = new_guest();
    let mut page = vec![0u8; 0x2000];
    a.mem.read_slice(&mut page, GuestAddress(0)).unwrap();
    b.mem.write_slice(&page, GuestAddress(0)).unwrap();
    vm_state.restore(&b.vm.fd).unwrap();
    state.restore(&b.vcpu).unwrap();
    assert_eq!(b.vcpu.get_regs().unwrap().rax & 0xff, 10);
    for i in 11..=20 {
        assert_eq!(next_out(&mut b.vcpu), i);
    }
    // The original is untouched by its copy.
    assert_eq!(next_out(&mut a.vcpu), 11);
}

/// A state naming an MSR this host's KVM does not have is refused, naming
/// the MSR.
#[test]
fn an_unknown_msr_is_refused() {
    let a = new_guest();
    a.vcpu.set_cpuid2(&a.vm.supported_cpuid).unwrap();
    let msrs = msr_index_list(&a.vm.kvm).unwrap();
    let cpuid = a
        .vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let mut state = VcpuState::save(&a.vcpu, &cpuid, &msrs).unwrap();
    state.msrs.push((0x4b56_4dff, 1));
    let b = new_guest();
    match state.restore(&b.vcpu) {
        Err(Error::Msr { index }) => assert_eq!(index, 0x4b56_4dff),
        other => panic!("expected an MSR error, got {other:?}"),
    }
}

/// A vCPU thread pauses (out of KVM_RUN: its state stands still), gives its
/// state, resumes (the guest goes on), and still stops when asked.
#[test]
fn a_vcpu_thread_pauses_saves_and_resumes() {
    let (vm, _mem) = new_vm();
    let (handle, msrs) = vcpu_thread(&vm);
    std::thread::sleep(std::time::Duration::from_millis(50));
    handle.pause().unwrap();
    let first = handle.save_state(msrs.clone()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let again = handle.save_state(msrs.clone()).unwrap();
    assert!(first.regs.rax > 0, "the guest never ran");
    assert_eq!(first.regs.rax, again.regs.rax, "a paused vCPU ran");
    assert_eq!(first.regs.rip, again.regs.rip);
    handle.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    handle.pause().unwrap();
    let later = handle.save_state(msrs).unwrap();
    assert!(
        later.regs.rax > first.regs.rax,
        "the resumed guest did not go on"
    );
    handle.resume().unwrap();
    handle.kick();
    assert!(handle.join());
}

/// A paused vCPU still stops when kiln ends.
#[test]
fn a_paused_vcpu_stops() {
    let (vm, _mem) = new_vm();
    let (handle, _) = vcpu_thread(&vm);
    handle.pause().unwrap();
    let start = std::time::Instant::now();
    handle.kick();
    assert!(handle.join());
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
}
