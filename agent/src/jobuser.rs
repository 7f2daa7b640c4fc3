//! Who a job runs as. The agent holds the instance role (through IMDS), the
//! configuration's secrets (`worker.env`) and the right to end its own
//! instance; a job runs whatever its message makes it run. So an exec-mode
//! job runs as another, unprivileged user (`worker.user`, by default
//! `spotguard-job`, which the package creates): it cannot read
//! `agent.toml`, signal the agent, or reach IMDS (the package's nftables
//! rule matches its uid), and it inherits none of the agent's capabilities.

use std::io;

/// The user a job is switched to before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Every group the job holds: the user's own, then `worker.groups`.
    /// Only these: the agent's own groups (the one that reads `agent.toml`)
    /// are dropped.
    pub groups: Vec<u32>,
}

/// The dedicated user the packages create for jobs.
pub const DEFAULT_JOB_USER: &str = "spotguard-job";

/// Linux capability numbers (`linux/capability.h`).
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// Whether this process may switch a child to another user: root, or the
/// packaged unit's `AmbientCapabilities=CAP_SETUID CAP_SETGID`.
pub fn can_switch() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective_caps(&s))
        .is_some_and(|caps| caps & (1 << CAP_SETUID) != 0 && caps & (1 << CAP_SETGID) != 0)
}

/// `CapEff:` of a `/proc/<pid>/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Resolves `worker.user` and `worker.groups`. `None` is "run jobs as the
/// agent's own user": chosen when `user` is unset and either the agent may
/// not switch users (a developer's shell) or `spotguard-job` does not exist
/// (the agent warns at start if it is root), or when `user` names the
/// agent's own user. An explicit user that does not exist, or that the
/// agent may not switch to, is a configuration error, not a silent root.
pub fn resolve(user: Option<&str>, groups: &[String]) -> Result<Option<JobUser>, String> {
    let switch = can_switch();
    let name = match user {
        Some(u) => u,
        None if !switch => return Ok(None),
        None => DEFAULT_JOB_USER,
    };
    let found = nix::unistd::User::from_name(name)
        .map_err(|e| format!("worker.user: cannot look up {name:?}: {e}"))?;
    let Some(found) = found else {
        return match user {
            Some(_) => Err(format!("worker.user: no user named {name:?} on this host")),
            None => Ok(None),
        };
    };
    let uid = found.uid.as_raw();
    if uid == nix::unistd::geteuid().as_raw() {
        return Ok(None);
    }
    if uid == 0 {
        // The agent may switch users: a root job would keep what it holds,
        // and the IMDS rule matches the job user only.
        return Err(format!(
            "worker.user: {name:?} is root; jobs run as an unprivileged user"
        ));
    }
    if !switch {
        return Err(format!(
            "worker.user: the agent (uid {}) may not switch jobs to {name:?}: run it as root or with CAP_SETUID and CAP_SETGID (the packaged unit does)",
            nix::unistd::geteuid()
        ));
    }
    let gid = found.gid.as_raw();
    let mut all = vec![gid];
    for g in groups {
        let gid = nix::unistd::Group::from_name(g)
            .map_err(|e| format!("worker.groups: cannot look up {g:?}: {e}"))?
            .ok_or_else(|| format!("worker.groups: no group named {g:?} on this host"))?
            .gid
            .as_raw();
        // Root's group, or the agent's (it reads agent.toml): never a job's.
        if gid == 0 || gid == nix::unistd::getegid().as_raw() {
            return Err(format!(
                "worker.groups: {g:?} is root's or the agent's own group; jobs may not hold it"
            ));
        }
        if !all.contains(&gid) {
            all.push(gid);
        }
    }
    Ok(Some(JobUser {
        name: name.to_string(),
        uid,
        gid,
        groups: all,
    }))
}

/// What the child does between fork and exec, in this order: its OOM
/// score raised (so the kernel's OOM killer takes a job before the agent:
/// raising needs no privilege), then, if it switches, its groups, gid and
/// uid, and a umask that leaves its files to its group (the agent, a member,
/// reads the checkpoint and removes the job's directory); last, every
/// capability dropped (ambient, effective, permitted, inheritable), so none
/// of the agent's reaches the job through exec (a switch between two
/// non-root users keeps them otherwise: capabilities(7)). Only
/// async-signal-safe calls: no allocation here.
pub fn prepare_child(
    cmd: &mut tokio::process::Command,
    user: Option<&JobUser>,
    oom_score_adj: i16,
) {
    let oom = oom_text(oom_score_adj);
    let switch = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    let drop_caps = user.is_some() || !nix::unistd::geteuid().is_root();
    // SAFETY: the closure only makes system calls on data allocated before
    // the fork (async-signal-safe), as `pre_exec` requires.
    unsafe {
        cmd.pre_exec(move || {
            let (buf, len) = &oom;
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, buf.as_ptr().cast(), *len);
                libc::close(fd);
            }
            if let Some((uid, gid, groups)) = &switch {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                libc::umask(0o007);
            }
            if drop_caps {
                drop_capabilities()
            } else {
                Ok(())
            }
        });
    }
}

/// Runs a helper (`health.command`, `notify.hook_command`) without the
/// agent's capabilities: they would otherwise reach it through exec (the
/// ambient set), and CAP_SETUID is root to whoever holds it. An agent that
/// runs as root keeps its helpers root (its operator's choice).
pub fn without_capabilities(cmd: &mut tokio::process::Command) {
    if nix::unistd::geteuid().is_root() {
        return;
    }
    // SAFETY: only system calls on stack data (async-signal-safe).
    unsafe {
        cmd.pre_exec(drop_capabilities);
    }
}

/// Empties the calling process's ambient, effective, permitted and
/// inheritable capability sets. Clearing ambient alone is not enough: a
/// switch between two non-root users keeps permitted and inheritable
/// (capabilities(7)), and a program with file-inheritable capabilities
/// would get them back through exec. Async-signal-safe (for `pre_exec`).
fn drop_capabilities() -> io::Result<()> {
    // SAFETY: prctl and capset with valid pointers to stack data.
    unsafe {
        // EINVAL: a kernel before 4.3 has no ambient set, so nothing to clear.
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let none = [
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &header as *const Header, none.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The decimal text of an OOM score adjustment, in a fixed buffer (the
/// child may not allocate).
fn oom_text(v: i16) -> ([u8; 8], usize) {
    let s = v.clamp(-1000, 1000).to_string();
    let mut buf = [0u8; 8];
    buf[..s.len()].copy_from_slice(s.as_bytes());
    (buf, s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_caps_are_read_from_the_status_text() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t00000000000000c0\n";
        let caps = effective_caps(s).unwrap();
        assert_eq!(caps, 0xc0);
        assert!(caps & (1 << CAP_SETUID) != 0 && caps & (1 << CAP_SETGID) != 0);
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn oom_text_is_the_decimal_value_within_the_kernels_range() {
        let (b, n) = oom_text(500);
        assert_eq!(&b[..n], b"500");
        let (b, n) = oom_text(-2000);
        assert_eq!(&b[..n], b"-1000");
    }

    #[test]
    fn an_explicit_user_that_does_not_exist_is_refused_by_name() {
        let e = resolve(Some("no-such-user-spotguard"), &[]).unwrap_err();
        assert_eq!(
            e,
            "worker.user: no user named \"no-such-user-spotguard\" on this host"
        );
    }

    #[test]
    fn a_group_that_does_not_exist_is_refused_by_name() {
        if !can_switch() {
            eprintln!("skipped: this test needs root or CAP_SETUID to switch users");
            return;
        }
        let e = resolve(Some("nobody"), &["no-such-group-spotguard".into()]).unwrap_err();
        assert_eq!(
            e,
            "worker.groups: no group named \"no-such-group-spotguard\" on this host"
        );
    }

    #[test]
    fn the_agents_own_user_needs_no_switch() {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap();
        assert_eq!(resolve(Some(&me.name), &[]).unwrap(), None);
    }
}
