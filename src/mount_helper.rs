//! `mount.fuse.twinfs`: the helper mount(8) runs for `mount -t fuse.twinfs VOLUME DIR -o OPTS`
//! and for /etc/fstab lines of type fuse.twinfs. Install it as a link to the twinfs binary:
//! `ln -s /usr/local/bin/twinfs /sbin/mount.fuse.twinfs`.
//!
//! mount(8) calls `mount.fuse.twinfs SOURCE DIR [-o OPTIONS] [-n] [-s] [-f] [-v] [-r] [-w]`;
//! this turns that into `twinfs [--cluster F] [--etcd URL].. [--tls-dir D] mount VOLUME DIR ..`.

use anyhow::{bail, Result};

/// Whether the program was started under the helper's name.
pub fn invoked_as_helper(argv0: &str) -> bool {
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    name == "mount.fuse.twinfs" || name == "mount.twinfs"
}

/// Options mount(8) and fstab pass that are not ours to act on (the kernel mount gets its own).
fn is_generic(opt: &str) -> bool {
    matches!(
        opt,
        "" | "rw"
            | "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "_netdev"
            | "nofail"
            | "suid"
            | "nosuid"
            | "dev"
            | "nodev"
            | "exec"
            | "noexec"
            | "atime"
            | "noatime"
            | "relatime"
            | "async"
            | "allow_other"
            | "default_permissions"
    ) || opt.starts_with("x-")
        || opt.starts_with("comment=")
}

/// The `twinfs` command line equivalent to a helper invocation (`args` without argv[0]).
pub fn translate(args: &[String]) -> Result<Vec<String>> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => match it.next() {
                Some(o) => options.extend(o.split(',').map(str::to_string)),
                None => bail!("-o needs a value"),
            },
            // -n: no mtab; -s: sloppy; -f: fake; -v: verbose; -w: read-write. Nothing to do.
            "-n" | "-s" | "-v" | "-w" => {}
            "-f" => bail!("-f (fake mount) is not supported"),
            "-r" => bail!("read-only mounts are not supported yet"),
            o if o.starts_with("-o") && o.len() > 2 => {
                options.extend(o[2..].split(',').map(str::to_string))
            }
            o if o.starts_with('-') => bail!("unknown flag {o}"),
            p => positional.push(p.to_string()),
        }
    }
    let [source, dir] = positional.as_slice() else {
        bail!("usage: mount.fuse.twinfs VOLUME DIR [-o etcd=URL,tls_dir=DIR,...]");
    };
    let volume = source.strip_prefix("twinfs:").unwrap_or(source);
    let mut global = vec!["twinfs".to_string()];
    let mut local = vec!["mount".to_string(), volume.to_string(), dir.to_string()];
    for opt in options {
        if is_generic(&opt) {
            continue;
        }
        let (key, value) = opt.split_once('=').unwrap_or((opt.as_str(), ""));
        if value.is_empty() {
            bail!("mount option {opt:?} is not known (twinfs options take a value: etcd=URL, tls_dir=DIR, cluster=FILE, attr_timeout=S, etcd_timeout=S, cache_mb=N, write_buffer_mb=N, threads=N, log_file=FILE)");
        }
        match key {
            "etcd" => global.extend(["--etcd".into(), value.into()]),
            "tls_dir" => global.extend(["--tls-dir".into(), value.into()]),
            "cluster" => global.extend(["--cluster".into(), value.into()]),
            "attr_timeout" | "cache_mb" | "write_buffer_mb" | "threads" | "log_file"
            | "etcd_timeout" => {
                local.extend([format!("--{}", key.replace('_', "-")), value.into()])
            }
            "ro" => bail!("read-only mounts are not supported yet"),
            _ => bail!("mount option {key:?} is not known"),
        }
    }
    global.extend(local);
    Ok(global)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(args: &[&str]) -> Result<Vec<String>> {
        translate(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn fstab_options_become_flags() {
        let out = t(&[
            "twinfs:uploads",
            "/mnt/u",
            "-o",
            "rw,_netdev,etcd=http://a:2379,etcd=http://b:2379,tls_dir=/etc/t,attr_timeout=2,x-systemd.automount",
            "-n",
        ])
        .expect("translates");
        assert_eq!(
            out.join(" "),
            "twinfs --etcd http://a:2379 --etcd http://b:2379 --tls-dir /etc/t mount uploads /mnt/u --attr-timeout 2"
        );
    }

    #[test]
    fn bad_invocations_are_refused_with_a_reason() {
        assert!(t(&["uploads"]).is_err());
        assert!(t(&["uploads", "/m", "-o"]).is_err());
        assert!(t(&["uploads", "/m", "-o", "bogus=1"]).is_err());
        assert!(t(&["uploads", "/m", "-o", "etcd"]).is_err());
        assert!(t(&["uploads", "/m", "-o", "ro"]).is_err());
        assert!(t(&["uploads", "/m", "-r"]).is_err());
        assert!(invoked_as_helper("/sbin/mount.fuse.twinfs"));
        assert!(!invoked_as_helper("/usr/bin/twinfs"));
    }
}
