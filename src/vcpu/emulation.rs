//! KVM emulation failures (KVM_EXIT_INTERNAL_ERROR, suberror 1).
//!
//! Some KVM backends (kvm_pvm, see README) interpret guest kernel code and
//! reject a few instructions. kiln decodes the instruction bytes KVM reports,
//! completes the two a Linux guest cannot avoid (INT3 and FWAIT), and turns
//! every other into a report naming the instruction and the kernel
//! command-line option that steers a guest around it.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};

/// KVM_INTERNAL_ERROR_EMULATION (include/uapi/linux/kvm.h).
pub const SUBERROR_EMULATION: u32 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes of an emulation failure, from `internal.data`:
/// data[0] is flags, then a length byte and up to 15 bytes from data[1] on.
pub fn instruction_bytes(suberror: u32, ndata: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != SUBERROR_EMULATION || ndata < 2 {
        return None;
    }
    if data.first()? & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data
        .iter()
        .skip(1)
        .take(2)
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let len = usize::from(*raw.first()?).min(15);
    raw.get(1..1 + len).map(<[u8]>::to_vec)
}

/// What the vCPU loop does about a failed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// INT3: step over it (`len` bytes) and inject #BP.
    Breakpoint { len: u64 },
    /// FWAIT: step over it (`len` bytes); no x87 state to wait for.
    Fwait { len: u64 },
    /// Anything else: the VM stops with this description.
    Fail(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Disassembly (Intel syntax), or "unknown" when the bytes are missing.
    pub instruction: String,
    pub bytes: Vec<u8>,
    /// The kernel command-line option that avoids it, if there is one.
    pub avoid_with: Option<&'static str>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.instruction)?;
        if !self.bytes.is_empty() {
            let hex: Vec<String> = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, " (bytes {})", hex.join(" "))?;
        }
        Ok(())
    }
}

impl Failure {
    /// How to avoid the instruction, as a sentence, or "".
    pub fn hint(&self) -> String {
        match self.avoid_with {
            Some(opt) => format!(
                "; a Linux guest avoids it with `{opt}` on its command line (boot-source.boot_args)"
            ),
            None => String::new(),
        }
    }
}

/// The option that makes Linux stop using an instruction KVM cannot emulate.
pub fn avoid_with(m: Mnemonic) -> Option<&'static str> {
    use Mnemonic::*;
    Some(match m {
        Xsave | Xsave64 | Xrstor | Xrstor64 | Xsaves | Xsaves64 | Xrstors | Xrstors64
        | Xsaveopt | Xsaveopt64 | Xsavec | Xsavec64 | Xgetbv | Xsetbv => "noxsave",
        Clac | Stac => "clearcpuid=smap",
        Popcnt => "clearcpuid=popcnt",
        Cmpxchg16b => "clearcpuid=cx16",
        Rdpid => "clearcpuid=rdpid",
        Rdtscp => "clearcpuid=rdtscp",
        Rdfsbase | Rdgsbase | Wrfsbase | Wrgsbase => "clearcpuid=fsgsbase",
        Movbe => "clearcpuid=movbe",
        Andn | Bextr | Blsi | Blsmsk | Blsr | Tzcnt => "clearcpuid=bmi1",
        Bzhi | Mulx | Pdep | Pext | Rorx | Sarx | Shlx | Shrx => "clearcpuid=bmi2",
        Lzcnt => "clearcpuid=abm",
        Rdrand => "clearcpuid=rdrand",
        Rdseed => "clearcpuid=rdseed",
        Adcx | Adox => "clearcpuid=adx",
        Clwb => "clearcpuid=clwb",
        Clflushopt => "clearcpuid=clflushopt",
        Aesenc | Aesenclast | Aesdec | Aesdeclast | Aesimc | Aeskeygenassist => "clearcpuid=aes",
        Pclmulqdq => "clearcpuid=pclmulqdq",
        Sha1rnds4 | Sha1nexte | Sha1msg1 | Sha1msg2 | Sha256rnds2 | Sha256msg1 | Sha256msg2 => {
            "clearcpuid=sha_ni"
        }
        _ => return None,
    })
}

fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Decides what to do about the failed instruction `bytes` at `rip`, in a
/// code segment of `bitness` (16, 32 or 64).
pub fn classify(bytes: &[u8], bitness: u32, rip: u64) -> Action {
    let Some(insn) = decode(bytes, bitness, rip) else {
        return Action::Fail(Failure {
            instruction: if bytes.is_empty() {
                "unknown (KVM gave no instruction bytes)".into()
            } else {
                "undecodable".into()
            },
            bytes: bytes.to_vec(),
            avoid_with: None,
        });
    };
    let len = insn.len() as u64;
    match insn.mnemonic() {
        Mnemonic::Int3 => return Action::Breakpoint { len },
        Mnemonic::Wait => return Action::Fwait { len },
        _ => {}
    }
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    Action::Fail(Failure {
        instruction: text,
        bytes: bytes.get(..insn.len()).unwrap_or(bytes).to_vec(),
        avoid_with: avoid_with(insn.mnemonic()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(bytes: &[u8]) -> [u64; 16] {
        let mut raw = vec![u8::try_from(bytes.len()).unwrap()];
        raw.extend_from_slice(bytes);
        raw.resize(16, 0);
        let mut data = [0u64; 16];
        data[0] = FLAG_INSTRUCTION_BYTES;
        data[1] = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        data[2] = u64::from_le_bytes(raw[8..16].try_into().unwrap());
        data
    }

    #[test]
    fn unpacks_instruction_bytes() {
        let data = pack(&[0x0f, 0xae, 0x2f]);
        assert_eq!(instruction_bytes(1, 3, &data), Some(vec![0x0f, 0xae, 0x2f]));
        assert_eq!(instruction_bytes(2, 3, &data), None, "other suberror");
        let mut no_flag = data;
        no_flag[0] = 0;
        assert_eq!(instruction_bytes(1, 3, &no_flag), None);
        assert_eq!(instruction_bytes(1, 1, &data), None, "ndata too small");
        let mut huge = pack(&[0x90; 15]);
        huge[1] = (huge[1] & !0xff) | 0xff; // length byte 255
        assert_eq!(instruction_bytes(1, 3, &huge).unwrap().len(), 15);
    }

    #[test]
    fn int3_and_fwait_are_completed() {
        assert_eq!(classify(&[0xcc], 64, 0x1000), Action::Breakpoint { len: 1 });
        assert_eq!(classify(&[0x9b], 64, 0x1000), Action::Fwait { len: 1 });
        assert_eq!(
            classify(&[0x9b, 0x90], 32, 0x1000),
            Action::Fwait { len: 1 }
        );
    }

    #[test]
    fn xrstor_names_noxsave() {
        let Action::Fail(f) = classify(&[0x48, 0x0f, 0xae, 0x2f], 64, 0) else {
            panic!("not a failure")
        };
        assert!(f.instruction.starts_with("xrstor64"), "{}", f.instruction);
        assert_eq!(f.avoid_with, Some("noxsave"));
        let text = f.to_string() + &f.hint();
        assert!(
            text.contains("48 0f ae 2f") && text.contains("noxsave"),
            "{text}"
        );
    }

    #[test]
    fn known_instructions_and_their_options() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x0f, 0x01, 0xca], "clearcpuid=smap"), // clac
            (&[0xf3, 0x48, 0x0f, 0xb8, 0xc0], "clearcpuid=popcnt"),
            (&[0x48, 0x0f, 0xc7, 0x0f], "clearcpuid=cx16"), // cmpxchg16b [rdi]
        ];
        for (bytes, opt) in cases {
            match classify(bytes, 64, 0) {
                Action::Fail(f) => assert_eq!(f.avoid_with, Some(*opt), "{}", f.instruction),
                a => panic!("{a:?}"),
            }
        }
    }

    #[test]
    fn garbage_and_empty_bytes_fail_cleanly() {
        assert!(matches!(classify(&[], 64, 0), Action::Fail(_)));
        assert!(matches!(
            classify(&[0x0f, 0x0b], 64, 0),
            Action::Fail(Failure {
                avoid_with: None,
                ..
            })
        ));
        assert!(matches!(classify(&[0x0f], 64, 0), Action::Fail(_)));
    }
}
