//! `Vmm::build` without running the guest: the device registry (what
//! snapshot/restore and `kiln run` find), drive locks and the vsock
//! socket's life.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use kiln::config::VmConfig;
use kiln::devices::virtio::device_type;
use kiln::vmm::{ConsoleIo, ConsoleOutput, Vmm};

#[test]
fn registry_lists_every_virtio_device_where_the_guest_finds_it() {
    require_kvm();
    let dir = scratch("registry");
    let kernel = assemble(|a| a.hlt().unwrap());
    let config = write_vm(&dir, &common::elf_image(&kernel), 1, "");
    let data = dir.join("data.img");
    let root = dir.join("root.img");
    for f in [&data, &root] {
        std::fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
    }
    let uds = dir.join("v.sock");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["drives"] = serde_json::json!([
        { "drive_id": "data", "path_on_host": data, "is_root_device": false },
        { "drive_id": "root", "path_on_host": root, "is_root_device": true }
    ]);
    json["entropy"] = serde_json::json!({});
    json["vsock"] = serde_json::json!({ "guest_cid": 3, "uds_path": uds });
    let config = VmConfig::from_json(&json.to_string()).unwrap();
    let console = || ConsoleIo {
        output: ConsoleOutput::Writer(Box::new(std::io::sink())),
        input: None,
    };
    let vmm = Vmm::build(&config, console()).unwrap();

    let got: Vec<_> = vmm
        .devices()
        .iter()
        .map(|d| (d.id.as_str(), d.device_type, d.mmio_base, d.irq))
        .collect();
    assert_eq!(
        got,
        vec![
            ("drive root", device_type::BLOCK, 0xc000_0000, 5),
            ("drive data", device_type::BLOCK, 0xc000_1000, 6),
            ("entropy", device_type::RNG, 0xc000_2000, 7),
            ("vsock", device_type::VSOCK, 0xc000_3000, 8),
        ]
    );
    // The drives are locked while the VM exists: a second VM on them is
    // refused at build time (after validation), naming the drive and file.
    let build_err = |config: &VmConfig| match Vmm::build(config, console()) {
        Ok(_) => panic!("a second VM on the same drives and uds_path was built"),
        Err(e) => kiln::error_chain(&e),
    };
    assert_eq!(
        build_err(&config),
        format!(
            "cannot create drive \"root\": cannot open disk image {root:?}: \
             in use by another VM (locked)"
        )
    );
    // The socket is live while the VM exists; a second VM is refused,
    // naming the field and the path.
    assert!(uds.exists());
    let mut no_drives = config.clone();
    no_drives.drives.clear();
    let err = build_err(&no_drives);
    assert!(
        err.contains("vsock.uds_path") && err.contains("in use"),
        "{err}"
    );
    drop(vmm);
    assert!(!uds.exists(), "the socket is removed with the VM");
    std::fs::remove_dir_all(&dir).unwrap();
}
