//! QUIC transport: one long-lived connection per peer, one bidirectional stream per request.
//!
//! A request is one frame written on a fresh stream, which the client then finishes; the reply is
//! one frame on the same stream. Streams are independent, so a slow `Get` never blocks a `Has`.
//! Both ends are authenticated by mutual TLS 1.3 under the cluster CA (see [`crate::pki`]).
//!
//! The server never trusts a frame: the header is validated (magic, version, kind, per-kind
//! length bound) before any body byte is read or any buffer allocated; a bad frame gets an
//! `Error` reply on its stream and the connection, and every other peer, carry on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};

use crate::pki::{Identity, NODE_SERVER_NAME};
use crate::wire::{self, ErrorCode, Message, WireError, HEADER_LEN};

/// How long a server waits for a request frame to arrive in full once a stream is open. A peer
/// that opens a stream and goes quiet costs one task for this long, then nothing.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no traffic (keep-alives included) for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("stream error: {0}")]
    Stream(String),
    #[error("peer sent a bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("no reply from {0} in time")]
    Timeout(SocketAddr),
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // IDLE_TIMEOUT fits a VarInt of milliseconds, so the conversion cannot fail.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Windows large enough that a 4 MiB block moves without waiting for flow-control updates.
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(512));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Let path-MTU discovery climb past the 1452-byte default: on loopback and jumbo-frame
    // networks a block then needs far fewer packets (per-packet cost dominates on 2 cores).
    // Probes larger than the path allows are simply lost; the connection stays at what works.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Endpoint settings shared by nodes and clients: accept datagrams as large as MTU discovery may
/// reach (quinn's default, 1472 bytes, silently capped discovery at the Ethernet size).
fn endpoint_config() -> std::io::Result<quinn::EndpointConfig> {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("bad UDP payload size: {e}")))?;
    Ok(cfg)
}

/// Upper bound for MTU discovery and the largest datagram accepted. quinn sends up to 10
/// datagrams per `sendmsg` with UDP segmentation offload, and the kernel refuses a batch larger
/// than one 64 KiB UDP datagram with EMSGSIZE, which quinn takes for loss and then falls back to
/// 1,200-byte packets (block-bench saw exactly that with a 9,000-byte bound). 10 × 6,500 fits.
/// On loopback and jumbo-frame networks a 4 MiB block then takes ~650 packets instead of ~2,900.
const MAX_UDP_PAYLOAD: u16 = 6_500;

pub fn server_endpoint(identity: &Identity, listen: SocketAddr) -> anyhow::Result<Endpoint> {
    let tls = identity.server_config()?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let socket =
        udp_socket(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen} (UDP): {e}"))?;
    let endpoint = Endpoint::new(
        endpoint_config()?,
        Some(cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (UDP): {e}"))?;
    Ok(endpoint)
}

pub fn client_endpoint(identity: &Identity) -> anyhow::Result<Endpoint> {
    let tls = identity.client_config()?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let socket = udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let mut endpoint = Endpoint::new(
        endpoint_config()?,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// Socket buffer size asked for on every QUIC socket. A block is 4 MiB and arrives as a burst of
/// large datagrams; with Linux's default 208 KiB receive buffer a few of them overflow it, and
/// each drop costs a retransmission and halves the congestion window (block-bench saw 2% of
/// datagrams dropped, `UdpRcvbufErrors`). The kernel caps the request at `net.core.rmem_max` /
/// `wmem_max`; see deploy/README.md for raising them.
const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with large kernel buffers (see [`SOCKET_BUFFER`]).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A smaller buffer than asked for is not an error, only slower: say so once per socket.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    let got = socket.recv_buffer_size().unwrap_or(0);
    // Linux reports twice the size granted (bookkeeping overhead included).
    if got / 2 < SOCKET_BUFFER {
        tracing::info!(
            asked = SOCKET_BUFFER,
            granted = got / 2,
            "UDP receive buffer capped by net.core.rmem_max; raise it for faster transfers"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

enum ReadError {
    Wire(WireError),
    Stream(String),
}

/// Reads one frame. The header is validated before the body is read, so the allocation is
/// bounded by the per-kind limit.
async fn read_frame(recv: &mut RecvStream) -> Result<Message, ReadError> {
    let header = read_header(recv).await?;
    read_body(recv, header).await
}

async fn read_header(recv: &mut RecvStream) -> Result<wire::Header, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| ReadError::Stream(e.to_string()))?;
    wire::decode_header(&head).map_err(ReadError::Wire)
}

async fn read_body(recv: &mut RecvStream, header: wire::Header) -> Result<Message, ReadError> {
    // Filled from quinn's chunks as they come: a zeroed buffer (`vec![0; len]`) cost a memset
    // of every block received, 3 % of a node's CPU in a sequential write.
    let mut body = BytesMut::with_capacity(header.len);
    while body.len() < header.len {
        match recv.read_chunk(header.len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(ReadError::Stream(format!(
                    "stream ended after {} of {} body bytes",
                    body.len(),
                    header.len
                )))
            }
            Err(e) => return Err(ReadError::Stream(e.to_string())),
        }
    }
    wire::decode_body(header.kind, body.freeze()).map_err(ReadError::Wire)
}

async fn write_frame(send: &mut SendStream, msg: &Message) -> Result<(), TransportError> {
    let (head, tail) = msg.encode();
    send.write_all(&head)
        .await
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    if let Some(tail) = tail {
        send.write_chunk(tail)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))?;
    }
    send.finish()
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    Ok(())
}

/// What a node does with a request.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, request: Message) -> BoxFuture<'static, Message>;
}

/// Counters a server keeps about its peers' behaviour.
#[derive(Default, Debug)]
pub struct ServerCounters {
    pub requests: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub rejected_handshakes: AtomicU64,
}

/// Accepts connections until the endpoint is closed.
pub async fn serve<H: Handler>(endpoint: Endpoint, handler: Arc<H>, counters: Arc<ServerCounters>) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    counters.rejected_handshakes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, error = %e, "refused a peer during the TLS handshake");
                    return;
                }
            };
            serve_connection(conn, handler, counters).await;
        });
    }
}

async fn serve_connection<H: Handler>(
    conn: Connection,
    handler: Arc<H>,
    counters: Arc<ServerCounters>,
) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(remote = %conn.remote_address(), error = %e, "connection ended");
                return;
            }
        };
        let handler = handler.clone();
        let counters = counters.clone();
        let remote = conn.remote_address();
        tokio::spawn(async move {
            serve_stream(send, recv, handler, &counters, remote).await;
        });
    }
}

async fn serve_stream<H: Handler>(
    mut send: SendStream,
    mut recv: RecvStream,
    handler: Arc<H>,
    counters: &ServerCounters,
    remote: SocketAddr,
) {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let reply = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut recv)).await {
        Err(_) => Message::error(ErrorCode::BadRequest, "request frame not received in time"),
        Ok(Err(ReadError::Stream(e))) => {
            tracing::debug!(%remote, error = %e, "request stream broke");
            return;
        }
        Ok(Err(ReadError::Wire(e))) => {
            counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, error = %e, "malformed frame");
            // Don't read the rest of a refused frame.
            let _ = recv.stop(VarInt::from_u32(1));
            let code = match e {
                WireError::TooLarge { .. } => ErrorCode::TooLarge,
                WireError::BadVersion(_) => ErrorCode::BadVersion,
                _ => ErrorCode::BadRequest,
            };
            Message::error(code, e.to_string())
        }
        Ok(Ok(request)) if request.is_request() => handler.handle(request).await,
        Ok(Ok(other)) => {
            counters.malformed_frames.fetch_add(1, Ordering::Relaxed);
            Message::error(
                ErrorCode::BadRequest,
                format!("{:?} is a reply, not a request", other.kind()),
            )
        }
    };
    if let Err(e) = write_frame(&mut send, &reply).await {
        tracing::debug!(%remote, error = %e, "could not send reply");
    }
}

impl Message {
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::Put { .. }
                | Message::Get { .. }
                | Message::Has { .. }
                | Message::Delete { .. }
                | Message::List { .. }
                | Message::Info
                | Message::Verify { .. }
                | Message::Collect { .. }
                | Message::GetMany { .. }
        )
    }
}

/// What QUIC knows about the path to one peer.
#[derive(Debug, Clone)]
pub struct PathStats {
    pub addr: SocketAddr,
    pub mtu: u16,
    pub rtt: Duration,
    pub cwnd: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
}

/// Client side: one cached connection per peer address.
pub struct PeerPool {
    endpoint: Endpoint,
    conns: Mutex<HashMap<SocketAddr, Connection>>,
}

impl PeerPool {
    pub fn new(identity: &Identity) -> anyhow::Result<PeerPool> {
        Ok(PeerPool {
            endpoint: client_endpoint(identity)?,
            conns: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, addr: SocketAddr) -> Option<Connection> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(&addr)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        if let Some(c) = self.cached(addr) {
            return Ok(c);
        }
        // Connect without holding the lock; two racing connects both succeed and one is kept.
        let connecting =
            self.endpoint
                .connect(addr, NODE_SERVER_NAME)
                .map_err(|e| TransportError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
        let conn = connecting
            .await
            .map_err(|source| TransportError::Connection { addr, source })?;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, conn.clone());
        Ok(conn)
    }

    /// Path figures of every open connection (for diagnostics: benchmarks, logs).
    pub fn path_stats(&self) -> Vec<PathStats> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .iter()
            .map(|(addr, c)| {
                let s = c.stats();
                PathStats {
                    addr: *addr,
                    mtu: s.path.current_mtu,
                    rtt: s.path.rtt,
                    cwnd: s.path.cwnd,
                    sent_packets: s.path.sent_packets,
                    lost_packets: s.path.lost_packets,
                    congestion_events: s.path.congestion_events,
                }
            })
            .collect()
    }

    /// Forgets the connection to `addr` (after a timeout), so the next request reconnects.
    pub fn forget(&self, addr: SocketAddr) {
        let removed = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let Some(c) = removed {
            c.close(VarInt::from_u32(0), b"timed out");
        }
    }

    /// Sends one request and waits for its reply. `reply_timeout` bounds the time until the
    /// reply's header arrives (connecting, sending, the node's work): this is what detects a dead
    /// or stalled node. `body_timeout` then bounds the transfer of the reply's body, which for a
    /// large block on a busy machine may rightly take longer.
    pub async fn request(
        &self,
        addr: SocketAddr,
        msg: &Message,
        reply_timeout: Duration,
        body_timeout: Duration,
    ) -> Result<Message, TransportError> {
        let started = tokio::time::timeout(reply_timeout, self.send_request(addr, msg)).await;
        let (conn, mut recv, header) = match started {
            Ok(r) => r?,
            Err(_) => return Err(TransportError::Timeout(addr)),
        };
        match tokio::time::timeout(body_timeout, read_body(&mut recv, header)).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(Self::read_error(&conn, addr, e)),
            Err(_) => Err(TransportError::Timeout(addr)),
        }
    }

    fn read_error(conn: &Connection, addr: SocketAddr, e: ReadError) -> TransportError {
        match e {
            ReadError::Wire(e) => e.into(),
            // A refused handshake shows up here as the connection's close reason.
            ReadError::Stream(e) => match conn.close_reason() {
                Some(source) => TransportError::Connection { addr, source },
                None => TransportError::Stream(e),
            },
        }
    }

    async fn send_request(
        &self,
        addr: SocketAddr,
        msg: &Message,
    ) -> Result<(Connection, RecvStream, wire::Header), TransportError> {
        let conn = self.connection(addr).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| TransportError::Connection { addr, source })?;
        write_frame(&mut send, msg).await?;
        match read_header(&mut recv).await {
            Ok(h) => Ok((conn, recv, h)),
            Err(e) => Err(Self::read_error(&conn, addr, e)),
        }
    }

    /// Sends raw bytes on a fresh stream and returns the raw reply (tests of frame handling).
    pub async fn raw_request(
        &self,
        addr: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let conn = self.connection(addr).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| TransportError::Connection { addr, source })?;
        // The server may stop reading early (oversized frame); that is not an error here.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        recv.read_to_end(wire::MAX_BLOCK_SIZE + 64)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"bye");
    }
}
