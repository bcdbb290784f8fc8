//! The initramfs `kiln run` boots: the agent as /init and the few nodes the
//! kernel and the agent need, as an uncompressed newc cpio (a compressed one
//! would be unpacked by guest kernel code, which some hosts interpret).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

/// One cpio entry.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    size: u32,
}

/// Writes a newc header and name, padded to 4 bytes.
fn header(w: &mut impl Write, ino: u32, e: &Entry) -> io::Result<()> {
    let namesize = u32::try_from(e.name.len() + 1).map_err(|_| io::ErrorKind::InvalidInput)?;
    write!(
        w,
        "070701{ino:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        e.mode, 0, 0, 1, 0, e.size, 0, 0, e.rdev.0, e.rdev.1, 0
    )?;
    w.write_all(e.name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + e.name.len() + 1)
}

fn pad(w: &mut impl Write, written: usize) -> io::Result<()> {
    let n = (4 - written % 4) % 4;
    w.write_all(&[0u8; 3][..n])
}

const DIR: u32 = 0o040_755;
const CHAR_DEV: u32 = 0o020_600;

/// The part of an ELF executable the kernel loads: everything up to the end
/// of the last segment, without section headers. Debug info, symbols and
/// section names lie past it, and they would be most of the initramfs (a
/// debug build of the agent is ~35 MB, its loadable part ~2 MB) that guest
/// kernel code copies at every boot. Anything that is not a 64-bit
/// little-endian ELF is returned whole.
fn loadable(mut elf: Vec<u8>) -> Vec<u8> {
    let Some((headers, table_end)) = crate::elf::program_headers(&elf) else {
        return elf;
    };
    let end = headers
        .iter()
        .map(|h| h.offset.saturating_add(h.filesz))
        .fold(table_end, u64::max);
    match usize::try_from(end) {
        Ok(end) if end <= elf.len() => {
            elf.truncate(end);
            // No section header table any more: e_shoff, e_shnum, e_shstrndx.
            elf[0x28..0x30].fill(0);
            elf[0x3c..0x40].fill(0);
            elf
        }
        _ => elf,
    }
}

/// Writes the initramfs to `out`: /init (the loadable part of `agent`),
/// /dev/console, and the directories the agent mounts on.
pub fn write(out: &Path, agent: &Path) -> io::Result<()> {
    let mut bytes = Vec::new();
    File::open(agent)?.read_to_end(&mut bytes)?;
    let init = loadable(bytes);
    let size = u32::try_from(init.len())
        .map_err(|_| io::Error::other("the agent binary is over 4 GiB"))?;
    let mut w = BufWriter::new(File::create(out)?);
    let mut ino = 1;
    let mut entry = |w: &mut BufWriter<File>, e: Entry| {
        ino += 1;
        header(w, ino, &e)
    };
    for name in ["dev", "proc", "sys", "kiln"] {
        entry(
            &mut w,
            Entry {
                name,
                mode: DIR,
                rdev: (0, 0),
                size: 0,
            },
        )?;
    }
    // The kernel opens it for init's stdio before anything is mounted.
    entry(
        &mut w,
        Entry {
            name: "dev/console",
            mode: CHAR_DEV,
            rdev: (5, 1),
            size: 0,
        },
    )?;
    entry(
        &mut w,
        Entry {
            name: "init",
            mode: 0o100_755,
            rdev: (0, 0),
            size,
        },
    )?;
    w.write_all(&init)?;
    pad(&mut w, init.len())?;
    entry(
        &mut w,
        Entry {
            name: "TRAILER!!!",
            mode: 0,
            rdev: (0, 0),
            size: 0,
        },
    )?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive lists what we wrote, as cpio (GNU) reads it back.
    #[test]
    fn cpio_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("kiln-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let agent = dir.join("agent");
        std::fs::write(&agent, b"#!agent\x00binary").unwrap();
        let out = dir.join("initramfs.cpio");
        write(&out, &agent).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let listing = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(File::open(&out).unwrap())
            .output()
            .expect("cpio (Debian's cpio package) lists the archive");
        let text = String::from_utf8_lossy(&listing.stdout);
        for name in ["dev", "proc", "sys", "kiln", "dev/console", "init"] {
            assert!(
                text.lines().any(|l| l.ends_with(&format!(" {name}"))),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("crw-------"), "{text}");
        let extract = dir.join("x");
        std::fs::create_dir_all(&extract).unwrap();
        let ok = std::process::Command::new("cpio")
            .args(["-i", "--quiet", "--no-absolute-filenames", "init"])
            .current_dir(&extract)
            .stdin(File::open(&out).unwrap())
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(
            std::fs::read(extract.join("init")).unwrap(),
            b"#!agent\x00binary"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The agent kiln ships is cut to its loadable part, and still runs.
    #[test]
    fn loadable_part_still_runs() {
        let dir = std::env::temp_dir().join(format!("kiln-loadable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Any ELF with section headers and symbols will do: this machine's `true`.
        let original = std::fs::read("/bin/true").unwrap();
        let cut = loadable(original.clone());
        assert!(cut.len() < original.len(), "nothing was cut");
        assert_eq!(&cut[0x28..0x30], &[0; 8]);
        let path = dir.join("true");
        std::fs::write(&path, &cut).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let status = std::process::Command::new(&path).status().unwrap();
        assert!(status.success());
        // Garbage and truncated headers come back unchanged.
        assert_eq!(loadable(b"\x7fELF\x02\x01".to_vec()), b"\x7fELF\x02\x01");
        let mut bad = original[..64].to_vec();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(loadable(bad.clone()), bad);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
