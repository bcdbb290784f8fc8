//! A guest of a few instructions on a raw KVM VM, for tests of vCPU state
//! and snapshots.

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vm::{open_kvm, Vm};

/// Real-mode loop at 0x1000: `inc ax; out 0x80, al; jmp back`.
pub const CODE: [u8; 5] = [0x40, 0xe6, 0x80, 0xeb, 0xfb];
pub const ENTRY: u64 = 0x1000;

pub struct Guest {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpu: VcpuFd,
}

impl Guest {
    /// The vCPU with the host's CPUID, in real mode at ENTRY, AX = 0.
    pub fn start_real_mode(&self) {
        self.vcpu.set_cpuid2(&self.vm.supported_cpuid).unwrap();
        let mut sregs = self.vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.vcpu.set_sregs(&sregs).unwrap();
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rax = 0;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).unwrap();
    }
}

pub fn new_vm() -> (Vm, GuestMemoryMmap) {
    let kvm = open_kvm().expect("these tests need /dev/kvm");
    let vm = Vm::new(kvm, 3).unwrap();
    let mem = crate::memory::create(16).unwrap();
    vm.register_memory(&mem, false).unwrap();
    mem.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    (vm, mem)
}

pub fn new_guest() -> Guest {
    let (vm, mem) = new_vm();
    let vcpu = vm.fd.create_vcpu(0).unwrap();
    Guest { vm, mem, vcpu }
}

/// Runs until the next `out 0x80` and returns AL.
pub fn next_out(vcpu: &mut VcpuFd) -> u8 {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x80, data) => return data[0],
            VcpuExit::Intr => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
