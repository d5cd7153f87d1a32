//! The GPU communicator: one NCCL communicator per rank (one GPU each), over cudarc's raw NCCL
//! bindings (buffers are the engine's raw device addresses, not cudarc slices).
//!
//! Start-up: rank 0 makes an `ncclUniqueId` and the 128 bytes reach the other ranks through a
//! host communicator (local threads or tcp), the bootstrap, as torch uses its TCPStore. The
//! communicator keeps its own handle on that group, so `split` makes a sub-group with a fresh id
//! sent over the bootstrap's matching sub-group: only the members take part, as the trait asks
//! (`ncclCommSplit` would need every rank of the parent to call it).
//!
//! Streams: every collective runs on the communicator's own stream, ordered against the
//! backend's compute stream by two events: the compute stream's work so far is recorded, the
//! communication stream waits on it, NCCL launches, the communication stream's work is recorded
//! and the compute stream waits on that. Kernels queued after a collective therefore see its
//! result, and the host never blocks. Because the two streams are separate, a later variant that
//! leaves out the last wait (an FSDP all-gather prefetched for the next block) overlaps with
//! compute without changing this code's ordering rules.
//!
//! Failure: the communicator is non-blocking (`blocking = 0`), so no NCCL call can hang the host.
//! Calls that return `ncclInProgress` (init, launches, `ncclGroupEnd`, finalize) are polled with
//! `ncclCommGetAsyncError`; `wait` (and `barrier`, which ends in it) polls the communication
//! stream's last event and the asynchronous error. On an error or when the timeout passes, the
//! communicator is aborted (`ncclCommAbort`) and the call returns `Error::Comm` naming this rank;
//! NCCL cannot tell which peer is dead or stuck, and the message says so. Every later call repeats
//! that error. Call `wait` before the host blocks on the compute stream (a download, the end of a
//! step): a stream synchronize behind a collective whose peer died would otherwise hang.
//!
//! Threads: a communicator is driven by one thread at a time (a mutex serializes its calls), and
//! a group (`group_start` .. `group_end`) must be opened and closed on one thread and hold only
//! this communicator's calls: NCCL's group state is per thread.
//!
//! Library: NCCL is loaded at run time. cudarc looks for `libnccl.so` (and a few other names, not
//! `libnccl.so.2`, the only name the `nvidia-nccl-cu13` wheel ships), so the directory on
//! `LD_LIBRARY_PATH` needs a `libnccl.so` link; `scripts/install-cuda-toolchain.sh --nccl` makes
//! one. Without it `NcclComm::new` returns `Error::Backend` saying so, never a panic.

mod ffi;

pub use ffi::nccl_version;

use super::{Communicator, ReduceOp};
use crate::backend::cuda::{backend_err, CudaBackend};
use crate::backend::Buf;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::{result as dr, CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::sys;
use ffi::{data_type, nonblocking_config, red_op, text, Backoff, MIN_VERSION};
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct State {
    /// Null once destroyed or aborted.
    comm: sys::ncclComm_t,
    /// Why the communicator was aborted; every later call returns it.
    broken: Option<String>,
    /// Open `group_start`s.
    depth: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; `NcclComm` keeps its
// `State` behind a mutex for that.
unsafe impl Send for State {}

/// One rank of an NCCL group, bound to one CUDA backend (one GPU).
pub struct NcclComm {
    state: Mutex<State>,
    rank: usize,
    size: usize,
    ordinal: usize,
    ctx: Arc<CudaContext>,
    /// The backend's compute stream.
    compute: Arc<CudaStream>,
    /// This communicator's own stream; every NCCL launch goes here.
    stream: Arc<CudaStream>,
    /// Compute work up to a collective (the communication stream waits on it).
    ready: CudaEvent,
    /// Communication work up to the last collective (the compute stream and `wait` wait on it).
    done: CudaEvent,
    /// One device f32 for `barrier`'s all-reduce.
    token: u64,
    /// This group over the host transport: sends the ids for `split`.
    bootstrap: Box<dyn Communicator>,
    timeout: Mutex<Duration>,
}

impl NcclComm {
    /// Rank `bootstrap.rank()` of `bootstrap.size()` on `backend`'s GPU. Every member calls it at
    /// the same time; rank 0's unique id reaches the others through `bootstrap` (a host
    /// communicator: local or tcp). `timeout` bounds the start-up (the config's
    /// `comm.init_timeout_seconds`) and every later wait until `set_timeout` changes it.
    pub fn new(
        backend: &CudaBackend,
        bootstrap: &dyn Communicator,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let (major, minor, patch) = nccl_version()?;
        if ((major * 10000 + minor * 100 + patch) as i32) < MIN_VERSION {
            return Err(Error::Backend(format!(
                "nccl: version {major}.{minor}.{patch} is too old (2.18 or newer is needed)"
            )));
        }
        // Our own handle on the same group (a host split is local and copies no state).
        let all: Vec<usize> = (0..bootstrap.size()).collect();
        let boot = bootstrap.split(&all)?;
        NcclComm::start(
            backend.context().clone(),
            backend.stream().clone(),
            boot,
            timeout,
        )
    }

    fn start(
        ctx: Arc<CudaContext>,
        compute: Arc<CudaStream>,
        bootstrap: Box<dyn Communicator>,
        timeout: Duration,
    ) -> Result<NcclComm> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let ordinal = ctx.ordinal();
        bootstrap.set_timeout(timeout);
        // 128 id bytes as 32 f32 words: the host broadcast copies bytes, never values.
        let mut words = [0u32; 32];
        if rank == 0 {
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            let r = unsafe { sys::ncclGetUniqueId(&mut id) };
            if r != sys::ncclResult_t::ncclSuccess {
                return Err(Error::Comm(format!(
                    "nccl rank 0 of {size} (cuda:{ordinal}): ncclGetUniqueId failed: {}",
                    text(r)
                )));
            }
            for (w, c) in words.iter_mut().zip(id.internal.chunks_exact(4)) {
                *w = u32::from_ne_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]);
            }
        }
        let id_buf = Buf::new(words.as_mut_ptr() as u64, words.len(), DType::F32);
        bootstrap.broadcast(id_buf, 0).map_err(|e| {
            Error::Comm(format!(
                "nccl rank {rank} of {size} (cuda:{ordinal}): receiving rank 0's NCCL id over \
                 the bootstrap ({}): {e}",
                bootstrap.describe()
            ))
        })?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (c, w) in id.internal.chunks_exact_mut(4).zip(words) {
            for (d, b) in c.iter_mut().zip(w.to_ne_bytes()) {
                *d = b as c_char;
            }
        }

        ctx.bind_to_thread()
            .map_err(|e| backend_err("bind context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| backend_err("create the communication stream", e))?;
        let ready = ctx
            .new_event(None)
            .map_err(|e| backend_err("create event", e))?;
        let done = ctx
            .new_event(None)
            .map_err(|e| backend_err("create event", e))?;
        let token = unsafe { dr::malloc_sync(4) }
            .map_err(|e| backend_err("allocate the barrier word", e))?;
        let comm = NcclComm {
            state: Mutex::new(State {
                comm: std::ptr::null_mut(),
                broken: None,
                depth: 0,
            }),
            rank,
            size,
            ordinal,
            ctx,
            compute,
            stream,
            ready,
            done,
            token,
            bootstrap,
            timeout: Mutex::new(timeout),
        };
        // From here on `comm`'s drop frees what was made, and aborts a half-made communicator.
        unsafe { dr::memset_d8_sync(token, 0, 4) }
            .map_err(|e| backend_err("zero the barrier word", e))?;
        let mut st = comm.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut config = nonblocking_config();
        let r = unsafe {
            sys::ncclCommInitRankConfig(&mut st.comm, size as i32, id, rank as i32, &mut config)
        };
        comm.check(&mut st, "ncclCommInitRankConfig", r)?;
        comm.settle(&mut st, "start-up (ncclCommInitRankConfig)")?;
        drop(st);
        Ok(comm)
    }

    /// The sub-group of `ranks`, as an `NcclComm` (see `Communicator::split`).
    pub fn split_group(&self, ranks: &[usize]) -> Result<NcclComm> {
        if self.lock()?.depth > 0 {
            return Err(Error::Comm(format!(
                "{}: split inside group_start/group_end",
                self.describe()
            )));
        }
        let boot = self.bootstrap.split(ranks)?;
        NcclComm::start(
            self.ctx.clone(),
            self.compute.clone(),
            boot,
            self.current_timeout(),
        )
    }

    fn current_timeout(&self) -> Duration {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &st.broken {
            return Err(Error::Comm(format!(
                "the communicator was aborted earlier: {why}"
            )));
        }
        Ok(st)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_err("bind context to thread", e))
    }

    /// Aborts the communicator and makes the error every later call repeats.
    fn fail(&self, st: &mut State, msg: String) -> Error {
        if !st.comm.is_null() {
            // Aborting is the way out of a broken communicator; its own result adds nothing.
            let _ = unsafe { sys::ncclCommAbort(st.comm) };
            st.comm = std::ptr::null_mut();
        }
        let full = format!("{}: {msg}; the communicator was aborted", self.describe());
        st.broken = Some(full.clone());
        Error::Comm(full)
    }

    fn nccl_failed(&self, st: &mut State, what: &str, r: sys::ncclResult_t) -> Error {
        self.fail(
            st,
            format!(
                "{what} failed: {}; a peer rank may have died or called a different collective \
                 (NCCL does not say which peer)",
                text(r)
            ),
        )
    }

    fn timed_out(&self, st: &mut State, what: &str) -> Error {
        let t = self.current_timeout();
        self.fail(
            st,
            format!(
                "{what} did not complete within {} s: a peer rank is dead or stuck (NCCL cannot \
                 say which one; look at the other ranks' logs, or raise \
                 comm.train_timeout_seconds if they are only slow)",
                t.as_secs_f64()
            ),
        )
    }

    /// An NCCL call's immediate result: queued (or in progress) is fine, anything else aborts.
    fn check(&self, st: &mut State, what: &str, r: sys::ncclResult_t) -> Result<()> {
        match r {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            r => Err(self.nccl_failed(st, what, r)),
        }
    }

    /// The communicator's asynchronous state: `Ok(true)` once idle, `Ok(false)` while a call is
    /// still in progress, an error (after aborting) when NCCL reports one.
    fn poll_async(&self, st: &mut State, what: &str) -> Result<bool> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        let r = unsafe { sys::ncclCommGetAsyncError(st.comm, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(self.nccl_failed(st, what, r));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            s => Err(self.nccl_failed(st, what, s)),
        }
    }

    /// Polls until a non-blocking call has finished on the host side (its work is queued).
    fn settle(&self, st: &mut State, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.current_timeout();
        let mut backoff = Backoff(0);
        while !self.poll_async(st, what)? {
            if Instant::now() >= deadline {
                return Err(self.timed_out(st, what));
            }
            backoff.nap();
        }
        Ok(())
    }

    /// Polls the communication stream's last event and NCCL's asynchronous error.
    fn wait_locked(&self, st: &mut State, what: &str) -> Result<()> {
        self.bind()?;
        let deadline = Instant::now() + self.current_timeout();
        let mut backoff = Backoff(0);
        loop {
            let finished = self
                .done
                .try_is_complete()
                .map_err(|e| backend_err("query the communication stream's event", e))?;
            if finished {
                return Ok(());
            }
            self.poll_async(st, what)?;
            if Instant::now() >= deadline {
                return Err(self.timed_out(st, what));
            }
            backoff.nap();
        }
    }

    /// The communication stream waits for the compute stream's work so far.
    fn after_compute(&self) -> Result<()> {
        self.ready
            .record(&self.compute)
            .and_then(|()| self.stream.wait(&self.ready))
            .map_err(|e| backend_err("order the communication stream after compute", e))
    }

    /// The compute stream waits for the communication stream's work so far.
    fn before_compute(&self) -> Result<()> {
        self.done
            .record(&self.stream)
            .and_then(|()| self.compute.wait(&self.done))
            .map_err(|e| backend_err("order compute after the communication stream", e))
    }

    /// One NCCL launch on the communication stream, between the two event waits (inside a group
    /// those come from `group_start` / `group_end`).
    fn launch(
        &self,
        what: &str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        self.launch_ordered(what, call, true)
    }

    /// `launch`; `order` = false leaves compute unordered after it (`all_gather_start`), until
    /// `order_compute`.
    fn launch_ordered(
        &self,
        what: &str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
        order: bool,
    ) -> Result<()> {
        let mut st = self.lock()?;
        self.bind()?;
        let grouped = st.depth > 0;
        if !grouped {
            self.after_compute()?;
        }
        let r = call(st.comm, self.stream.cu_stream() as sys::cudaStream_t);
        self.check(&mut st, what, r)?;
        if !grouped {
            self.settle(&mut st, what)?;
            if order {
                self.before_compute()?;
            } else {
                // `wait` polls `done`: it must cover this launch too.
                self.done
                    .record(&self.stream)
                    .map_err(|e| backend_err("record the communication stream's event", e))?;
            }
        }
        Ok(())
    }

    /// Reduce-scatter; `order` as in `launch_ordered`.
    fn scatter(&self, send: Buf, recv: Buf, op: ReduceOp, order: bool) -> Result<()> {
        let dt = data_type("reduce_scatter", send)?;
        data_type("reduce_scatter", recv)?;
        if recv.dtype != send.dtype || send.len != recv.len * self.size {
            return Err(Error::Comm(format!(
                "reduce_scatter: send buffer {} x {} must be {} x the receive buffer ({} x {})",
                send.len, send.dtype, self.size, recv.len, recv.dtype
            )));
        }
        let (src, dst) = (send.ptr as *const c_void, recv.ptr as *mut c_void);
        self.launch_ordered(
            "reduce_scatter",
            |comm, s| unsafe {
                sys::ncclReduceScatter(src, dst, recv.len, dt, red_op(op), comm, s)
            },
            order,
        )
    }

    /// All-gather; `order` as in `launch_ordered`.
    fn gather(&self, send: Buf, recv: Buf, order: bool) -> Result<()> {
        let dt = data_type("all_gather", send)?;
        data_type("all_gather", recv)?;
        if recv.dtype != send.dtype || recv.len != send.len * self.size {
            return Err(Error::Comm(format!(
                "all_gather: receive buffer {} x {} must be {} x the send buffer ({} x {})",
                recv.len, recv.dtype, self.size, send.len, send.dtype
            )));
        }
        let (src, dst) = (send.ptr as *const c_void, recv.ptr as *mut c_void);
        self.launch_ordered(
            "all_gather",
            |comm, s| unsafe { sys::ncclAllGather(src, dst, send.len, dt, comm, s) },
            order,
        )
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        let grouped = self.state.lock().unwrap_or_else(|e| e.into_inner()).depth > 0;
        if peer >= self.size || (peer == self.rank && !grouped) {
            return Err(Error::Comm(format!(
                "{op}: peer {peer} is not another member of a group of {} (a rank may only \
                 send to itself inside group_start/group_end)",
                self.size
            )));
        }
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, buf: Buf, op: ReduceOp) -> Result<()> {
        let dt = data_type("all_reduce", buf)?;
        let p = buf.ptr as *mut c_void;
        self.launch("all_reduce", |comm, s| unsafe {
            sys::ncclAllReduce(p, p, buf.len, dt, red_op(op), comm, s)
        })
    }

    fn all_gather(&self, send: Buf, recv: Buf) -> Result<()> {
        self.gather(send, recv, true)
    }

    fn all_gather_start(&self, send: Buf, recv: Buf) -> Result<()> {
        self.gather(send, recv, false)
    }

    fn order_compute(&self) -> Result<()> {
        let _st = self.lock()?;
        self.bind()?;
        self.before_compute()
    }

    fn reduce_scatter(&self, send: Buf, recv: Buf, op: ReduceOp) -> Result<()> {
        self.scatter(send, recv, op, true)
    }

    fn reduce_scatter_start(&self, send: Buf, recv: Buf, op: ReduceOp) -> Result<()> {
        self.scatter(send, recv, op, false)
    }

    fn broadcast(&self, buf: Buf, root: usize) -> Result<()> {
        let dt = data_type("broadcast", buf)?;
        if root >= self.size {
            return Err(Error::Comm(format!(
                "broadcast: root {root} is not a member of a group of {}",
                self.size
            )));
        }
        let p = buf.ptr as *mut c_void;
        self.launch("broadcast", |comm, s| unsafe {
            sys::ncclBroadcast(p, p, buf.len, dt, root as i32, comm, s)
        })
    }

    fn send(&self, buf: Buf, peer: usize) -> Result<()> {
        let dt = data_type("send", buf)?;
        self.check_peer("send", peer)?;
        let p = buf.ptr as *const c_void;
        self.launch("send", |comm, s| unsafe {
            sys::ncclSend(p, buf.len, dt, peer as i32, comm, s)
        })
    }

    fn recv(&self, buf: Buf, peer: usize) -> Result<()> {
        let dt = data_type("recv", buf)?;
        self.check_peer("recv", peer)?;
        let p = buf.ptr as *mut c_void;
        self.launch("recv", |comm, s| unsafe {
            sys::ncclRecv(p, buf.len, dt, peer as i32, comm, s)
        })
    }

    /// An all-reduce of one word, then `wait`: returns once every rank arrived.
    fn barrier(&self) -> Result<()> {
        self.all_reduce(Buf::new(self.token, 1, DType::F32), ReduceOp::Sum)?;
        self.wait()
    }

    /// Polls until every collective this rank queued has completed on the GPU; an NCCL error
    /// or the timeout aborts the communicator and returns `Error::Comm`.
    fn wait(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.depth > 0 {
            return Err(Error::Comm(format!(
                "{}: wait inside group_start/group_end (the group's calls have not been \
                 launched yet)",
                self.describe()
            )));
        }
        self.wait_locked(&mut st, "waiting for the queued collectives")
    }

    fn group_start(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.bind()?;
        if st.depth == 0 {
            self.after_compute()?;
        }
        let r = unsafe { sys::ncclGroupStart() };
        self.check(&mut st, "group_start", r)?;
        st.depth += 1;
        Ok(())
    }

    fn group_end(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.depth == 0 {
            return Err(Error::Comm(format!(
                "{}: group_end without group_start",
                self.describe()
            )));
        }
        self.bind()?;
        st.depth -= 1;
        let r = unsafe { sys::ncclGroupEnd() };
        self.check(&mut st, "group_end", r)?;
        if st.depth == 0 {
            self.settle(&mut st, "group_end")?;
            self.before_compute()?;
        }
        Ok(())
    }

    fn split(&self, ranks: &[usize]) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(self.split_group(ranks)?))
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
        self.bootstrap.set_timeout(timeout);
    }

    fn describe(&self) -> String {
        format!(
            "rank {} of {} (nccl, cuda:{})",
            self.rank, self.size, self.ordinal
        )
    }
}

impl Drop for NcclComm {
    /// Lets queued collectives finish (within the timeout), then finalizes and destroys the
    /// communicator; anything that fails on the way aborts it instead. Errors cannot be
    /// reported from drop.
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.bind();
        if !st.comm.is_null() && st.depth == 0 && self.wait_locked(&mut st, "shutdown").is_ok() {
            let r = unsafe { sys::ncclCommFinalize(st.comm) };
            if self.check(&mut st, "ncclCommFinalize", r).is_ok()
                && self.settle(&mut st, "ncclCommFinalize").is_ok()
            {
                let _ = unsafe { sys::ncclCommDestroy(st.comm) };
                st.comm = std::ptr::null_mut();
            }
        }
        if !st.comm.is_null() {
            let _ = unsafe { sys::ncclCommAbort(st.comm) };
            st.comm = std::ptr::null_mut();
        }
        // The communication stream may still read the token; after an abort it drains.
        self.ctx.record_err(self.stream.synchronize());
        self.ctx.record_err(unsafe { dr::free_sync(self.token) });
    }
}
