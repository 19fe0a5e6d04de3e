//! [`FsError`]: every failure of the core, each mapped to one Linux errno.

use crate::blocks::BlockError;
use crate::kv::KvError;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file name too long")]
    NameTooLong,
    #[error("no such attribute")]
    NoData,
    #[error("result out of range")]
    Range,
    #[error("argument list too long (attribute value too large)")]
    TooBig,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("too many links")]
    TooManyLinks,
    /// The volume's quota would be exceeded (ENOSPC: the quota is the filesystem's size).
    #[error("no space left on device (volume quota reached)")]
    NoSpace,
    #[error("device or resource busy")]
    Busy,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A `flock` without waiting found the file locked by another holder.
    #[error("resource temporarily unavailable: locked by another holder")]
    WouldBlock,
    /// A waiting `flock` gave up because its caller got a signal: EINTR.
    #[error("interrupted by a signal while waiting for a lock")]
    Interrupted,
    /// No session to tie a lock to (the mount's etcd lease lapsed): ENOLCK.
    #[error("no locks available: this mount's etcd session has lapsed")]
    NoLocks,
    /// Too many optimistic-transaction conflicts in a row.
    #[error("too much contention: transaction retried {0} times")]
    Contention(u32),
}

impl FsError {
    /// The Linux errno to hand back to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::FileTooBig => libc::EFBIG,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::Busy => libc::EBUSY,
            FsError::NoSpace | FsError::Block(BlockError::NoSpace(_)) => libc::ENOSPC,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::Corrupt(_) | FsError::Kv(_) | FsError::Block(_) => libc::EIO,
            FsError::Contention(_) | FsError::WouldBlock => libc::EAGAIN,
            FsError::NoLocks => libc::ENOLCK,
            FsError::Interrupted => libc::EINTR,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
