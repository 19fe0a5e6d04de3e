//! Where a block's copies belong: computed, never stored.
//!
//! Rendezvous (highest-random-weight) hashing: each node scores `blake3(node id || block hash)`
//! and the block belongs on the highest-scoring nodes. Every client computes the same ranking
//! from the same membership, and when one of N nodes joins or leaves only the blocks that ranked
//! it among their top R move: about R/N of them, the least possible.
//!
//! With zone labels, copies go to distinct zones first: walk the ranking and take each node whose
//! zone is not yet used; only when zones run out are the remaining slots filled in rank order.
//! Nodes without a zone each count as a zone of their own.

use crate::BlockHash;

/// What placement needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub zone: Option<String>,
}

fn score(node_id: &str, block: &BlockHash) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(node_id.as_bytes());
    h.update(&[0]);
    h.update(&block.0);
    let out = h.finalize();
    let b = out.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// All candidates ordered by preference for `block` (indices into `nodes`), zone-spread for the
/// first `replicas` positions. Readers walk this order; writers take its first `replicas`.
pub fn rank(block: &BlockHash, nodes: &[Candidate], replicas: usize) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (score(&n.id, block), i))
        .collect();
    // Ties (astronomically unlikely) break on id so every client agrees.
    order.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| nodes[a.1].id.cmp(&nodes[b.1].id))
    });
    let ranked: Vec<usize> = order.into_iter().map(|(_, i)| i).collect();
    if !nodes.iter().any(|n| n.zone.is_some()) {
        return ranked;
    }
    let mut chosen = Vec::with_capacity(ranked.len());
    let mut used_zones: Vec<&str> = Vec::new();
    let mut taken = vec![false; nodes.len()];
    for &i in &ranked {
        if chosen.len() == replicas {
            break;
        }
        match nodes[i].zone.as_deref() {
            Some(z) if used_zones.contains(&z) => continue,
            Some(z) => used_zones.push(z),
            None => {}
        }
        chosen.push(i);
        taken[i] = true;
    }
    chosen.extend(ranked.into_iter().filter(|&i| !taken[i]));
    chosen
}

/// The ids of the nodes that should hold `block`'s `replicas` copies.
pub fn place<'a>(block: &BlockHash, nodes: &'a [Candidate], replicas: usize) -> Vec<&'a str> {
    rank(block, nodes, replicas)
        .into_iter()
        .take(replicas)
        .map(|i| nodes[i].id.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn nodes(n: usize, zones: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: format!("node-{i:03}"),
                zone: (zones > 0).then(|| format!("zone-{}", i % zones)),
            })
            .collect()
    }

    fn block(i: u64) -> BlockHash {
        BlockHash::of(&i.to_le_bytes())
    }

    proptest! {
        #[test]
        fn placement_gives_r_distinct_nodes(n in 1usize..20, r in 1usize..5, b in any::<u64>()) {
            let ns = nodes(n, 0);
            let p = place(&block(b), &ns, r);
            prop_assert_eq!(p.len(), r.min(n));
            prop_assert_eq!(p.iter().collect::<HashSet<_>>().len(), p.len());
            // The ranking is a permutation of all nodes.
            let mut all = rank(&block(b), &ns, r);
            all.sort();
            prop_assert_eq!(all, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn with_zones_copies_land_in_distinct_zones(
            n in 2usize..20, zones in 2usize..5, r in 1usize..4, b in any::<u64>()
        ) {
            let ns = nodes(n, zones);
            let zones_present = zones.min(n);
            let p = rank(&block(b), &ns, r);
            let want = r.min(n);
            let first: Vec<_> = p[..want].iter().map(|&i| ns[i].zone.clone().unwrap()).collect();
            let distinct: HashSet<_> = first.iter().collect();
            prop_assert_eq!(distinct.len(), want.min(zones_present));
        }
    }

    #[test]
    fn placement_is_deterministic_and_order_independent() {
        let ns = nodes(7, 0);
        let mut rev = ns.clone();
        rev.reverse();
        for b in 0..200 {
            let a: HashSet<&str> = place(&block(b), &ns, 2).into_iter().collect();
            let c: HashSet<&str> = place(&block(b), &rev, 2).into_iter().collect();
            assert_eq!(a, c);
        }
    }

    /// Removing one of N nodes moves only the placements that included it (~R/N of blocks,
    /// i.e. ~1/N of all copies); adding one moves about as many.
    #[test]
    fn membership_change_moves_about_one_nth() {
        let n = 10;
        let r = 2;
        let blocks = 20_000u64;
        let before = nodes(n, 0);
        let after_remove: Vec<_> = before[..n - 1].to_vec();
        let after_add = nodes(n + 1, 0);
        let (mut moved_remove, mut moved_add) = (0usize, 0usize);
        for b in 0..blocks {
            let h = block(b);
            let p0: HashSet<&str> = place(&h, &before, r).into_iter().collect();
            let p1: HashSet<&str> = place(&h, &after_remove, r).into_iter().collect();
            let p2: HashSet<&str> = place(&h, &after_add, r).into_iter().collect();
            moved_remove += p0.difference(&p1).count();
            moved_add += p0.difference(&p2).count();
            // Only copies on the removed node move.
            for id in p0.difference(&p1) {
                assert_eq!(*id, before[n - 1].id);
            }
        }
        let copies = (blocks as usize * r) as f64;
        let frac_remove = moved_remove as f64 / copies;
        let frac_add = moved_add as f64 / copies;
        // Ideal: 1/10 of copies when removing, 1/11 when adding.
        assert!(
            (0.08..0.12).contains(&frac_remove),
            "removal moved {frac_remove}"
        );
        assert!(
            (0.07..0.11).contains(&frac_add),
            "addition moved {frac_add}"
        );
    }

    #[test]
    fn load_is_spread_evenly() {
        let ns = nodes(5, 0);
        let mut count = vec![0usize; 5];
        for b in 0..10_000 {
            for i in rank(&block(b), &ns, 2).into_iter().take(2) {
                count[i] += 1;
            }
        }
        for c in count {
            assert!((3600..4400).contains(&c), "uneven load: {c}");
        }
    }
}
