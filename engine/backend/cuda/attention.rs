//! Flash attention (kernels/attention.cu). PLACEHOLDER owned by the attention helper, who replaces
//! this file; until then both directions return a clean error.

use super::CudaBackend;
use crate::backend::{AttnShape, Buf};
use crate::error::{Error, Result};

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash_attention_fwd(
        &self,
        _q: Buf,
        _k: Buf,
        _v: Buf,
        _out: Buf,
        _lse: Buf,
        _s: AttnShape,
        _scale: f32,
    ) -> Result<()> {
        Err(Error::Backend("flash attention not built".into()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash_attention_bwd(
        &self,
        _q: Buf,
        _k: Buf,
        _v: Buf,
        _out: Buf,
        _dout: Buf,
        _lse: Buf,
        _dq: Buf,
        _dk: Buf,
        _dv: Buf,
        _s: AttnShape,
        _scale: f32,
    ) -> Result<()> {
        Err(Error::Backend("flash attention not built".into()))
    }
}
