//! CPU ranks in separate processes or machines over TCP. Start-up: rank 0 serves a rendezvous
//! store on master_addr:master_port; every rank connects to it (retrying until the init
//! timeout), reports the address of its own peer listener and its node, and receives the table of
//! all ranks; then each pair connects directly (the higher rank dials). Each peer connection has
//! a reader thread (frames into the rank's mailbox) and a writer thread (so `send` never waits
//! for the peer). A closed connection marks the peer lost: every pending and later receive from
//! it fails at once with an error naming its rank, node and address.
//!
//! Frame: tag u64, length u64 (little endian), payload.

use super::transport::{Mailbox, Transport};
use crate::error::{Error, Result};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where and how a rank joins the world.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world: usize,
    /// This rank's node, for error messages.
    pub node: usize,
    /// For the whole start-up (`comm.init_timeout_seconds`).
    pub timeout: Duration,
}

/// One entry of the rank table: (rank, node, peer listener address).
type Entry = (usize, usize, SocketAddr);

const MAGIC: &[u8; 8] = b"titanrdv";

/// The queue of one peer's writer thread: (tag, payload) frames.
type FrameQueue = Mutex<Sender<(u64, Vec<u8>)>>;

pub struct TcpTransport {
    rank: usize,
    table: Vec<Entry>,
    mailbox: Arc<Mailbox>,
    writers: Vec<Option<FrameQueue>>,
    streams: Vec<Option<TcpStream>>,
}

fn comm_err(what: impl std::fmt::Display) -> Error {
    Error::Comm(what.to_string())
}

fn write_u64(w: &mut impl Write, v: u64) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn write_entry(w: &mut impl Write, e: &Entry) -> std::io::Result<()> {
    let addr = e.2.to_string();
    write_u64(w, e.0 as u64)?;
    write_u64(w, e.1 as u64)?;
    write_u64(w, addr.len() as u64)?;
    w.write_all(addr.as_bytes())
}

fn read_entry(r: &mut impl Read) -> std::io::Result<Entry> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let rank = read_u64(r)? as usize;
    let node = read_u64(r)? as usize;
    let n = read_u64(r)? as usize;
    if n > 256 {
        return Err(bad("address too long"));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    let s = String::from_utf8(b).map_err(|_| bad("address is not UTF-8"))?;
    let addr = s.parse().map_err(|_| bad("unparsable address"))?;
    Ok((rank, node, addr))
}

/// Connects to `addr`, retrying until `deadline` (the other side may not be listening yet).
fn dial(addr: SocketAddr, deadline: Instant, what: &str) -> Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(comm_err(format!(
                    "could not reach {what} at {addr} before the init timeout: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Accepts one connection, giving up at `deadline`.
fn accept(l: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    l.set_nonblocking(true).map_err(comm_err)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(comm_err)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(comm_err(format!(
                        "timed out waiting for {what} (init timeout)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(comm_err(format!("accept failed: {e}"))),
        }
    }
}

fn master_socket(r: &Rendezvous) -> Result<SocketAddr> {
    (r.master_addr.as_str(), r.master_port)
        .to_socket_addrs()
        .map_err(|e| {
            comm_err(format!(
                "master address {}:{}: {e}",
                r.master_addr, r.master_port
            ))
        })?
        .next()
        .ok_or_else(|| {
            comm_err(format!(
                "master address {} resolves to nothing",
                r.master_addr
            ))
        })
}

/// Rank 0: the store. Collects every rank's entry, checks it, sends back the table.
fn serve_store(
    l: &TcpListener,
    mine: Entry,
    r: &Rendezvous,
    deadline: Instant,
) -> Result<Vec<Entry>> {
    let mut table: Vec<Option<Entry>> = vec![None; r.world];
    table[0] = Some(mine);
    let mut conns = Vec::new();
    while table.iter().any(Option::is_none) {
        let missing: Vec<usize> = (0..r.world).filter(|&i| table[i].is_none()).collect();
        let mut s = accept(
            l,
            deadline,
            &format!("ranks {missing:?} to join the rendezvous"),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(comm_err)?;
        let mut magic = [0u8; 8];
        let e = s
            .read_exact(&mut magic)
            .and_then(|_| read_entry(&mut s))
            .map_err(|e| comm_err(format!("rendezvous: a bad hello ({e})")))?;
        if &magic != MAGIC {
            return Err(comm_err(
                "rendezvous: a connection that is not a titan rank",
            ));
        }
        match table.get(e.0) {
            None => {
                return Err(comm_err(format!(
                    "rendezvous: rank {} joined a world of {} (its world size differs)",
                    e.0, r.world
                )))
            }
            Some(Some(_)) => {
                return Err(comm_err(format!(
                    "rendezvous: rank {} joined twice (two processes with the same node rank?)",
                    e.0
                )))
            }
            Some(None) => table[e.0] = Some(e),
        }
        conns.push(s);
    }
    let table: Vec<Entry> = table.into_iter().flatten().collect();
    for s in &mut conns {
        write_u64(s, r.world as u64).map_err(comm_err)?;
        for e in &table {
            write_entry(s, e).map_err(comm_err)?;
        }
    }
    Ok(table)
}

fn join_store(mine: Entry, r: &Rendezvous, deadline: Instant) -> Result<Vec<Entry>> {
    let master = master_socket(r)?;
    let mut s = dial(master, deadline, "the rendezvous store (rank 0)")?;
    s.write_all(MAGIC)
        .and_then(|_| write_entry(&mut s, &mine))
        .map_err(comm_err)?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(comm_err)?;
    let read = |s: &mut TcpStream| -> std::io::Result<Vec<Entry>> {
        let n = read_u64(s)? as usize;
        (0..n.min(1 << 20)).map(|_| read_entry(s)).collect()
    };
    let table = read(&mut s).map_err(|e| {
        comm_err(format!(
            "rendezvous with rank 0 at {master} failed before every rank joined: {e}"
        ))
    })?;
    if table.len() != r.world {
        return Err(comm_err(format!(
            "rendezvous: rank 0 has a world of {}, this rank {} a world of {}",
            table.len(),
            r.rank,
            r.world
        )));
    }
    Ok(table)
}

impl TcpTransport {
    /// Joins the world described by `r` (blocks until every rank has joined, or the timeout).
    pub fn connect(r: &Rendezvous) -> Result<TcpTransport> {
        if r.rank >= r.world {
            return Err(comm_err(format!(
                "rank {} is outside a world of {}",
                r.rank, r.world
            )));
        }
        let deadline = Instant::now() + r.timeout;
        let master = master_socket(r)?;
        // The store listens on the master port; every rank's peer listener on an ephemeral
        // port of the interface that reaches the master.
        let store = if r.rank == 0 {
            Some(TcpListener::bind(("0.0.0.0", r.master_port)).map_err(|e| {
                comm_err(format!(
                    "rank 0 cannot listen on port {}: {e}",
                    r.master_port
                ))
            })?)
        } else {
            None
        };
        let ip = if master.ip().is_loopback() {
            master.ip()
        } else {
            let probe = dial(master, deadline, "the master")?;
            let ip = probe.local_addr().map_err(comm_err)?.ip();
            drop(probe);
            ip
        };
        let peers_l = TcpListener::bind((ip, 0)).map_err(comm_err)?;
        let mine = (r.rank, r.node, peers_l.local_addr().map_err(comm_err)?);
        let table = match &store {
            Some(l) => serve_store(l, mine, r, deadline)?,
            None => join_store(mine, r, deadline)?,
        };
        // Pairwise connections: dial every lower rank, accept every higher one.
        let mut streams: Vec<Option<TcpStream>> = (0..r.world).map(|_| None).collect();
        for e in table.iter().filter(|e| e.0 < r.rank) {
            let mut s = dial(e.2, deadline, &format!("rank {} (node {})", e.0, e.1))?;
            write_u64(&mut s, r.rank as u64).map_err(comm_err)?;
            streams[e.0] = Some(s);
        }
        for _ in r.rank + 1..r.world {
            let mut s = accept(&peers_l, deadline, "the higher ranks to connect")?;
            let peer = read_u64(&mut s).map_err(comm_err)? as usize;
            if peer <= r.rank || peer >= r.world || streams[peer].is_some() {
                return Err(comm_err(format!("rank {peer} connected unexpectedly")));
            }
            streams[peer] = Some(s);
        }
        let mailbox = Arc::new(Mailbox::default());
        let mut writers = Vec::with_capacity(r.world);
        for (peer, s) in streams.iter().enumerate() {
            let Some(s) = s else {
                writers.push(None);
                continue;
            };
            s.set_nodelay(true).map_err(comm_err)?;
            let name = describe(&table[peer]);
            let (rd, wr) = (
                s.try_clone().map_err(comm_err)?,
                s.try_clone().map_err(comm_err)?,
            );
            let mb = mailbox.clone();
            std::thread::spawn(move || read_loop(rd, peer, mb, name));
            let (tx, rx) = channel::<(u64, Vec<u8>)>();
            let mb = mailbox.clone();
            let name = describe(&table[peer]);
            std::thread::spawn(move || {
                let mut w = BufWriter::with_capacity(1 << 20, wr);
                for (tag, bytes) in rx {
                    let r = write_u64(&mut w, tag)
                        .and_then(|_| write_u64(&mut w, bytes.len() as u64))
                        .and_then(|_| w.write_all(&bytes))
                        .and_then(|_| w.flush());
                    if let Err(e) = r {
                        mb.lose(peer, format!("sending to {name} failed: {e}"));
                        return;
                    }
                }
            });
            writers.push(Some(Mutex::new(tx)));
        }
        Ok(TcpTransport {
            rank: r.rank,
            table,
            mailbox,
            writers,
            streams,
        })
    }
}

fn describe(e: &Entry) -> String {
    format!("rank {} (node {}, {})", e.0, e.1, e.2)
}

fn read_loop(s: TcpStream, peer: usize, mb: Arc<Mailbox>, name: String) {
    let mut r = BufReader::with_capacity(1 << 20, s);
    loop {
        let frame = read_u64(&mut r).and_then(|tag| {
            let n = read_u64(&mut r)? as usize;
            let mut b = vec![0u8; n];
            r.read_exact(&mut b)?;
            Ok((tag, b))
        });
        match frame {
            Ok((tag, b)) => mb.deliver(peer, tag, b),
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!("{name} closed its connection (the process exited or was killed)")
                } else {
                    format!("reading from {name} failed: {e}")
                };
                mb.lose(peer, why);
                return;
            }
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.writers.clear();
        for s in self.streams.iter().flatten() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

impl Transport for TcpTransport {
    fn world_rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.table.len()
    }
    fn send(&self, peer: usize, tag: u64, bytes: Vec<u8>) -> Result<()> {
        let w = self
            .writers
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                comm_err(format!(
                    "rank {} has no connection to rank {peer}",
                    self.rank
                ))
            })?;
        w.lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((tag, bytes))
            .map_err(|_| comm_err(format!("lost {}: its writer stopped", self.peer_name(peer))))
    }
    fn recv(&self, peer: usize, tag: u64, deadline: Instant) -> Result<Vec<u8>> {
        self.mailbox
            .take(peer, tag, deadline, || self.peer_name(peer))
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
    fn peer_name(&self, peer: usize) -> String {
        self.table
            .get(peer)
            .map(describe)
            .unwrap_or_else(|| format!("rank {peer}"))
    }
}
