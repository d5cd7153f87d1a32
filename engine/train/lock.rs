//! One run per dump folder. `titan train` holds `<dump_folder>/run.lock` for its whole life: an
//! exclusive flock(2) on the file, and in it a record of the holder (pid, host, start time) for
//! the error another run gets. The kernel drops a flock when its process dies, however it dies
//! (kill -9 included), so a lock whose holder is gone is simply free: the next run takes it and
//! says whose record it replaced. A run that ends normally empties the record.
//!
//! On a filesystem without flock (some Lustre mounts) the record alone decides: a holder on
//! this host whose pid is not alive has ended; a holder on another host cannot be checked, so it
//! counts as running until someone removes the file.
//!
//! With several ranks, rank 0 will hold the lock for the job.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The lock file's name in the dump folder.
pub const LOCK_FILE: &str = "run.lock";

/// Who holds (or last held) a lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockOwner {
    pub pid: u32,
    pub host: String,
    /// UTC, RFC 3339.
    pub started: String,
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {}, started {}",
            self.pid, self.host, self.started
        )
    }
}

/// The held lock of a dump folder; dropping it releases the folder.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

/// What `RunLock::acquire` found.
#[derive(Debug)]
pub struct Acquired {
    pub lock: RunLock,
    /// The record of an earlier run that ended without releasing the lock (killed, crashed).
    pub took_over: Option<String>,
}

impl RunLock {
    /// Takes `<dump>/run.lock` (creating the folder), or fails naming the run that holds it.
    pub fn acquire(dump: &Path) -> Result<Acquired> {
        std::fs::create_dir_all(dump).map_err(|e| Error::io(dump, e))?;
        let path = dump.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let in_use = |owner: &str, note: &str| {
            Error::Other(format!(
                "dump folder {} is in use by another titan run ({owner}; lock file {}){note}: \
                 wait for that run to end, or give this one another --job.dump_folder",
                dump.display(),
                path.display()
            ))
        };
        // SAFETY: flock on a file descriptor this function owns.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        // Read once the outcome is known: a holder that just released has emptied its record.
        let os_error = (!locked).then(std::io::Error::last_os_error);
        let previous = read_record(&file, &path)?;
        if let Some(e) = os_error {
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {
                    let owner = previous
                        .as_ref()
                        .map_or("its record is not written yet".into(), Record::to_string);
                    return Err(in_use(&owner, ""));
                }
                Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    if let Some(p) = &previous {
                        if p.may_be_alive() {
                            let note = format!(
                                " (this filesystem has no flock, so titan checked the pid; \
                                 remove {} if that run has ended)",
                                path.display()
                            );
                            return Err(in_use(&p.to_string(), &note));
                        }
                    }
                }
                _ => return Err(Error::io(&path, e)),
            }
        }
        let me = LockOwner {
            pid: std::process::id(),
            host: hostname(),
            started: utc_now(),
        };
        let mut text = serde_json::to_string(&me).map_err(|e| Error::Other(e.to_string()))?;
        text.push('\n');
        file.set_len(0)
            .and_then(|()| file.write_all_at(text.as_bytes(), 0))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Acquired {
            lock: RunLock { file, path },
            took_over: previous.map(|r| r.to_string()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    /// An empty record marks a clean end; closing the file releases the flock.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// What a lock file holds besides nothing.
#[derive(Debug)]
enum Record {
    Owner(LockOwner),
    Unreadable(String),
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::Owner(o) => o.fmt(f),
            Record::Unreadable(t) => write!(f, "unreadable record {t:?}"),
        }
    }
}

impl Record {
    /// Without flock: whether the run it names may still be running. Only a pid on this host
    /// can be checked.
    fn may_be_alive(&self) -> bool {
        match self {
            Record::Owner(o) if o.host == hostname() => {
                o.pid == std::process::id() || pid_alive(o.pid)
            }
            _ => true,
        }
    }
}

/// The lock file's record, None when empty.
fn read_record(mut file: &File, path: &Path) -> Result<Option<Record>> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(match serde_json::from_str::<LockOwner>(text) {
        Ok(o) => Record::Owner(o),
        Err(_) => Record::Unreadable(text.chars().take(200).collect()),
    }))
}

/// Whether a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Now in UTC as "YYYY-MM-DDTHH:MM:SSZ".
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = secs as libc::time_t;
    // SAFETY: gmtime_r fills the tm it is given from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::gmtime_r(&t, &mut tm) }.is_null() {
        return format!("{secs} s after the Unix epoch");
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
