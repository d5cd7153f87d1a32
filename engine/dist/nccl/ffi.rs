//! The library side of the NCCL communicator: the run-time probe (with what to do when NCCL is
//! missing), result texts, dtype and op codes, the non-blocking config and the poll backoff.

use super::super::ReduceOp;
use crate::backend::Buf;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::nccl::sys;
use std::ffi::{c_char, CStr};
use std::time::Duration;

/// NCCL_VERSION(2, 30, 0): the header that cudarc's bindings, and so our config struct, follow.
/// NCCL copies `size` bytes of a config and keeps its defaults for fields past them, so newer
/// libraries accept it.
const CONFIG_VERSION: u32 = 23000;
/// The oldest NCCL whose non-blocking API and config struct this code relies on (2.18).
pub(super) const MIN_VERSION: i32 = 21800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const UNDEF_INT: i32 = i32::MIN;

/// The NCCL library's version as (major, minor, patch), or `Error::Backend` with what to do when
/// it cannot be loaded. Never panics, so it is safe to call on a machine without NCCL.
pub fn nccl_version() -> Result<(u32, u32, u32)> {
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Backend(missing_library_message()));
    }
    let mut v = 0;
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    if r != sys::ncclResult_t::ncclSuccess {
        return Err(Error::Backend(format!(
            "nccl: ncclGetVersion failed: {}",
            text(r)
        )));
    }
    let v = v.max(0) as u32;
    Ok((v / 10000, v / 100 % 100, v % 100))
}

fn missing_library_message() -> String {
    // The pip wheel's name: loadable means only the unversioned link is missing.
    let versioned = unsafe {
        let h = libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if !h.is_null() {
            libc::dlclose(h);
        }
        !h.is_null()
    };
    if versioned {
        "nccl: libnccl.so.2 is on the library path but cudarc loads only the unversioned \
         libnccl.so: add a link `libnccl.so -> libnccl.so.2` in a directory on LD_LIBRARY_PATH \
         (scripts/install-cuda-toolchain.sh --nccl makes one beside the wheel's library)"
            .into()
    } else {
        "nccl: libnccl.so not found; install it with scripts/install-cuda-toolchain.sh --nccl \
         (the pinned nvidia-nccl-cu13 wheel) and add the nvidia/nccl/lib directory it prints to \
         LD_LIBRARY_PATH"
            .into()
    }
}

/// NCCL's name and text for a result, plus its last error message when it has one.
pub(super) fn text(r: sys::ncclResult_t) -> String {
    let cstr = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let name = cstr(unsafe { sys::ncclGetErrorString(r) });
    // The argument is unused by NCCL; the message is the thread's last one.
    let last = cstr(unsafe { sys::ncclGetLastError(std::ptr::null_mut()) });
    if last.is_empty() {
        format!("{r:?} ({name})")
    } else {
        format!("{r:?} ({name}: {last})")
    }
}

pub(super) fn data_type(op: &str, b: Buf) -> Result<sys::ncclDataType_t> {
    if b.len > 0 && b.ptr == 0 {
        return Err(Error::Comm(format!("{op}: null device buffer")));
    }
    match b.dtype {
        DType::F32 => Ok(sys::ncclDataType_t::ncclFloat32),
        DType::BF16 => Ok(sys::ncclDataType_t::ncclBfloat16),
        d => Err(Error::DType {
            op: "communicator",
            msg: format!("{op}: {d} buffers are not supported (f32 and bf16 are)"),
        }),
    }
}

pub(super) fn red_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
    }
}

/// NCCL_CONFIG_INITIALIZER with `blocking = 0`.
pub(super) fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// Sleeps between polls: short at first (a collective usually ends within microseconds of the
/// first look), then up to 1 ms so a long wait costs no CPU.
pub(super) struct Backoff(pub(super) u32);

impl Backoff {
    pub(super) fn nap(&mut self) {
        self.0 = self.0.saturating_add(1);
        if self.0 < 64 {
            std::thread::yield_now();
        } else {
            let us = (10u64 << ((self.0 - 64) / 16).min(7)).min(1000);
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}
