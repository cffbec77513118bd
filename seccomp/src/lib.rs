//! Seccomp profiles as data.
//!
//! A profile is JSON in the OCI `linux.seccomp` form with one addition: every rule carries a
//! `comment` saying why the calls it allows are needed. [`Profile::default_profile`] is the
//! profile every cloudfunc sandbox gets unless its owner picks another; [`Profile::validate`]
//! refuses a profile that allows a call which would let a function leave its sandbox, that
//! lacks a reason for a rule, or that does not deny by default.
//!
//! Running without a filter is not something this crate offers: a caller that wants it must
//! pass `None` where a profile is asked for, and say so.

use std::collections::BTreeSet;

use oci_spec::runtime::LinuxSeccomp;
use serde::{Deserialize, Serialize};

/// The default profile, embedded at build time.
pub const DEFAULT_PROFILE_JSON: &str = include_str!("../profiles/default.json");

/// Calls that no cloudfunc profile may allow: each can create or enter namespaces, change
/// mounts, reach the kernel's keyring or BPF, inspect other processes, or load code into the
/// kernel. (The filter's default action already denies them; listing them here makes the
/// validator catch a profile that allows one by mistake.)
pub const FORBIDDEN_SYSCALLS: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "quotactl",
    "fanotify_init",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "pidfd_getfd",
    "syslog",
    "personality",
    "mknod",
    "mknodat",
    "chown",
    "fchown",
    "fchownat",
    "lchown",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "capset",
];

/// Errors from loading or validating a profile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The profile is not valid JSON of the expected shape.
    #[error("the seccomp profile is not valid JSON in OCI linux.seccomp form")]
    Parse(#[source] serde_json::Error),
    /// The profile does not deny by default.
    #[error("the profile's default action is {0}; cloudfunc profiles must deny by default (SCMP_ACT_ERRNO or a kill action)")]
    DefaultAllows(String),
    /// A rule has no reason given.
    #[error("rule {index} ({names}) has no comment saying why it is allowed")]
    MissingComment { index: usize, names: String },
    /// A rule names no syscall.
    #[error("rule {0} names no syscall")]
    EmptyRule(usize),
    /// A call is allowed that must never be.
    #[error("the profile allows {0}, which would let a function leave its sandbox")]
    Forbidden(String),
    /// A call appears in two unconditional rules.
    #[error("{0} appears in more than one unconditional rule")]
    Duplicate(String),
    /// An action, architecture or operator name is not one OCI knows.
    #[error("the profile is not a valid OCI seccomp section")]
    NotOci(#[source] serde_json::Error),
    /// A rule needs an errno the runtime's filter cannot return.
    #[error("rule {index} ({names}) answers errno {errno}, but this runtime answers every filtered call with EPERM")]
    ErrnoUnsupported {
        index: usize,
        names: String,
        errno: u32,
    },
    /// The profile lists no architecture this build runs on.
    #[error("the profile lists no architecture for this machine ({0})")]
    NoNativeArch(&'static str),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// How a runtime reads the two values of an `SCMP_CMP_MASKED_EQ` comparison.
///
/// runc, crun and libseccomp itself take `value` as the mask and `valueTwo` as the datum.
/// youki's libcontainer 0.7 takes them the other way round, so a profile written for runc
/// would deny every `clone` there; the libcontainer backend asks for [`Dialect::ValueIsDatum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `value` is the mask (runc, crun, runsc, the OCI convention).
    ValueIsMask,
    /// `value` is the datum and `valueTwo` the mask (libcontainer 0.7).
    ValueIsDatum,
    /// gVisor's `runsc --oci-seccomp` (2022-12): `value` is the mask, and every
    /// `SCMP_ACT_ERRNO` answers EPERM whatever `errnoRet` says. A rule that answers ENOSYS for a
    /// call gVisor does not implement ([`GVISOR_UNIMPLEMENTED`]) becomes an allow, so the call
    /// reaches gVisor's kernel, which answers ENOSYS itself (so glibc still falls back from
    /// `clone3` to the filtered `clone`). Any other errno but EPERM cannot be expressed.
    Gvisor,
}

/// Calls gVisor's kernel (the Debian 2022-12 build) answers with ENOSYS, so a rule that gives
/// them ENOSYS means the same with or without the filter. The gVisor tests pin this.
pub const GVISOR_UNIMPLEMENTED: &[&str] = &["clone3"];

/// A seccomp profile with a reason on every rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// What the profile is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// What happens to a call no rule matches.
    pub default_action: String,
    /// The errno the default action returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    /// Architectures the filter covers (`SCMP_ARCH_*`).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// The rules, in order.
    pub syscalls: Vec<Rule>,
}

/// One rule: the calls it matches, what happens to them, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Why these calls get this action.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// Syscall names.
    pub names: Vec<String>,
    /// `SCMP_ACT_*`.
    pub action: String,
    /// The errno for an `SCMP_ACT_ERRNO` action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    /// Argument conditions; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<ArgCondition>,
}

/// A condition on one argument of a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArgCondition {
    /// Which argument (0-based).
    pub index: usize,
    /// The value compared with (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The second value (the datum for `SCMP_CMP_MASKED_EQ`).
    #[serde(default)]
    pub value_two: u64,
    /// `SCMP_CMP_*`.
    pub op: String,
}

/// The `SCMP_ARCH_*` name of the machine this was built for.
pub const fn native_arch() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "SCMP_ARCH_X86_64"
    } else if cfg!(target_arch = "aarch64") {
        "SCMP_ARCH_AARCH64"
    } else {
        "SCMP_ARCH_NATIVE"
    }
}

impl Profile {
    /// The embedded default profile, already validated by this crate's tests.
    pub fn default_profile() -> Profile {
        Profile::from_json(DEFAULT_PROFILE_JSON).expect("the embedded default profile is valid")
    }

    /// Parses and validates a profile.
    pub fn from_json(text: &str) -> Result<Profile> {
        let profile: Profile = serde_json::from_str(text).map_err(Error::Parse)?;
        profile.validate()?;
        Ok(profile)
    }

    /// Checks the rules that every cloudfunc profile must keep.
    pub fn validate(&self) -> Result<()> {
        let denies = self.default_action.starts_with("SCMP_ACT_ERRNO")
            || self.default_action.starts_with("SCMP_ACT_KILL");
        if !denies {
            return Err(Error::DefaultAllows(self.default_action.clone()));
        }
        if !self.architectures.iter().any(|a| a == native_arch()) {
            return Err(Error::NoNativeArch(native_arch()));
        }
        let mut unconditional = BTreeSet::new();
        for (index, rule) in self.syscalls.iter().enumerate() {
            if rule.names.is_empty() {
                return Err(Error::EmptyRule(index));
            }
            if rule.comment.trim().is_empty() {
                return Err(Error::MissingComment {
                    index,
                    names: rule.names.join(","),
                });
            }
            for name in &rule.names {
                if rule.allows() && FORBIDDEN_SYSCALLS.contains(&name.as_str()) {
                    return Err(Error::Forbidden(name.clone()));
                }
                if rule.args.is_empty() && !unconditional.insert(name.as_str()) {
                    return Err(Error::Duplicate(name.clone()));
                }
            }
        }
        self.to_oci(Dialect::ValueIsMask).map(|_| ())
    }

    /// Every call some rule allows, with or without conditions.
    pub fn allowed_names(&self) -> BTreeSet<&str> {
        self.syscalls
            .iter()
            .filter(|r| r.allows())
            .flat_map(|r| r.names.iter().map(String::as_str))
            .collect()
    }

    /// The profile as an OCI `linux.seccomp` section for this machine's architecture, with
    /// masked comparisons written the way `dialect` reads them. Fails only for a profile that
    /// [`Profile::validate`] would refuse.
    pub fn to_oci(&self, dialect: Dialect) -> Result<LinuxSeccomp> {
        let mut profile = self.clone();
        profile.architectures.retain(|a| a == native_arch());
        if dialect == Dialect::Gvisor {
            profile.errno_for_gvisor()?;
        }
        for rule in &mut profile.syscalls {
            rule.comment.clear();
            for arg in &mut rule.args {
                if dialect == Dialect::ValueIsDatum && arg.op == "SCMP_CMP_MASKED_EQ" {
                    std::mem::swap(&mut arg.value, &mut arg.value_two);
                }
            }
        }
        profile.comment.clear();
        let value = serde_json::to_value(&profile).map_err(Error::NotOci)?;
        serde_json::from_value(value).map_err(Error::NotOci)
    }
}

impl Profile {
    /// Rewrites the rules whose errno runsc would not honour (see [`Dialect::Gvisor`]).
    fn errno_for_gvisor(&mut self) -> Result<()> {
        // Linux's numbers (the same on every architecture this crate knows).
        const EPERM: u32 = 1;
        const ENOSYS: u32 = 38;
        for (index, rule) in self.syscalls.iter_mut().enumerate() {
            if rule.action != "SCMP_ACT_ERRNO" {
                continue;
            }
            match rule.errno_ret {
                None | Some(EPERM) => {}
                Some(ENOSYS)
                    if rule
                        .names
                        .iter()
                        .all(|n| GVISOR_UNIMPLEMENTED.contains(&n.as_str())) =>
                {
                    rule.action = "SCMP_ACT_ALLOW".into();
                    rule.errno_ret = None;
                }
                Some(errno) => {
                    return Err(Error::ErrnoUnsupported {
                        index,
                        names: rule.names.join(","),
                        errno,
                    })
                }
            }
        }
        Ok(())
    }
}

impl Rule {
    fn allows(&self) -> bool {
        self.action == "SCMP_ACT_ALLOW" || self.action == "SCMP_ACT_LOG"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_valid_and_converts() {
        let profile = Profile::default_profile();
        let oci = profile.to_oci(Dialect::ValueIsMask).unwrap();
        assert_eq!(oci.architectures().as_ref().map(Vec::len), Some(1));
        assert!(oci
            .syscalls()
            .as_ref()
            .is_some_and(|s| s.len() == profile.syscalls.len()));
    }

    #[test]
    fn every_allowed_name_is_a_real_syscall_here() {
        let profile = Profile::default_profile();
        for name in profile.allowed_names() {
            assert!(
                libseccomp::ScmpSyscall::from_name_by_arch(name, libseccomp::ScmpArch::X8664)
                    .is_ok(),
                "{name} is not a syscall libseccomp knows on x86_64"
            );
        }
        for name in FORBIDDEN_SYSCALLS {
            assert!(
                libseccomp::ScmpSyscall::from_name_by_arch(name, libseccomp::ScmpArch::X8664)
                    .is_ok(),
                "forbidden list names {name}, which is no x86_64 syscall"
            );
        }
    }

    #[test]
    fn the_sandbox_escapes_stay_denied() {
        let allowed = Profile::default_profile();
        let allowed = allowed.allowed_names();
        for name in [
            "mount",
            "unshare",
            "keyctl",
            "bpf",
            "ptrace",
            "setns",
            "io_uring_setup",
        ] {
            assert!(!allowed.contains(name), "{name} must not be allowed");
        }
        // What the bootstraps were measured to need.
        for name in [
            "read",
            "write",
            "mmap",
            "futex",
            "execve",
            "wait4",
            "epoll_pwait",
            "clone",
        ] {
            assert!(
                allowed.contains(name),
                "{name} is needed by python3 or node"
            );
        }
    }

    #[test]
    fn validator_refuses_bad_profiles() {
        let base = Profile::default_profile();

        let mut p = base.clone();
        p.default_action = "SCMP_ACT_ALLOW".into();
        assert!(matches!(p.validate(), Err(Error::DefaultAllows(_))));

        let mut p = base.clone();
        p.syscalls[0].comment.clear();
        assert!(matches!(
            p.validate(),
            Err(Error::MissingComment { index: 0, .. })
        ));

        let mut p = base.clone();
        p.syscalls[0].names.push("ptrace".into());
        assert!(matches!(p.validate(), Err(Error::Forbidden(n)) if n == "ptrace"));

        let mut p = base.clone();
        p.syscalls[0].names.push("read".into());
        assert!(matches!(p.validate(), Err(Error::Duplicate(n)) if n == "read"));

        let mut p = base.clone();
        p.architectures = vec!["SCMP_ARCH_S390X".into()];
        assert!(matches!(p.validate(), Err(Error::NoNativeArch(_))));

        let mut p = base.clone();
        p.syscalls[0].action = "SCMP_ACT_MAYBE".into();
        assert!(matches!(p.validate(), Err(Error::NotOci(_))));

        assert!(matches!(Profile::from_json("{"), Err(Error::Parse(_))));
    }

    #[test]
    fn dialect_swaps_only_masked_comparisons() {
        let profile = Profile::default_profile();
        let find = |oci: &LinuxSeccomp, name: &str| {
            oci.syscalls()
                .as_ref()
                .unwrap()
                .iter()
                .find(|s| s.names().iter().any(|n| n == name))
                .and_then(|s| s.args().clone())
                .unwrap()[0]
        };
        let runc = profile.to_oci(Dialect::ValueIsMask).unwrap();
        let youki = profile.to_oci(Dialect::ValueIsDatum).unwrap();
        assert_eq!(find(&runc, "clone").value(), 0x7E02_0000);
        assert_eq!(find(&runc, "clone").value_two(), Some(0));
        assert_eq!(find(&youki, "clone").value(), 0);
        assert_eq!(find(&youki, "clone").value_two(), Some(0x7E02_0000));
        assert_eq!(
            find(&youki, "socket").value(),
            find(&runc, "socket").value()
        );
    }

    #[test]
    fn gvisor_dialect_lets_unimplemented_calls_reach_the_sentry() {
        let profile = Profile::default_profile();
        let gvisor = profile.to_oci(Dialect::Gvisor).unwrap();
        let clone3 = gvisor
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|r| r.names().iter().any(|n| n == "clone3"))
            .unwrap();
        assert_eq!(format!("{:?}", clone3.action()), "ScmpActAllow");
        assert_eq!(clone3.errno_ret(), None);
        // Masked comparisons are read as runc reads them.
        let runc = profile.to_oci(Dialect::ValueIsMask).unwrap();
        let clone_of = |s: &LinuxSeccomp| {
            s.syscalls()
                .as_ref()
                .unwrap()
                .iter()
                .find(|r| r.names() == &["clone".to_string()])
                .cloned()
        };
        assert_eq!(clone_of(&gvisor), clone_of(&runc));
    }

    #[test]
    fn gvisor_dialect_refuses_errnos_it_cannot_return() {
        let mut profile = Profile::default_profile();
        profile.syscalls.push(Rule {
            comment: "answer EACCES".into(),
            names: vec!["ptrace".into()],
            action: "SCMP_ACT_ERRNO".into(),
            errno_ret: Some(13),
            args: Vec::new(),
        });
        let err = profile.to_oci(Dialect::Gvisor).unwrap_err();
        assert!(
            matches!(err, Error::ErrnoUnsupported { errno: 13, .. }),
            "{err}"
        );
        assert!(profile.to_oci(Dialect::ValueIsMask).is_ok());
        // ENOSYS for a call gVisor does implement would silently become EPERM: refused too.
        profile.syscalls.last_mut().unwrap().errno_ret = Some(38);
        assert!(profile.to_oci(Dialect::Gvisor).is_err());
    }
}
