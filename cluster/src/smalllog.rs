//! Append-only segment files for the blocks of at most `LOG_BLOCK_MAX` (1 MiB): one `pwrite`
//! and one `fdatasync` per put. It began with blocks of up to 32 KiB, hence "small" in names.
//!
//! A small block (most files of a web site are a few KiB) used to be a value in the index
//! database, committed durably with its entry. redb's copy-on-write commit wrote about eight
//! pages and flushed them, 0.30-0.36 ms for 4-20 KiB on this project's VM. Under the W3 copy,
//! the put was the longest leg of a new file's `close`: the puts took 1.38-1.47 ms against
//! the transaction's 1.11-1.19 ms.
//!
//! Now the block is appended to a log. The space it goes into is already written, so the
//! flush carries no metadata: 0.09-0.10 ms. Its index entry waits in memory and is committed
//! with the others that waited, about 64 at a time, in one durable commit that the node runs
//! after answering the put (`BlockStore::commit_unindexed`). Each commit
//! also records the log's end at that moment, the *watermark*. After a crash, the entries
//! that were lost are found again by replaying the log from the last watermark.
//!
//! In a throwaway build that skipped the index commit altogether, the W3 copy's puts took
//! 1.10-1.19 ms and the copy ran 12-14 % faster. This design got 9-16 % on the same
//! alternating runs.
//!
//! Layout: `small/<seq, 16 hex digits>.log`, each up to [`SEGMENT_MAX`] bytes. Only the
//! newest segment is appended to. A record is `b"TWB1"`, the data's length (u32,
//! little-endian), its BLAKE3 hash (32 bytes) and the data. Space ahead of the tail is
//! zero-filled in steps of [`ZERO_STEP`], so a record's flush writes only its own pages.
//!
//! A torn record (a crash in the middle of a write) fails its magic, its length or its hash.
//! One without a whole header ends the replay, and the next append overwrites it; one whose
//! bytes do not match its hash (torn, or rotted) is passed over, so that it cannot hide the
//! records after it.
//!
//! Group commit: a put writes its record under the tail's lock and flushes without it
//! ([`SmallLog::write`], [`SmallLog::flush`]); one `fdatasync` covers every record written
//! before it started, so puts that arrive during a flush share the next one. A record is *in
//! flight* from its write until its entry joins the waiting ones (or its flush fails), and the
//! watermark stays before the first record in flight: an index commit in between must not let
//! a replay skip a record whose put is answered afterwards. After a failed flush the records it
//! covered are reported failed, even if a later flush succeeds (Linux may have dropped their
//! dirty pages). With 8 writers of 300 KB files through one mount this measured no faster on
//! this VM (191-209 against 192-226 files/s): its flushes are cheap. It keeps a disk flush from
//! holding the lock every put needs.
//!
//! Nothing here decides which blocks are live: the index does. The store removes a segment
//! once none of its blocks is left (`BlockStore::forget`), and moves the last few out of one
//! that deletes have mostly emptied (`BlockStore::compact_log`).

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::BlockHash;

const MAGIC: [u8; 4] = *b"TWB1";
pub(crate) const HEADER: u64 = 4 + 4 + 32;

/// Largest segment. Small enough that replaying one after a crash reads little, large enough
/// that rolling over (a new file and a directory flush) is rare.
pub(crate) const SEGMENT_MAX: u64 = if cfg!(test) { 256 << 10 } else { 64 << 20 };

/// How far ahead of the tail space is zero-filled at a time (one write and flush per step).
const ZERO_STEP: u64 = if cfg!(test) { 64 << 10 } else { 4 << 20 };

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Where a small block's bytes are: segment, offset of the data, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seg: u64,
    pub offset: u64,
    pub len: u32,
}

/// A position in the log: everything before it is indexed (see the module comment).
pub(crate) type Watermark = (u64, u64);

/// The segment being appended to.
pub(crate) struct Tail {
    seq: u64,
    file: Arc<File>,
    /// Where the next record goes.
    end: u64,
    /// The file's length: space up to here is written (zeros past `end`).
    zeroed: u64,
    /// Starts of the records written but not yet flushed and handed to the index (or failed):
    /// the watermark stays before them, so a replay after a crash finds them.
    in_flight: BTreeSet<Watermark>,
}

impl Tail {
    /// Where a replay must start for nothing the index lacks to be missed: the log's end, or
    /// the first record still in flight.
    pub fn watermark(&self) -> Watermark {
        self.in_flight
            .first()
            .copied()
            .unwrap_or((self.seq, self.end))
    }

    /// The segment appended to.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The record starting at `start` is flushed and indexed, or failed.
    pub fn landed(&mut self, start: Watermark) {
        self.in_flight.remove(&start);
    }
}

/// A record written to the log but not yet flushed ([`SmallLog::write`]).
pub(crate) struct Written {
    pub loc: Loc,
    /// Where the record starts and ends in the log.
    pub start: Watermark,
    end: Watermark,
}

/// Group commit: how far the log is flushed, and what a failed flush lost.
#[derive(Default)]
struct Flushed {
    through: Watermark,
    /// Records ending in `(.0, .1]` were written before a flush that failed: after a failed
    /// fdatasync Linux may mark their pages clean without writing them, so a later flush that
    /// succeeds proves nothing for them. They are reported failed.
    failed: Option<(Watermark, Watermark)>,
}

impl Flushed {
    /// A flush of the records written up to `upto` failed.
    fn note_failed(&mut self, upto: Watermark) {
        self.failed = Some(match self.failed {
            Some((from, through)) => (from, through.max(upto)),
            None => (self.through, upto),
        });
    }
}

pub(crate) struct SmallLog {
    dir: PathBuf,
    tail: Mutex<Tail>,
    /// Open handles of every segment, for reads.
    segments: RwLock<HashMap<u64, Arc<File>>>,
    /// The end of the last record written, and its segment's file (updated under the tail's
    /// lock once the write is done). Every segment before it is flushed whole: a roll flushes
    /// the segment it leaves.
    written: Mutex<(Watermark, Arc<File>)>,
    /// Held through a flush: one flush at a time, and the puts that wait for it share it.
    flushed: Mutex<Flushed>,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.log")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Segment numbers present in `dir`, ascending (other files are ignored).
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if stem.len() == 16 {
            if let Ok(seq) = u64::from_str_radix(stem, 16) {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// The good records of `file` from `start` on, and where the records end: at the first that
/// has no header or does not fit (the zeros ahead of the tail). A record whose bytes do not
/// match its hash (a torn write, rot) is passed over, so that it hides none after it.
fn scan(
    file: &File,
    seq: u64,
    start: u64,
    max_block: usize,
) -> io::Result<(Vec<(BlockHash, Loc)>, u64)> {
    let len = file.metadata()?.len();
    let mut found = Vec::new();
    let mut pos = start;
    let mut header = [0u8; HEADER as usize];
    let mut data = Vec::new();
    while pos + HEADER <= len {
        file.read_exact_at(&mut header, pos)?;
        if header[..4] != MAGIC {
            break;
        }
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if size as usize > max_block || pos + HEADER + u64::from(size) > len {
            break;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&header[8..]);
        let hash = BlockHash(hash);
        data.resize(size as usize, 0);
        file.read_exact_at(&mut data, pos + HEADER)?;
        if !hash.verifies(&data) {
            tracing::warn!(
                segment = seq,
                offset = pos,
                "small-block log record does not match its hash; passed over"
            );
            pos += HEADER + u64::from(size);
            continue;
        }
        found.push((
            hash,
            Loc {
                seg: seq,
                offset: pos + HEADER,
                len: size,
            },
        ));
        pos += HEADER + u64::from(size);
    }
    Ok((found, pos))
}

/// Records longer than this are read ahead whole before they are read: a cold read of a
/// range of the segment otherwise goes to the disk in read-ahead windows (128 KiB here), one
/// after the other (a W4 verify of 20-400 KiB files ran 15-20 % slower that way).
const READ_AHEAD_ABOVE: u64 = 128 << 10;

/// Tells the kernel `len` bytes at `offset` (`len` 0: to the end) are about to be read: their
/// reads are issued at once.
pub(crate) fn advise_will_need(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments; `file` is an open descriptor for
    // the duration of the call. Advisory: failure changes nothing but speed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

fn open_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl SmallLog {
    /// Opens the log in `dir` (made if missing) and replays it from `from`: the records
    /// appended after it, which the index may have lost, and the tail found past them.
    /// `max_block` bounds a record's length (a larger one is taken for a torn write).
    pub fn open(
        dir: &Path,
        from: Watermark,
        max_block: usize,
    ) -> io::Result<(SmallLog, Vec<(BlockHash, Loc)>)> {
        fs::create_dir_all(dir)?;
        let mut seqs = list_segments(dir)?;
        if seqs.is_empty() {
            File::create(dir.join(segment_name(0)))?;
            fsync_dir(dir)?;
            seqs.push(0);
        }
        let mut segments = HashMap::new();
        for &seq in &seqs {
            segments.insert(seq, Arc::new(open_segment(&dir.join(segment_name(seq)))?));
        }
        let log = SmallLog {
            dir: dir.to_path_buf(),
            // Placeholder until the replay below finds the tail.
            tail: Mutex::new(Tail {
                seq: 0,
                file: segments[&seqs[0]].clone(),
                end: 0,
                zeroed: 0,
                in_flight: BTreeSet::new(),
            }),
            written: Mutex::new(((0, 0), segments[&seqs[0]].clone())),
            flushed: Mutex::new(Flushed::default()),
            segments: RwLock::new(segments),
        };
        let (found, mut end) = log.scan_from(from, max_block)?;
        let last = *seqs.last().unwrap_or(&0);
        let file = log
            .segment(last)
            .ok_or_else(|| io::Error::other("segment vanished"))?;
        if from.0 > last {
            // The watermark's segment is gone (removed behind the store's back): the newest
            // one's records end where a scan from its start says, never before.
            end = scan(&file, last, 0, max_block)?.1;
        }
        let zeroed = file.metadata()?.len();
        *log.written.lock().unwrap_or_else(|e| e.into_inner()) = ((last, end), file.clone());
        log.flushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .through = (last, end);
        *log.lock() = Tail {
            seq: last,
            file,
            end,
            zeroed,
            in_flight: BTreeSet::new(),
        };
        Ok((log, found))
    }

    /// The records from `from` to the end of the log, and where the newest segment's valid
    /// records end.
    pub fn scan_from(
        &self,
        from: Watermark,
        max_block: usize,
    ) -> io::Result<(Vec<(BlockHash, Loc)>, u64)> {
        let seqs: Vec<u64> = self
            .segment_seqs()
            .into_iter()
            .filter(|&s| s >= from.0)
            .collect();
        let mut found = Vec::new();
        let mut end = 0;
        for seq in seqs {
            let Some(file) = self.segment(seq) else {
                continue;
            };
            let start = if seq == from.0 { from.1 } else { 0 };
            let (mut records, stop) = scan(&file, seq, start, max_block)?;
            found.append(&mut records);
            end = stop;
        }
        Ok((found, end))
    }

    fn segment(&self, seq: u64) -> Option<Arc<File>> {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&seq)
            .cloned()
    }

    /// Appends are made under this lock, and the caller keeps it until the appended record is
    /// indexed, so that the watermark it commits never passes an unindexed record.
    pub fn lock(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a record durably (written and flushed, holding the tail's lock) and returns
    /// where its data is.
    pub fn append(&self, tail: &mut Tail, hash: &BlockHash, data: &[u8]) -> io::Result<Loc> {
        let w = self.write(tail, hash, data)?;
        let flushed = self.flush(&w);
        tail.landed(w.start);
        flushed.map(|()| w.loc)
    }

    /// Writes a record, unflushed, and marks it in flight: the caller flushes it
    /// ([`SmallLog::flush`], without the tail's lock) and then calls [`Tail::landed`].
    pub fn write(&self, tail: &mut Tail, hash: &BlockHash, data: &[u8]) -> io::Result<Written> {
        let len = u32::try_from(data.len()).map_err(|_| io::Error::other("block too large"))?;
        let size = HEADER + u64::from(len);
        if tail.end + size > SEGMENT_MAX && tail.end > 0 {
            self.roll(tail)?;
        }
        if tail.end + size > tail.zeroed {
            // Zero-fill ahead: the record's own flush then carries no size change.
            let target = (tail.end + size).max(tail.zeroed + ZERO_STEP);
            let mut at = tail.zeroed;
            while at < target {
                let n = (target - at).min(ZEROS.len() as u64) as usize;
                tail.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
            tail.zeroed = target;
        }
        let mut header = [0u8; HEADER as usize];
        header[..4].copy_from_slice(&MAGIC);
        header[4..8].copy_from_slice(&len.to_le_bytes());
        header[8..].copy_from_slice(&hash.0);
        tail.file.write_all_at(&header, tail.end)?;
        tail.file.write_all_at(data, tail.end + HEADER)?;
        let start = (tail.seq, tail.end);
        let loc = Loc {
            seg: tail.seq,
            offset: tail.end + HEADER,
            len,
        };
        tail.end += size;
        tail.in_flight.insert(start);
        let end = (tail.seq, tail.end);
        *self.written.lock().unwrap_or_else(|e| e.into_inner()) = (end, tail.file.clone());
        Ok(Written { loc, start, end })
    }

    /// Returns once the record `w` is durable. One flush covers every record written before
    /// it started: puts that wait meanwhile share the next one (group commit).
    pub fn flush(&self, w: &Written) -> io::Result<()> {
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((after, through)) = flushed.failed {
            if w.end > after && w.end <= through {
                return Err(io::Error::other(
                    "an earlier flush of the block log failed with this block in it",
                ));
            }
        }
        if w.end <= flushed.through {
            return Ok(());
        }
        let (upto, file) = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match file.sync_data() {
            Ok(()) => {
                flushed.through = flushed.through.max(upto);
                Ok(())
            }
            Err(e) => {
                flushed.note_failed(upto);
                Err(e)
            }
        }
    }

    /// Starts the next segment, once the one left is flushed whole (see `written`).
    fn roll(&self, tail: &mut Tail) -> io::Result<()> {
        if let Err(e) = tail.file.sync_data() {
            // As in `flush`: what waits for a flush in this segment must not trust a later one.
            let upto = self.written.lock().unwrap_or_else(|e| e.into_inner()).0;
            self.flushed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note_failed(upto);
            return Err(e);
        }
        let seq = tail.seq + 1;
        let file = Arc::new(open_segment(&self.dir.join(segment_name(seq)))?);
        fsync_dir(&self.dir)?;
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, file.clone());
        let in_flight = std::mem::take(&mut tail.in_flight);
        *tail = Tail {
            seq,
            file,
            end: 0,
            zeroed: 0,
            in_flight,
        };
        Ok(())
    }

    /// The records of segment `seq` (its good ones, from its start; see `scan`).
    pub fn records_of(&self, seq: u64, max_block: usize) -> io::Result<Vec<(BlockHash, Loc)>> {
        match self.segment(seq) {
            Some(file) => Ok(scan(&file, seq, 0, max_block)?.0),
            None => Ok(Vec::new()),
        }
    }

    /// A block's bytes as stored (`None` when its segment is gone). A segment cut short
    /// behind the store's back gives what is there: it does not match the block's hash, so a
    /// verified read quarantines the copy and repair replaces it.
    pub fn read(&self, loc: Loc) -> io::Result<Option<Vec<u8>>> {
        let Some(file) = self.segment(loc.seg) else {
            return Ok(None);
        };
        if u64::from(loc.len) > READ_AHEAD_ABOVE {
            advise_will_need(&file, loc.offset, u64::from(loc.len));
        }
        let mut data = vec![0u8; loc.len as usize];
        match file.read_exact_at(&mut data, loc.offset) {
            Ok(()) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let have = file.metadata()?.len().saturating_sub(loc.offset);
                data.truncate(usize::try_from(have).unwrap_or(0).min(data.len()));
                Ok(Some(data))
            }
            Err(e) => Err(e),
        }
    }

    /// Overwrites bytes of a stored block (tests: rot a disk cannot be made to produce).
    #[cfg(test)]
    pub fn rot(&self, loc: Loc, bytes: &[u8]) {
        let file = self.segment(loc.seg).expect("segment");
        file.write_all_at(bytes, loc.offset).expect("rot");
    }

    /// The segments present, ascending.
    pub fn segment_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// Removes segment `seq` unless it is the one appended to. The caller has made durable
    /// that none of its records is indexed any more.
    pub fn remove_segment(&self, seq: u64) -> io::Result<bool> {
        let tail = self.lock();
        if tail.seq == seq {
            return Ok(false);
        }
        let removed = self
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seq);
        drop(tail);
        if removed.is_none() {
            return Ok(false);
        }
        match fs::remove_file(self.dir.join(segment_name(seq))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fsync_dir(&self.dir)?;
        Ok(true)
    }
}
