//! The one error space of ferry.
//!
//! Every failure anywhere in the engine becomes an [`Error`] carrying its [`ErrorClass`], the errno
//! the OS gave (if any), the operation, the path and the rank. The class alone decides what happens
//! next (retry, pass up, stop) and which exit code the user sees. This module owns the mapping from
//! errno to class and from class to exit code; it must not decide policy itself.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The classes of the brief's error table. The class decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Bad flag, bad path, unknown transfer, a second run on a locked transfer.
    Usage,
    /// EINTR, EAGAIN, ETIMEDOUT: worth retrying; exit 3 once retries run out.
    Transient,
    /// A signal or a dead peer stopped the run; state stays resumable.
    Interrupted,
    /// `ferry cancel` stopped the run.
    Cancelled,
    /// ENOSPC, EDQUOT, EMFILE, EFBIG: a tier or a limit is full.
    Resource,
    /// EACCES, EPERM, EROFS.
    Permission,
    /// ENOENT on a planned source.
    NotFound,
    /// CRC mismatch, source changed during copy, corrupt state.
    Integrity,
    /// A bug.
    Internal,
}

impl ErrorClass {
    /// The process exit code of the brief's error table.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Usage => 2,
            ErrorClass::Transient | ErrorClass::Interrupted => 3,
            ErrorClass::Cancelled => 4,
            ErrorClass::Resource => 5,
            ErrorClass::Permission => 6,
            ErrorClass::NotFound => 7,
            ErrorClass::Integrity => 8,
            ErrorClass::Internal => 1,
        }
    }

    /// The class's name as users see it (`not-found`, `integrity`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Usage => "usage",
            ErrorClass::Transient => "transient",
            ErrorClass::Interrupted => "interrupted",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::Resource => "resource",
            ErrorClass::Permission => "permission",
            ErrorClass::NotFound => "not-found",
            ErrorClass::Integrity => "integrity",
            ErrorClass::Internal => "internal",
        }
    }

    /// Classify an errno. `op` matters for EIO: a failed read may succeed when repeated, a failed
    /// write or fsync means the storage lost data and is never trusted again.
    pub fn from_errno(errno: i32, op: &str) -> ErrorClass {
        let sync = is_sync_op(op);
        match errno {
            // An fsync or syncfs that reports EIO means written data was lost: the kernel
            // marked the failed pages clean, so repeating the call would succeed and lie. What
            // it covered is never trusted (integrity); a resume copies it again.
            libc::EIO if sync => ErrorClass::Integrity,
            // Other failures of a sync are never transient either; the run stops and a resume
            // redoes the work.
            libc::EINTR | libc::EAGAIN | libc::ETIMEDOUT if sync => ErrorClass::Resource,
            libc::EINTR | libc::EAGAIN | libc::ETIMEDOUT => ErrorClass::Transient,
            libc::EIO if op == "read" => ErrorClass::Transient,
            libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::EFBIG | libc::EIO => {
                ErrorClass::Resource
            }
            libc::EACCES | libc::EPERM | libc::EROFS => ErrorClass::Permission,
            libc::ENOENT => ErrorClass::NotFound,
            libc::ENOTDIR | libc::EISDIR | libc::EEXIST | libc::ENAMETOOLONG | libc::ELOOP => {
                ErrorClass::Usage
            }
            _ => ErrorClass::Internal,
        }
    }
}

/// Whether `op` makes written data durable (`fsync`, a directory fsync, `syncfs`; the failpoints
/// of those steps too).
fn is_sync_op(op: &str) -> bool {
    let last = op.rsplit("::").next().unwrap_or(op);
    matches!(
        last,
        "fsync" | "fsync-dir" | "fsync_dir" | "syncfs" | "sync_data" | "sync_all"
    )
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A classified failure: what happened, where, on which rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct Error {
    /// The class of the brief's table.
    pub class: ErrorClass,
    /// The errno the OS gave, if any.
    pub errno: Option<i32>,
    /// The operation that failed (`open`, `read`, `fsync`, `rename`, `plan`, ...).
    pub op: String,
    /// The path involved, if any.
    #[serde(with = "crate::pathser::opt")]
    pub path: Option<PathBuf>,
    /// The rank that met the error, once known.
    pub rank: Option<usize>,
    /// What happened, in words, and what to do about it.
    pub message: String,
}

/// Shorthand for results in ferry.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `class` with a message; add the path and op with the builders.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Error {
        Error {
            class,
            errno: None,
            op: String::new(),
            path: None,
            rank: None,
            message: message.into(),
        }
    }

    /// A usage error: the user asked for something that cannot be done; nothing was touched.
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorClass::Usage, message)
    }

    /// A state file in a format newer than this ferry reads (`found`; this one reads `known`).
    /// If a checksum covers the format number, it was written by a newer ferry: a `usage` error.
    /// If not, a damaged byte could read the same, so it is an `integrity` error saying both.
    pub fn newer_format(path: &Path, what: &str, found: u64, known: u64, checked: bool) -> Error {
        let me = env!("CARGO_PKG_VERSION");
        if checked {
            Error::usage(format!(
                "{what} was written by a newer ferry (format {found}; this ferry {me} reads \
                 format {known}): run the ferry that wrote it, or a newer one"
            ))
        } else {
            Error::new(
                ErrorClass::Integrity,
                format!(
                    "{what} says format {found}; this ferry {me} reads format {known}: it was \
                     written by a newer ferry (run that one) or it is damaged; it was not trusted"
                ),
            )
        }
        .with_op("read-state")
        .with_path(path)
    }

    /// An integrity error naming a path.
    pub fn integrity(path: &Path, message: impl Into<String>) -> Error {
        Error::new(ErrorClass::Integrity, message).with_path(path)
    }

    /// A bug in ferry.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorClass::Internal, message)
    }

    /// The run was cancelled with `ferry cancel`.
    pub fn cancelled() -> Error {
        Error::new(
            ErrorClass::Cancelled,
            "the transfer was cancelled (ferry cancel)",
        )
    }

    /// Classify an I/O error of operation `op` on `path`.
    pub fn io(op: &str, path: &Path, err: io::Error) -> Error {
        let errno = err.raw_os_error();
        let class = match errno {
            Some(e) => ErrorClass::from_errno(e, op),
            None => match err.kind() {
                io::ErrorKind::NotFound => ErrorClass::NotFound,
                io::ErrorKind::PermissionDenied => ErrorClass::Permission,
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => ErrorClass::Transient,
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => ErrorClass::Integrity,
                _ => ErrorClass::Internal,
            },
        };
        Error {
            class,
            errno,
            op: op.to_string(),
            path: Some(crate::state::shown(path)),
            rank: None,
            message: strip_os_error(&err),
        }
    }

    /// The operation of an echo: a rank that stopped because a peer stopped first.
    pub const ECHO_OP: &'static str = "peer-stopped";

    /// Whether this error only echoes a peer's (see `stop`): when ranks agree on an outcome, a
    /// rank's own error is reported before any echo.
    pub fn is_echo(&self) -> bool {
        self.op == Error::ECHO_OP
    }

    /// Attach a path.
    pub fn with_path(mut self, path: &Path) -> Error {
        self.path = Some(crate::state::shown(path));
        self
    }

    /// Attach the operation name.
    pub fn with_op(mut self, op: &str) -> Error {
        self.op = op.to_string();
        self
    }

    /// Attach the rank, unless one is already known (the first rank to see an error owns it).
    pub fn on_rank(mut self, rank: usize) -> Error {
        if self.rank.is_none() {
            self.rank = Some(rank);
        }
        self
    }

    /// Prefix the message with context.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        self.class.exit_code()
    }

    /// What the user should do next, by class; `id` is the transfer, once there is one (a run
    /// that stopped before its plan was durable left nothing to resume).
    pub fn hint(&self, id: Option<&str>) -> String {
        let then_resume = |fix: &str| match id {
            Some(id) => format!("{fix}, then `ferry resume {id}`"),
            None => format!(
                "{fix}, then run the same command again (nothing was copied and no transfer \
                 was made)"
            ),
        };
        match self.class {
            ErrorClass::Usage => "see `ferry --help`".into(),
            ErrorClass::Transient | ErrorClass::Interrupted => match id {
                Some(id) => format!("the transfer is resumable: run `ferry resume {id}`"),
                None => "nothing was copied and no transfer was made; run the same command \
                         again"
                    .into(),
            },
            ErrorClass::Cancelled => {
                "the transfer was cancelled; start a new one with `ferry copy`".into()
            }
            ErrorClass::Resource => then_resume("free space or raise the limit on that tier"),
            ErrorClass::Permission => then_resume("fix the permissions of that path"),
            ErrorClass::NotFound => then_resume("restore the missing path"),
            ErrorClass::Integrity if self.errno == Some(libc::EIO) && is_sync_op(&self.op) => {
                then_resume(
                    "the storage reported that written data was lost (an I/O error from fsync or \
                     syncfs): none of what that sync covered was journaled, and it is copied \
                     again into new files; check the device and its log (dmesg) first",
                )
            }
            ErrorClass::Integrity if self.op == "verify-committed" => {
                "the transfer is committed, but the destination no longer matches its manifest: \
                 it was changed (or lost by the storage) after the commit; copy the named file \
                 again from its source if it still exists"
                    .into()
            }
            ErrorClass::Integrity => {
                "nothing was committed; inspect the named file (see docs/errors.md)".into()
            }
            ErrorClass::Internal => {
                "this is a bug in ferry; the state is kept, please report it".into()
            }
        }
    }
}

fn strip_os_error(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.class)?;
        match (&self.path, self.op.is_empty()) {
            (Some(p), false) => write!(f, "{} '{}': ", self.op, p.display())?,
            (Some(p), true) => write!(f, "'{}': ", p.display())?,
            (None, false) => write!(f, "{}: ", self.op)?,
            (None, true) => {}
        }
        f.write_str(&self.message)?;
        if let Some(e) = self.errno {
            write!(f, " (errno {e})")?;
        }
        if let Some(r) = self.rank {
            write!(f, " [rank {r}]")?;
        }
        Ok(())
    }
}

/// Turn an `io::Result` into a ferry result with operation and path.
pub trait IoContext<T> {
    /// Classify a failure of `op` on `path`.
    fn ctx(self, op: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classes_follow_the_brief() {
        assert_eq!(
            ErrorClass::from_errno(libc::ENOSPC, "write"),
            ErrorClass::Resource
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EDQUOT, "write"),
            ErrorClass::Resource
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EMFILE, "open"),
            ErrorClass::Resource
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EACCES, "open"),
            ErrorClass::Permission
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EROFS, "open"),
            ErrorClass::Permission
        );
        assert_eq!(
            ErrorClass::from_errno(libc::ENOENT, "open"),
            ErrorClass::NotFound
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EINTR, "read"),
            ErrorClass::Transient
        );
        assert_eq!(
            ErrorClass::from_errno(libc::EIO, "read"),
            ErrorClass::Transient
        );
        // An fsync or syncfs EIO: written data was lost.
        for op in ["fsync", "fsync-dir", "fsio::syncfs", "fsio::sync_data"] {
            let e = Error::io(op, Path::new("/d"), io::Error::from_raw_os_error(libc::EIO));
            assert_eq!(e.class, ErrorClass::Integrity, "{op}");
            assert!(e.hint(Some("t")).contains("written data was lost"), "{op}");
        }
        assert_eq!(
            ErrorClass::from_errno(libc::EIO, "write"),
            ErrorClass::Resource
        );
        // A failed fsync is never retried, whatever errno it gave.
        for errno in [libc::EINTR, libc::EAGAIN, libc::ETIMEDOUT] {
            assert_eq!(ErrorClass::from_errno(errno, "fsync"), ErrorClass::Resource);
            assert_eq!(ErrorClass::from_errno(errno, "read"), ErrorClass::Transient);
        }
    }

    #[test]
    fn exit_codes_follow_the_brief() {
        let codes: Vec<i32> = [
            ErrorClass::Usage,
            ErrorClass::Transient,
            ErrorClass::Interrupted,
            ErrorClass::Cancelled,
            ErrorClass::Resource,
            ErrorClass::Permission,
            ErrorClass::NotFound,
            ErrorClass::Integrity,
            ErrorClass::Internal,
        ]
        .iter()
        .map(|c| c.exit_code())
        .collect();
        assert_eq!(codes, vec![2, 3, 3, 4, 5, 6, 7, 8, 1]);
    }

    #[test]
    fn display_names_class_op_path_and_rank() {
        let e = Error::io(
            "open",
            Path::new("/x/y"),
            io::Error::from_raw_os_error(libc::ENOENT),
        )
        .on_rank(3);
        let s = e.to_string();
        assert!(s.starts_with("not-found: open '/x/y': "), "{s}");
        assert!(s.contains("errno 2") && s.ends_with("[rank 3]"), "{s}");
    }

    #[test]
    fn errors_round_trip_through_json() {
        let e = Error::integrity(Path::new("/a b/c"), "crc mismatch").on_rank(1);
        let j = serde_json::to_string(&e).unwrap();
        let back: Error = serde_json::from_str(&j).unwrap();
        assert_eq!(back, e);
    }
}
