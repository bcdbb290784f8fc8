//! A guest saved to snapshot files and restored from them goes on where it
//! was; damaged, foreign and truncated snapshots are refused.

use super::*;
use crate::vcpu::state::msr_index_list;
use crate::vcpu::test_guest::{new_guest, next_out, Guest, ENTRY};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use std::os::unix::fs::PermissionsExt;

/// Real mode at ENTRY: `inc ax; mov [0x2000], eax; out 0x80, al; jmp back`.
const CODE: [u8; 9] = [0x40, 0x66, 0xa3, 0x00, 0x20, 0xe6, 0x80, 0xeb, 0xf7];

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A guest that ran 10 rounds, snapshotted into `dir`.
fn snapshot_of_a_guest(dir: &Path) -> (Paths, Guest) {
    let mut g = new_guest();
    g.mem.write_slice(&CODE, GuestAddress(ENTRY)).unwrap();
    g.start_real_mode();
    for i in 1..=10 {
        assert_eq!(next_out(&mut g.vcpu), i);
    }
    let msrs = msr_index_list(&g.vm.kvm).unwrap();
    let cpuid = g.vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let state = MachineState {
        mem_size_mib: 16,
        vm: VmState::save(&g.vm.fd).unwrap(),
        vcpus: vec![VcpuState::save(&g.vcpu, &cpuid, &msrs).unwrap()],
        serial: Default::default(),
        acpi_pm: Default::default(),
        devices: Vec::new(),
    };
    let paths = Paths::new(dir, "s");
    write(&paths, &state, &g.mem, &g.vm.supported_cpuid).unwrap();
    (paths, g)
}

fn memory_word(path: &Path, at: usize) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

#[test]
fn restored_from_files_the_guest_goes_on() {
    let dir = scratch("restore");
    let (paths, _original) = snapshot_of_a_guest(&dir);
    for p in [&paths.state, &paths.memory] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "temporary files left: {names:?}");
    assert_eq!(memory_word(&paths.memory, 0x2000), 10);

    // Two restores of the one snapshot, each its own guest.
    for _ in 0..2 {
        let kvm = crate::vm::open_kvm().unwrap();
        let vm = crate::vm::Vm::new(kvm, 1).unwrap();
        let (state, mem) = read(&paths, &vm.supported_cpuid).unwrap();
        vm.register_memory(&mem, false).unwrap();
        let mut vcpu = vm.fd.create_vcpu(0).unwrap();
        state.vm.restore(&vm.fd).unwrap();
        state.vcpus[0].restore(&vcpu).unwrap();
        for i in 11..=20 {
            assert_eq!(next_out(&mut vcpu), i);
        }
        let mut word = [0u8; 4];
        mem.read_slice(&mut word, GuestAddress(0x2000)).unwrap();
        assert_eq!(u32::from_le_bytes(word), 20);
        // Copy-on-write: the guest's writes never reach the file.
        assert_eq!(memory_word(&paths.memory, 0x2000), 10);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_foreign_and_truncated_snapshots_are_refused() {
    let dir = scratch("refused");
    let (paths, g) = snapshot_of_a_guest(&dir);
    let cpuid = &g.vm.supported_cpuid;
    let good_state = std::fs::read(&paths.state).unwrap();
    let good_memory = std::fs::read(&paths.memory).unwrap();
    let restore = |state: &[u8], memory: &[u8]| {
        std::fs::write(&paths.state, state).unwrap();
        std::fs::write(&paths.memory, memory).unwrap();
        read(&paths, cpuid).err().map(|e| crate::error_chain(&e))
    };
    assert_eq!(restore(&good_state, &good_memory), None);

    let said = restore(&good_state, &good_memory[..good_memory.len() / 2]).unwrap();
    assert!(
        said.contains("s.mem holds 8388608 bytes, its snapshot says 16777216"),
        "{said}"
    );

    let mut flipped = good_state.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 1;
    let said = restore(&flipped, &good_memory).unwrap();
    assert!(said.contains("does not match its checksum"), "{said}");

    let said = restore(&good_state[..good_state.len() - 100], &good_memory).unwrap();
    assert!(said.contains("is damaged"), "{said}");

    let said = restore(b"garbage", &good_memory).unwrap();
    assert!(said.contains("is not a kiln snapshot"), "{said}");

    // Another kiln version, another format, another host CPU: the header
    // is JSON, rewritten here as another kiln would have written it.
    let header_len = u32::from_le_bytes(good_state[8..12].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good_state[12..12 + header_len]).unwrap();
    let with_header = |h: String| {
        let mut s = MAGIC.to_vec();
        s.extend(u32::try_from(h.len()).unwrap().to_le_bytes());
        s.extend(h.as_bytes());
        s.extend(&good_state[12 + header_len..]);
        s
    };
    let v = env!("CARGO_PKG_VERSION");
    let said = restore(&with_header(header.replace(v, "0.0.1-other")), &good_memory).unwrap();
    assert!(
        said.contains("written by kiln 0.0.1-other, this is kiln"),
        "{said}"
    );
    let said = restore(
        &with_header(header.replace(&format!("\"format\":{FORMAT}"), "\"format\":99")),
        &good_memory,
    )
    .unwrap();
    assert!(said.contains("snapshot format 99"), "{said}");
    let digest = host_cpu_digest(cpuid);
    let said = restore(
        &with_header(header.replace(&digest, "00112233")),
        &good_memory,
    )
    .unwrap();
    assert!(said.contains("other CPU features"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}
