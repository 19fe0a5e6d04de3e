//! The data plane as an operator and a client see it: real etcd, 3 real node processes, real
//! QUIC with mutual TLS, driven through the `twinfs` command.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use twinfs_cluster::pki::Identity;
use twinfs_cluster::transport::PeerPool;
use twinfs_cluster::wire::{self, ErrorCode, Message};

#[test]
fn put_lands_on_exactly_two_distinct_nodes() {
    let c = DevCluster::up(3, 10);
    let ids: HashSet<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
    for size in [0usize, 1, 4096, 100_000, 4 << 20] {
        let data = random_bytes(size);
        let hash = c.put(&data);
        let holders = c.locate(&hash);
        let distinct: HashSet<&String> = holders.iter().collect();
        assert_eq!(holders.len(), 2, "block of {size} B on {holders:?}");
        assert_eq!(distinct.len(), 2);
        assert!(holders.iter().all(|h| ids.contains(h)));
        // And on disk: exactly the two holders have a file, with the right bytes; a small
        // block lives in the holders' small-block logs, so no node has a file for it.
        let as_file = size > twinfs_cluster::blockstore::LOG_BLOCK_MAX;
        for n in &c.nodes {
            let p = c.block_path(&n.id, &hash);
            assert_eq!(
                p.exists(),
                as_file && holders.contains(&n.id),
                "{}",
                p.display()
            );
            if p.exists() {
                assert_eq!(std::fs::read(&p).unwrap(), data);
            }
        }
        // Each copy is where placement says it belongs.
        let mut expected: Vec<String> = c.ranking(&hash).into_iter().take(2).collect();
        let mut got = holders.clone();
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
    }
}

#[test]
fn get_after_kill_9_of_a_holder_returns_same_bytes_within_2s() {
    let c = DevCluster::up(3, 10);
    let data = random_bytes(3 << 20);
    let hash = c.put(&data);
    // Kill the holder clients try first, so the read must fail over.
    let first = c.ranking(&hash)[0].clone();
    assert!(c.locate(&hash).contains(&first));
    // A fresh client process has no cached connection: warm nothing, kill, then time the get.
    c.kill9(&first);
    let out_file = c.dir.path().join("got");
    let start = Instant::now();
    let out = run(c.cmd().args(["block", "get", &hash, "-o"]).arg(&out_file));
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&out_file).unwrap(), data);
    assert!(
        took < Duration::from_secs(2),
        "get took {took:?} with a dead holder"
    );
}

#[test]
fn corrupt_copy_is_never_returned_and_is_reported() {
    let c = DevCluster::up(3, 10);
    // Larger than `LOG_BLOCK_MAX`: a block file (the repair tests rot log records).
    let data = random_bytes(2 << 20);
    let hash = c.put(&data);
    let first = c.ranking(&hash)[0].clone();
    // Flip one byte of the copy the client will try first.
    let path = c.block_path(&first, &hash);
    assert!(c.rot_copy(&first, &hash, 12345), "a copy to rot");

    for _ in 0..3 {
        let got = run(c.cmd().args(["block", "get", &hash]));
        assert!(
            got.status.success(),
            "{}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert_eq!(got.stdout, data, "a corrupt copy was returned");
    }
    // Reported: counted by the node, logged, the copy quarantined and no longer offered.
    let status = c.status_json();
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == first.as_str())
        .unwrap();
    assert_eq!(node["corrupt_detected"], 1, "{status}");
    let log = std::fs::read_to_string(&c.node(&first).log).unwrap();
    assert!(
        log.contains("corrupt block copy detected"),
        "node log:\n{log}"
    );
    assert!(!path.exists());
    let quarantined = std::fs::read_dir(c.node(&first).data_dir.join("store/quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    assert_eq!(c.locate(&hash), vec![c.ranking(&hash)[1].clone()]);
    // A range read is verified too: with only the good copy left it still returns good bytes.
    let got = run(c
        .cmd()
        .args(["block", "get", &hash, "--offset", "1000", "--len", "50"]));
    assert_eq!(got.stdout, &data[1000..1050]);
}

#[test]
fn client_with_certificate_from_another_ca_is_refused() {
    let c = DevCluster::up(3, 10);
    let good = random_bytes(10_000);
    let hash = c.put(&good);
    let foreign = c.dir.path().join("foreign");
    let ok = |cmd: &mut std::process::Command| assert!(run(cmd).status.success());
    ok(twinfs()
        .args(["ca", "init", "--dir"])
        .arg(foreign.join("ca")));
    ok(twinfs()
        .args([
            "cert", "issue", "--name", "intruder", "--role", "client", "--ca",
        ])
        .arg(foreign.join("ca"))
        .arg("--out")
        .arg(foreign.join("client")));
    // Even with the cluster's CA to trust the nodes, a certificate the cluster CA did not sign
    // reads nothing and writes nothing.
    std::fs::copy(
        c.client_cert_dir().join("ca.crt"),
        foreign.join("client/ca.crt"),
    )
    .unwrap();
    let get = run(c
        .cmd()
        .arg("--tls-dir")
        .arg(foreign.join("client"))
        .args(["block", "get", &hash]));
    assert!(!get.status.success());
    assert!(get.stdout.is_empty(), "a stranger got bytes");
    let file = c.dir.path().join("intruder-data");
    let evil = random_bytes(5000);
    std::fs::write(&file, &evil).unwrap();
    let put = run(c
        .cmd()
        .arg("--tls-dir")
        .arg(foreign.join("client"))
        .args(["block", "put"])
        .arg(&file));
    assert!(!put.status.success(), "a stranger stored a block");
    let evil_hash = blake3::hash(&evil).to_hex().to_string();
    assert!(c.locate(&evil_hash).is_empty());
    for n in &c.nodes {
        assert!(!c.block_path(&n.id, &evil_hash).exists());
    }
    // The real client still works.
    assert_eq!(run(c.cmd().args(["block", "get", &hash])).stdout, good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_leave_the_node_serving() {
    let c = tokio::task::spawn_blocking(|| DevCluster::up(3, 10))
        .await
        .unwrap();
    let identity = Identity::load(&c.client_cert_dir()).unwrap();
    let pool = PeerPool::new(&identity).unwrap();
    let addr: SocketAddr = c.nodes[0].addr.parse().unwrap();
    let t = Duration::from_secs(5);

    let reply_to = |bytes: Vec<u8>| {
        let pool = &pool;
        async move {
            let raw = pool.raw_request(addr, &bytes).await.expect("node replies");
            wire::decode_frame(&raw).expect("reply is a well-formed frame")
        }
    };
    let code_of = |m: Message| match m {
        Message::Error { code, .. } => code,
        other => panic!("expected an error reply, got {other:?}"),
    };

    // Pure garbage.
    assert_eq!(
        code_of(reply_to(b"hello, is this HTTP?\r\n\r\n".to_vec()).await),
        ErrorCode::BadRequest
    );
    // A Put header announcing 4 GiB: refused before any body is read.
    let mut huge = vec![b'T', b'W', wire::WIRE_VERSION, 0x01];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.extend_from_slice(&[0u8; 1000]);
    assert_eq!(code_of(reply_to(huge).await), ErrorCode::TooLarge);
    // A future version.
    let mut v9 = Message::Info.encode_to_vec();
    v9[2] = 9;
    assert_eq!(code_of(reply_to(v9).await), ErrorCode::BadVersion);
    // An unknown kind, a truncated body, a reply sent as a request.
    assert_eq!(
        code_of(reply_to(vec![b'T', b'W', wire::WIRE_VERSION, 0x33, 0, 0, 0, 0]).await),
        ErrorCode::BadRequest
    );
    let mut trunc = Message::Delete {
        hash: twinfs_cluster::BlockHash([7; 32]),
    }
    .encode_to_vec();
    trunc[7] = 40; // claims 40 body bytes, carries 32, then the stream ends
    let raw = pool.raw_request(addr, &trunc).await;
    assert!(raw
        .map(|r| r.is_empty() || wire::decode_frame(&r).is_ok())
        .unwrap_or(true));
    assert_eq!(
        code_of(reply_to(Message::Ok.encode_to_vec()).await),
        ErrorCode::BadRequest
    );
    // A Put whose bytes do not match its hash.
    let lie = Message::Put {
        hash: twinfs_cluster::BlockHash([1; 32]),
        data: vec![1, 2, 3].into(),
    };
    assert_eq!(
        code_of(reply_to(lie.encode_to_vec()).await),
        ErrorCode::HashMismatch
    );
    // Non-QUIC datagrams at the node's UDP port.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1400)).map(|j| (i ^ j) as u8).collect();
        sock.send_to(&junk, addr).await.unwrap();
    }

    // The node still serves this connection, a new connection, and everyone else.
    match pool.request(addr, &Message::Info, t, t).await.unwrap() {
        Message::InfoReply(info) => assert_eq!(info.node_id, c.nodes[0].id),
        other => panic!("unexpected {other:?}"),
    }
    let fresh = PeerPool::new(&identity).unwrap();
    assert!(matches!(
        fresh.request(addr, &Message::Info, t, t).await.unwrap(),
        Message::InfoReply(_)
    ));
    let c = std::sync::Arc::new(c);
    let c2 = c.clone();
    tokio::task::spawn_blocking(move || {
        let data = random_bytes(200_000);
        let hash = c2.put(&data);
        assert_eq!(run(c2.cmd().args(["block", "get", &hash])).stdout, data);
        assert!(alive(c2.nodes[0].pid));
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("malformed frame"), "node log:\n{log}");
}

#[test]
fn status_shows_killed_node_dead_within_lease_ttl() {
    let ttl = 5;
    let c = DevCluster::up(3, ttl);
    let victim = c.nodes[1].id.clone();
    assert_eq!(c.node_state(&victim), "alive");
    let table = c.ok(&["status"]);
    assert!(
        table.contains(&victim) && table.contains("3 of 3 nodes alive"),
        "{table}"
    );
    c.kill9(&victim);
    let took = wait_for(Duration::from_secs(ttl + 10), || {
        c.node_state(&victim) == "dead"
    })
    .expect("killed node never shown dead");
    assert!(
        took <= Duration::from_secs(ttl + 3),
        "shown dead after {took:?}"
    );
    let table = c.ok(&["status"]);
    assert!(table.contains("2 of 3 nodes alive"), "{table}");
    // The others are untouched.
    for n in c.nodes.iter().filter(|n| n.id != victim) {
        assert_eq!(c.node_state(&n.id), "alive");
    }
    // A node stopped cleanly (SIGTERM) leaves at once and says so.
    let quitter = c.nodes[2].id.clone();
    // SAFETY: kill(2) on a node process this test started.
    unsafe {
        libc::kill(c.node(&quitter).pid as i32, libc::SIGTERM);
    }
    wait_for(Duration::from_secs(5), || {
        c.node_state(&quitter) == "stopped"
    })
    .expect("clean stop shown as stopped");
}

#[test]
fn fewer_live_nodes_than_replicas_writes_what_it_can_and_says_so() {
    let c = DevCluster::up(3, 3);
    let (a, b) = (c.nodes[0].id.clone(), c.nodes[1].id.clone());
    c.kill9(&a);
    c.kill9(&b);
    wait_for(Duration::from_secs(15), || {
        c.node_state(&a) == "dead" && c.node_state(&b) == "dead"
    })
    .expect("nodes shown dead");
    let data = random_bytes(50_000);
    let file = c.dir.path().join("degraded");
    std::fs::write(&file, &data).unwrap();
    let out = run(c.cmd().args(["block", "put"]).arg(&file));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only 1 of 2 copies"), "{stderr}");
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(c.locate(&hash), vec![c.nodes[2].id.clone()]);
    assert_eq!(run(c.cmd().args(["block", "get", &hash])).stdout, data);
}

#[test]
fn dev_cluster_down_stops_every_process_it_started() {
    let c = DevCluster::up(2, 10);
    let mut pids: Vec<u32> = c.nodes.iter().map(|n| n.pid).collect();
    pids.push(c.json["etcd"]["pid"].as_u64().unwrap() as u32);
    assert!(pids.iter().all(|&p| alive(p)));
    let out = run(twinfs()
        .args(["dev-cluster", "down", "--dir"])
        .arg(c.dir.path()));
    assert!(out.status.success());
    for p in pids {
        assert!(!alive(p), "pid {p} still running after down");
    }
}

#[test]
fn admin_commands_explain_what_is_missing() {
    let out = run(twinfs().env_remove("TWINFS_CLUSTER").args(["status"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
    let out = run(twinfs().args(["--cluster", "/nonexistent/cluster.json", "status"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev-cluster up"));
    let out = run(twinfs().args(["block", "get", "not-a-hash", "--cluster", "/nonexistent"]));
    assert!(!out.status.success());
}

/// `get_many` (a batch of small blocks fetched ahead, one request per node) returns what
/// `get` would for each block: good bytes in the order asked, a missing block as not found,
/// and a bad copy in a batch is left out, fetched through `get`, reported and quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_returns_each_block_as_get_would() {
    use twinfs_cluster::client::{BlockClient, ClientError, ClientOptions};
    use twinfs_cluster::BlockHash;
    let c = tokio::task::spawn_blocking(|| DevCluster::up(3, 10))
        .await
        .unwrap();
    let c = std::sync::Arc::new(c);
    // Blocks in the nodes' logs, a file-backed one, and one whose first-ranked copy is corrupt.
    let sizes = [100usize, 5_000, 100_000, 1_500_000, 200_000];
    let (blocks, bad_node) = {
        let c = c.clone();
        tokio::task::spawn_blocking(move || {
            let blocks: Vec<(String, Vec<u8>)> = sizes
                .iter()
                .map(|&n| {
                    let d = random_bytes(n);
                    (c.put(&d), d)
                })
                .collect();
            let (hash, _) = &blocks[4];
            let first = c.ranking(hash)[0].clone();
            assert!(c.rot_copy(&first, hash, 777), "a copy to rot");
            (blocks, first)
        })
        .await
        .unwrap()
    };

    let identity = Identity::load(&c.client_cert_dir()).unwrap();
    let cluster: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.cluster_file()).unwrap()).unwrap();
    let endpoint = cluster["etcd"]["endpoints"][0]
        .as_str()
        .unwrap()
        .to_string();
    let etcd = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let membership = twinfs_cluster::membership::Membership::watch(etcd)
        .await
        .unwrap();
    let client = BlockClient::new(&identity, membership, ClientOptions::default()).unwrap();
    let m = twinfs_cluster::metrics::metrics();
    let count = |op: &'static str| {
        let label = twinfs_cluster::metrics::OpLabel { op };
        (
            m.client_requests.total.get_or_create(&label).get(),
            m.client_requests.errors.get_or_create(&label).get(),
        )
    };
    let (batches_before, gets_before) = (count("get_many"), count("get"));
    let missing = BlockHash::of(b"no node stores this");
    let bad: BlockHash = blocks[4].0.parse().unwrap();
    let mut asked: Vec<BlockHash> = blocks[..4]
        .iter()
        .map(|(h, _)| h.parse().unwrap())
        .collect();
    asked.insert(2, missing);
    asked.push(asked[0]); // asked twice
    let got = client.get_many(&asked).await;
    assert_eq!(got.len(), asked.len());
    // Batches to at most the 3 nodes, all answered; one by one only the missing block.
    let batches = count("get_many").0 - batches_before.0;
    assert!((1..=3).contains(&batches), "{batches} batches");
    assert_eq!(count("get_many").1, batches_before.1, "a batch failed");
    assert_eq!(count("get").0 - gets_before.0, 1);
    let mut want: Vec<Option<&Vec<u8>>> = blocks[..4].iter().map(|(_, d)| Some(d)).collect();
    want.insert(2, None);
    want.push(want[0]);
    for (i, (r, w)) in got.iter().zip(&want).enumerate() {
        match (r, w) {
            (Ok(data), Some(w)) => assert_eq!(&data[..], &w[..], "block {i}"),
            (Err(ClientError::NotFound(h)), None) => assert_eq!(*h, missing),
            (r, _) => panic!("block {i}: unexpected {r:?}"),
        }
    }
    // A block alone in its batch goes to its first-ranked holder, whose copy is bad: left out
    // of the answer, fetched through `get`, which returns the good copy.
    let got = client.get_many(&[bad]).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        &got[0].as_ref().expect("the good copy")[..],
        &blocks[4].1[..]
    );
    assert_eq!(count("get").0 - gets_before.0, 2);
    // The corrupt copy was reported and quarantined, as a `get` would have it.
    let c2 = c.clone();
    let status = tokio::task::spawn_blocking(move || c2.status_json())
        .await
        .unwrap();
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == bad_node.as_str())
        .unwrap();
    assert_eq!(node["corrupt_detected"], 1, "{status}");

    // A node asked directly answers in the order asked, nothing for what it lacks, and refuses
    // a batch longer than the limit before reading it.
    let pool = PeerPool::new(&identity).unwrap();
    let (h0, d0) = &blocks[0];
    let holder = c.ranking(h0)[0].clone();
    let addr: SocketAddr = c.node(&holder).addr.parse().unwrap();
    let t = Duration::from_secs(5);
    let ask = Message::GetMany {
        hashes: vec![missing, h0.parse().unwrap()],
    };
    match pool.request(addr, &ask, t, t).await.unwrap() {
        Message::DataMany(got) => assert_eq!(got, vec![None, Some(d0.clone().into())]),
        other => panic!("unexpected {other:?}"),
    }
    let too_many = Message::GetMany {
        hashes: vec![missing; wire::MAX_GET_MANY + 1],
    };
    match pool.request(addr, &too_many, t, t).await.unwrap() {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("unexpected {other:?}"),
    }
}
