//! Reference-model test of `flock` locks: random sequences of takings (without waiting),
//! unlocks and closes through handles on two instances over one metadata store, checked after
//! every step against a plain model of who holds what, and against the lock keys in the store.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::executor::block_on;
use proptest::prelude::*;
use twinfs_core::kv::prefix_end;
use twinfs_core::{FlockKind, Fs, FsError, FsOptions, MemBlocks, MemKv, ROOT_INO};

/// Handles 0..HANDLES; handle `h` is open on instance `h % 2`.
const HANDLES: u64 = 5;

#[derive(Clone, Debug)]
enum Op {
    Take(u64, FlockKind),
    Unlock(u64),
    Close(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![Just(FlockKind::Shared), Just(FlockKind::Exclusive)];
    prop_oneof![
        4 => (0..HANDLES, kind).prop_map(|(h, k)| Op::Take(h, k)),
        2 => (0..HANDLES).prop_map(Op::Unlock),
        1 => (0..HANDLES).prop_map(Op::Close),
    ]
}

fn never() -> bool {
    false
}

fn run(ops: Vec<Op>) {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let open = || {
        block_on(Fs::open_volume(
            kv.clone(),
            blocks.clone(),
            "v",
            FsOptions::default(),
        ))
    };
    let nodes = [open().unwrap(), open().unwrap()];
    let (f, _) = block_on(nodes[0].create(ROOT_INO, b"lock", 0o644, 0, 0, true)).unwrap();
    let ino = f.ino;
    // The model: handle → the kind it holds.
    let mut held: BTreeMap<u64, FlockKind> = BTreeMap::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Take(h, kind) => {
                let conflict = held.iter().any(|(&other, &theirs)| {
                    other != h && (kind == FlockKind::Exclusive || theirs == FlockKind::Exclusive)
                });
                let fs = &nodes[(h % 2) as usize];
                let got = block_on(fs.flock(ino, h, Some(kind), false, 1, &never));
                if conflict {
                    // A conversion that cannot be had without waiting keeps the old lock.
                    assert!(
                        matches!(got, Err(FsError::WouldBlock)),
                        "step {step} {op:?}: {got:?}, held {held:?}"
                    );
                } else {
                    assert!(got.is_ok(), "step {step} {op:?}: {got:?}, held {held:?}");
                    held.insert(h, kind);
                }
            }
            Op::Unlock(h) => {
                block_on(nodes[(h % 2) as usize].flock(ino, h, None, false, 1, &never)).unwrap();
                held.remove(&h);
            }
            Op::Close(h) => {
                block_on(nodes[(h % 2) as usize].flock_release(ino, h)).unwrap();
                held.remove(&h);
            }
        }
        // Each instance knows what it holds ...
        for (i, fs) in nodes.iter().enumerate() {
            let want: Vec<_> = held
                .iter()
                .filter(|(&h, _)| (h % 2) as usize == i)
                .map(|(&h, &k)| (ino, h, k))
                .collect();
            assert_eq!(fs.flocks_held(), want, "step {step} {op:?}: instance {i}");
        }
        // ... and the store holds one lock key per lock held, no more.
        let prefix = nodes[0].keys().flocks(ino);
        let keys = kv
            .range_sync(&prefix, &prefix_end(&prefix), 0)
            .entries
            .len();
        assert_eq!(
            keys,
            held.len(),
            "step {step} {op:?}: lock keys in the store"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn flock_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
