//! The fuzz targets on stable Rust, as CI runs them: each target's seed
//! corpus (`fuzz/corpus/<target>/`, crashes found by fuzzing included)
//! replayed through the same harness the cargo-fuzz target runs
//! (`kiln::fuzzing`), then a few thousand random inputs: seeds with a
//! few bytes changed, inserted or removed, and plain random bytes
//! (proptest, which shrinks a failing input before reporting it).
//!
//! `cargo test --test fuzz_replay -- --ignored write_seed_corpus`
//! rewrites the seed files from the harnesses' `seeds()` after a change
//! of their input format.

// Tests: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use kiln::fuzzing;

type Harness = fn(&[u8]);
type Seeds = fn() -> Vec<(String, Vec<u8>)>;

/// Every target: name (its cargo-fuzz target and corpus folder), harness,
/// seed maker, random cases.
const TARGETS: [(&str, Harness, Seeds, u32); 9] = [
    ("config", fuzzing::config::run, fuzzing::config::seeds, 3000),
    ("block", fuzzing::block::run, fuzzing::block::seeds, 1500),
    ("vsock", fuzzing::vsock::run, fuzzing::vsock::seeds, 1000),
    ("fs", fuzzing::fs::run, fuzzing::fs::seeds, 1000),
    (
        "kernel",
        fuzzing::kernel::run_kernel,
        fuzzing::kernel::kernel_seeds,
        2000,
    ),
    (
        "elf",
        fuzzing::kernel::run_elf,
        fuzzing::kernel::elf_seeds,
        5000,
    ),
    (
        "protocol",
        fuzzing::protocol::run,
        fuzzing::protocol::seeds,
        5000,
    ),
    ("image", fuzzing::image::run, fuzzing::image::seeds, 1500),
    ("net", fuzzing::net::run, fuzzing::net::seeds, 1000),
];

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The files of a target's corpus, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

/// `seed` with `edits` applied: (position, what, byte); what is 0:
/// overwrite, 1: insert, 2: remove, 3: flip a bit.
fn mutate(seed: &[u8], edits: &[(u16, u8, u8)]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(pos, what, byte) in edits {
        let at = usize::from(pos) % (out.len() + 1);
        match what {
            0 if at < out.len() => out[at] = byte,
            1 => out.insert(at, byte),
            2 if at < out.len() => {
                out.remove(at);
            }
            3 if at < out.len() => out[at] ^= 1 << (byte % 8),
            _ => {}
        }
    }
    out
}

fn replay(target: &str) {
    let (_, run, _, cases) = TARGETS.iter().find(|t| t.0 == target).unwrap();
    let seeds = corpus(target);
    for (name, data) in &seeds {
        eprintln!("{target}: {name}");
        run(data);
    }
    let inputs: Vec<Vec<u8>> = seeds.into_iter().map(|(_, d)| d).collect();
    let n = inputs.len();
    let mutated = (
        0..n,
        prop::collection::vec((any::<u16>(), 0u8..4, any::<u8>()), 1..12),
    )
        .prop_map(move |(i, edits)| mutate(&inputs[i], &edits));
    let random = prop::collection::vec(any::<u8>(), 0..1024);
    let strategy = prop_oneof![3 => mutated, 1 => random];
    let mut runner = TestRunner::new(Config {
        cases: *cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |data| {
        run(&data);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
}

#[test]
fn replay_config() {
    replay("config");
}

#[test]
fn replay_block() {
    replay("block");
}

#[test]
fn replay_vsock() {
    replay("vsock");
}

#[test]
fn replay_fs() {
    replay("fs");
}

#[test]
fn replay_kernel() {
    replay("kernel");
}

#[test]
fn replay_elf() {
    replay("elf");
}

#[test]
fn replay_protocol() {
    replay("protocol");
}

#[test]
fn replay_image() {
    replay("image");
}

#[test]
fn replay_net() {
    replay("net");
}

/// The corpus holds every seed the harness makes, as it makes it (so a
/// change of a harness's input format cannot leave stale seeds behind).
#[test]
fn seed_files_are_current() {
    for (target, _, seeds, _) in TARGETS {
        let files = corpus(target);
        for (name, data) in seeds() {
            let file = files.iter().find(|f| f.0 == name);
            assert!(
                file.is_some_and(|f| f.1 == data),
                "fuzz/corpus/{target}/{name} is missing or stale: \
                 cargo test --test fuzz_replay -- --ignored write_seed_corpus"
            );
        }
    }
}

#[test]
#[ignore = "writes the seed corpus into the source tree"]
fn write_seed_corpus() {
    for (target, _, seeds, _) in TARGETS {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds() {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
