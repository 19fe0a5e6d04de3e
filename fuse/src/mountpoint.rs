//! Mount points: mounting FUSE ourselves (type `fuse.twinfs`, shared propagation), and telling
//! a live twinfs mount from a dead one (its process killed) from no mount at all.
//!
//! Why mount ourselves instead of letting fuser do it: fuser opens the mount point first, which
//! fails on a dead FUSE mount ("Transport endpoint is not connected"), and it mounts as plain
//! `fuse`. A restarted agent must mount *over* the dead mount: pods that bound the old mount
//! (Kubernetes hostPath with HostToContainer propagation) hold a slave copy of it, and only a
//! mount stacked on it propagates into their copy; a fresh mount beside it would never reach them.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::MsFlags;

/// The filesystem type twinfs mounts show in /proc/mounts (what `mount -t` and fstab use).
pub const FS_TYPE: &str = "fuse.twinfs";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// A twinfs mount that answers.
    Live,
    /// A twinfs mount whose process is gone: every access fails with ENOTCONN.
    Dead,
}

/// `path` made absolute without touching the last component (which may be a dead mount that
/// cannot be stat'ed, so `canonicalize` of the whole path would fail).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no directory", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("mount point {}", path.display()))?;
    Ok(parent.join(name))
}

/// How many twinfs mounts are stacked at `path` (from /proc/self/mountinfo).
pub fn twinfs_mounts_at(path: &Path) -> usize {
    let Ok(abs) = absolute(path) else {
        return 0;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    count_twinfs_mounts(&info, &abs)
}

/// Counts mountinfo lines for a twinfs mount at `abs`: mount point (field 5, spaces escaped as
/// \040) and, after the "-" separator, type fuse/fuse.twinfs with source twinfs:VOLUME.
fn count_twinfs_mounts(mountinfo: &str, abs: &Path) -> usize {
    let want = abs.to_string_lossy().replace(' ', "\\040");
    mountinfo
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                return false;
            };
            fields.get(4) == Some(&want.as_str())
                && fields
                    .get(sep + 1)
                    .is_some_and(|t| *t == "fuse" || *t == FS_TYPE)
                && fields
                    .get(sep + 2)
                    .is_some_and(|s| s.starts_with("twinfs:"))
        })
        .count()
}

/// The device number (`major:minor`) of the topmost twinfs mount at `path`.
pub fn device_of(path: &Path) -> Option<String> {
    let abs = absolute(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    device_in(&info, &abs)
}

/// The last (topmost) mountinfo line of a twinfs mount at `abs`: its field 3.
fn device_in(mountinfo: &str, abs: &Path) -> Option<String> {
    mountinfo
        .lines()
        .rfind(|l| count_twinfs_mounts(l, abs) == 1)
        .and_then(|l| l.split(' ').nth(2))
        .map(str::to_string)
}

/// Sets the kernel's read-ahead for the twinfs mount at `path` (its backing device in sysfs).
/// FUSE offers 128 KiB at INIT and a filesystem cannot ask for more there; a larger window
/// makes the kernel send 1 MiB reads several at a time. Call once the mount has answered a
/// request (INIT processed), or INIT would lower it again.
pub fn set_read_ahead(path: &Path, kib: u32) -> Result<()> {
    let dev = device_of(path).with_context(|| format!("no twinfs mount at {}", path.display()))?;
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    std::fs::write(&knob, kib.to_string()).with_context(|| format!("writing {knob}"))
}

/// Whether `path` is a live twinfs mount, a dead one, or no twinfs mount.
pub fn state(path: &Path) -> MountState {
    if twinfs_mounts_at(path) == 0 {
        return MountState::NotMounted;
    }
    // Opening the directory always reaches the FUSE process; a stat may be answered from the
    // kernel's attribute cache for a while after the process died.
    match std::fs::read_dir(path) {
        Ok(_) => MountState::Live,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => MountState::Dead,
        // Anything else (EACCES...) still means a process answered.
        Err(_) => MountState::Live,
    }
}

/// Mounts a FUSE filesystem of `volume` at `path` with mount(2) and returns the /dev/fuse
/// descriptor, the kernel's INIT request waiting on it. `None` when mount(2) is not permitted
/// (not root): the caller falls back to fusermount3.
pub fn mount_fuse(path: &Path, volume: &str) -> Result<Option<OwnedFd>> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .context(
            "opening /dev/fuse (is the fuse module loaded, and /dev/fuse in this container?)",
        )?;
    // rootmode only carries the file type of the root (a directory); its permissions come from
    // our getattr. allow_other: every user and pod on the host uses the mount; permissions are
    // checked by the kernel (default_permissions) against the modes we store.
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let source = format!("twinfs:{volume}");
    match nix::mount::mount(
        Some(source.as_str()),
        path,
        Some(FS_TYPE),
        MsFlags::MS_NOATIME,
        Some(data.as_str()),
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::EPERM) => return Ok(None),
        Err(e) => bail!("mount(2) of {} failed: {e}", path.display()),
    }
    // Shared, so a later restart's mount stacked on this one reaches every copy that was bound
    // from it (a bind of a private mount would never see it).
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        tracing::warn!(error = %e, path = %path.display(), "could not make the mount shared");
    }
    Ok(Some(OwnedFd::from(dev)))
}

/// Aborts the FUSE connection of the top mount at `path` through fusectl
/// (/sys/fs/fuse/connections/<minor>/abort): every later request fails with ENOTCONN, as after
/// a crash. Best effort: without fusectl the connection ends when the process exits.
pub fn abort_connection(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let dev = meta.dev();
    // glibc's minor(): the low 8 bits and bits 20..32.
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    let connections = Path::new("/sys/fs/fuse/connections");
    if !connections.join(minor.to_string()).exists() {
        // fusectl is not mounted everywhere (containers, minimal hosts): mount it.
        let _ = nix::mount::mount(
            Some("fusectl"),
            connections,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    if let Err(e) = std::fs::write(&abort, b"1") {
        tracing::debug!(error = %e, file = %abort, "could not abort the FUSE connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_matched_by_path_type_and_source() {
        let info = "\
36 25 0:32 / /mnt/a rw,noatime shared:1 - fuse.twinfs twinfs:uploads rw,user_id=0
37 36 0:33 / /mnt/a rw,noatime shared:2 - fuse.twinfs twinfs:uploads rw,user_id=0
38 25 0:34 / /mnt/b rw - fuse other rw
39 25 0:35 / /mnt/with\\040space rw - fuse twinfs:x rw
40 25 0:36 / /mnt/c rw - tmpfs twinfs:fake rw
";
        assert_eq!(count_twinfs_mounts(info, Path::new("/mnt/a")), 2);
        assert_eq!(count_twinfs_mounts(info, Path::new("/mnt/b")), 0);
        assert_eq!(count_twinfs_mounts(info, Path::new("/mnt/with space")), 1);
        assert_eq!(count_twinfs_mounts(info, Path::new("/mnt/c")), 0);
        assert_eq!(
            count_twinfs_mounts("garbage\n\n- -", Path::new("/mnt/a")),
            0
        );
        // The topmost of two stacked mounts (a new one over a dead one) is the last line.
        assert_eq!(
            device_in(info, Path::new("/mnt/a")).as_deref(),
            Some("0:33")
        );
        assert_eq!(device_in(info, Path::new("/mnt/b")), None);
    }

    #[test]
    fn absolute_keeps_the_last_component_unresolved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("not-yet");
        assert_eq!(
            absolute(&p).expect("absolute"),
            dir.path().canonicalize().expect("canon").join("not-yet")
        );
        assert!(absolute(Path::new("/")).is_err());
    }
}
