//! The twinfs mount: everything between the kernel's FUSE requests and the filesystem core,
//! plus the production backends of the core's two abstractions.
//!
//! | module | job |
//! |---|---|
//! | `etcd_kv` | [`twinfs_core::MetaKv`] over etcd (get, paged range, compare-revision txn) |
//! | `block_io` | [`twinfs_core::BlockIo`] over the cluster's replicated block client |
//! | `volume` | the volume registry in etcd: create, list, inspect, delete, mount records |
//! | `watch` | follows a volume's keys in etcd and turns other mounts' changes into kernel cache invalidations |
//! | `adapter` | the `fuser::Filesystem` implementation: each request runs on tokio and replies when done |
//! | `mount` | `twinfs mount`: connect, open the volume, mount, serve, unmount cleanly |

pub mod adapter;
pub mod block_io;
pub mod claim_session;
pub mod etcd_kv;
pub mod mount;
pub mod mountpoint;
pub mod volume;
pub mod watch;
