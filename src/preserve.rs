//! `--preserve`: the owner, group and extended attributes (POSIX ACLs included: they are the
//! `system.posix_acl_*` attributes) of each source, kept at its destination.
//!
//! They are read from the source when the commit finishes the file (the source is still there:
//! sources are removed only after the commit) — through directory handles from the source's
//! anchor, from the very inode that was copied — and set on the temporary file before its final
//! mode and its rename, so the final name never shows the file with the wrong owner. Setting
//! them may not be permitted (an unprivileged user cannot give a file away; the destination file
//! system may not take an attribute): each thing not kept is returned as a warning naming the
//! file, the operation and the error class, and the transfer goes on. Modes and modification
//! times are kept whether or not `--preserve` is given.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Gid, Uid, XattrFlags};
use rustix::io::Errno;

use crate::error::Error;

/// What `--preserve` keeps of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended attributes, name and value (none for a symlink).
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Kept {
    /// Owner and group from `st`, and with `xattrs` the extended attributes of the open source
    /// `fd` (`path` names it). An attribute that cannot be read is a warning, and the others are
    /// kept.
    pub fn of(
        fd: Option<BorrowedFd<'_>>,
        st: &rustix::fs::Stat,
        path: &Path,
    ) -> (Kept, Vec<Error>) {
        let mut k = Kept {
            uid: st.st_uid,
            gid: st.st_gid,
            xattrs: Vec::new(),
        };
        let mut warnings = Vec::new();
        if let Some(fd) = fd {
            match read_xattrs(fd) {
                Ok((found, errors)) => {
                    k.xattrs = found;
                    for (name, e) in errors {
                        let what = format!(
                            "extended attribute '{}' not kept, it cannot be read",
                            name.to_string_lossy()
                        );
                        warnings.push(warning("getxattr", path, e, &what));
                    }
                }
                Err(e) => warnings.push(warning(
                    "listxattr",
                    path,
                    e,
                    "extended attributes not kept, they cannot be listed",
                )),
            }
        }
        (k, warnings)
    }

    /// Give a destination the owner and group through `chown` (an `fchown` or `fchownat`).
    /// Where the pair is refused, the group alone is tried (a group the user belongs to); what
    /// was not kept is returned as a warning.
    pub fn chown_with(
        &self,
        path: &Path,
        chown: impl Fn(Option<Uid>, Option<Gid>) -> rustix::io::Result<()>,
    ) -> Vec<Error> {
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        match chown(Some(uid), Some(gid)) {
            Ok(()) => Vec::new(),
            Err(e) => {
                let what = if chown(None, Some(gid)).is_ok() {
                    format!("owner {} not kept", self.uid)
                } else if self.uid == rustix::process::geteuid().as_raw() {
                    // The file is this user's already: only the group is missing.
                    format!("group {} not kept", self.gid)
                } else {
                    format!("owner and group {}:{} not kept", self.uid, self.gid)
                };
                vec![warning("chown", path, e, &what)]
            }
        }
    }

    /// Set every extended attribute on the open destination `fd`; returns a warning for each
    /// one refused. An ACL the destination inherited from its directory's default ACL, where the
    /// source has none, is removed: the copy gets the source's permissions, no more.
    pub fn set_xattrs(&self, fd: BorrowedFd<'_>, path: &Path) -> Vec<Error> {
        let mut out = Vec::new();
        for acl in ["system.posix_acl_access", "system.posix_acl_default"] {
            if self.xattrs.iter().any(|(n, _)| n == acl) {
                continue;
            }
            match rustix::fs::fremovexattr(fd, acl) {
                Ok(()) | Err(Errno::NODATA) | Err(Errno::OPNOTSUPP) => {}
                // A file (not a directory) has no default ACL to remove.
                Err(Errno::ACCESS) | Err(Errno::INVAL) if acl.ends_with("default") => {}
                Err(e) => out.push(warning(
                    "removexattr",
                    path,
                    e,
                    &format!("inherited '{acl}' not removed"),
                )),
            }
        }
        for (name, value) in &self.xattrs {
            if let Err(e) = rustix::fs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty())
            {
                let what = format!("extended attribute '{}' not kept", name.to_string_lossy());
                out.push(warning("setxattr", path, e, &what));
            }
        }
        out
    }
}

/// A warning of `--preserve`: the error of `op` on `path`, saying what was not kept.
fn warning(op: &str, path: &Path, e: Errno, what: &str) -> Error {
    let mut err = Error::io(op, path, io::Error::from(e));
    err.message = format!("{what} (--preserve): {}", err.message);
    err
}

/// The extended attributes of the open file `fd` (none where the file system has none), and
/// the names of those that could not be read, with their errors.
type Xattrs = (Vec<(OsString, Vec<u8>)>, Vec<(OsString, Errno)>);

fn read_xattrs(fd: BorrowedFd<'_>) -> rustix::io::Result<Xattrs> {
    let names = match read_sized(
        || rustix::fs::flistxattr_query(fd),
        |buf| rustix::fs::flistxattr(fd, buf),
    ) {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let (mut found, mut failed) = (Vec::new(), Vec::new());
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        match read_sized(
            || rustix::fs::fgetxattr_query(fd, name),
            |buf| rustix::fs::fgetxattr(fd, name, buf),
        ) {
            Ok(v) => found.push((name.to_os_string(), v)),
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(e) => failed.push((name.to_os_string(), e)),
        }
    }
    Ok((found, failed))
}

/// A variable-sized value read by `get` into a buffer of the size `query` gives, tried again if
/// it grew in between.
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    get: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    loop {
        let want = query()?;
        let mut buf = vec![0u8; want];
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_xattrs_are_read_and_set() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"y").unwrap();
        rustix::fs::setxattr(&a, "user.ferry.test", b"value", XattrFlags::empty()).unwrap();
        use std::os::fd::AsFd;
        let fa = std::fs::File::open(&a).unwrap();
        let st = rustix::fs::fstat(&fa).unwrap();
        let (k, warnings) = Kept::of(Some(fa.as_fd()), &st, &a);
        assert!(warnings.is_empty());
        assert!(k
            .xattrs
            .contains(&("user.ferry.test".into(), b"value".to_vec())));
        let f = std::fs::File::open(&b).unwrap();
        assert!(k.set_xattrs(f.as_fd(), &b).is_empty());
        let got = read_sized(
            || rustix::fs::getxattr_query(&b, "user.ferry.test"),
            |buf| rustix::fs::getxattr(&b, "user.ferry.test", buf),
        )
        .unwrap();
        assert_eq!(got, b"value");
    }
}
