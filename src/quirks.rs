//! Host KVM backends that need the guest to be steered around them.
//!
//! On kvm_pvm (a nested, page-table-based KVM) guest kernel code is
//! interpreted by KVM's instruction emulator, which rejects some
//! instructions; a Linux guest avoids them with `noxsave` and `clearcpuid=`.
//! Without XSAVE the guest kernel cannot keep AVX state per process while
//! user code (native) still sees AVX, so glibc is told to stay off it.
//! kiln detects the backend at start and adds those options; on hardware KVM
//! the command line is left as the user wrote it.

use std::path::Path;

/// The module that serves /dev/kvm on such hosts.
pub const BACKEND_NAME: &str = "kvm_pvm";
const MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// The options a Linux guest needs there, and why each.
pub const PVM_GUEST_OPTIONS: &[(&str, &str)] = &[
    ("noxsave", "xsave/xrstor are not emulated"),
    (
        "clearcpuid=smap,smep,popcnt,cx16,rdpid,rdtscp,fsgsbase,movbe,bmi1,bmi2,abm,avx,avx2,avx512f,erms,fsrm,sha_ni,aes,pclmulqdq,rdrand,rdseed,adx,clwb,clflushopt",
        "clac/stac, popcnt, cmpxchg16b and others are not emulated",
    ),
    (
        "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load",
        "guest user code runs natively with the host's XCR0 while the noxsave kernel saves only \
         FXSAVE state on task switches, so AVX registers leak between processes; the kernel \
         passes this to init's environment and glibc stays off AVX",
    ),
];

/// True when /dev/kvm is served by kvm_pvm.
pub fn is_pvm_host() -> bool {
    Path::new(MODULE_PATH).exists()
}

/// What to append to `cmdline` on this host, if anything.
pub fn cmdline_additions(cmdline: &str) -> Option<String> {
    if !is_pvm_host() {
        return None;
    }
    additions_for(cmdline)
}

/// The options of [`PVM_GUEST_OPTIONS`] whose key the user did not set:
/// the user's own `noxsave` or `clearcpuid=` always wins.
///
/// ```
/// let extra = kiln::quirks::additions_for("console=ttyS0 clearcpuid=popcnt").unwrap();
/// assert!(extra.starts_with("noxsave GLIBC_TUNABLES="));
/// assert!(!extra.contains("clearcpuid"));
/// ```
pub fn additions_for(cmdline: &str) -> Option<String> {
    let keys: Vec<&str> = cmdline
        .split_whitespace()
        .map(|w| w.split('=').next().unwrap_or(w))
        .collect();
    let extra: Vec<&str> = PVM_GUEST_OPTIONS
        .iter()
        .map(|(opt, _)| *opt)
        .filter(|opt| {
            let key = opt.split('=').next().unwrap_or(opt);
            !keys.contains(&key)
        })
        .collect();
    (!extra.is_empty()).then(|| extra.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_every_option_to_a_plain_cmdline() {
        let a = additions_for("console=ttyS0 reboot=k").unwrap();
        assert!(a.starts_with("noxsave clearcpuid=smap,"), "{a}");
        assert!(a.contains(" GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"), "{a}");
    }

    #[test]
    fn user_options_win() {
        let a = additions_for("console=ttyS0 clearcpuid=popcnt GLIBC_TUNABLES=x").unwrap();
        assert_eq!(a, "noxsave");
        assert_eq!(
            additions_for("noxsave clearcpuid=cx16 GLIBC_TUNABLES=x"),
            None
        );
    }
}
