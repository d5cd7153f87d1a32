//! Weight initialisation shared by the model folders: each module's `init_weights` draws its
//! parameters through an [`Init`], so the streams are deterministic for any thread count.

use crate::backend::Backend;
use crate::error::Result;
use crate::params::{ParamId, ParamStore};
use crate::rng::Rng;

/// The store to write into, the backend holding it and the run's seed.
pub struct Init<'a> {
    pub store: &'a ParamStore,
    pub be: &'a dyn Backend,
    pub seed: u64,
}

impl Init<'_> {
    /// Draws `n` values with `f`, in parallel chunks, each chunk from its own stream seeded by
    /// (seed, parameter, chunk): deterministic for any thread count.
    fn draw(&self, id: ParamId, f: impl Fn(&mut Rng) -> f64 + Sync) -> Vec<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let n = self.store.numel(id);
        let (seed, key) = (self.seed, self.store.init_key(id) as u64);
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
            let mut rng =
                Rng::new(seed ^ (key << 40) ^ ((c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            for x in dst {
                *x = f(&mut rng) as f32;
            }
        });
        out
    }

    /// torch.nn.init.trunc_normal_(std, a=-2, b=2) (absolute bounds, as torchtitan calls it).
    pub fn trunc_normal(&self, id: ParamId, std: f64) -> Result<()> {
        self.trunc_normal_ab(id, std, -2.0, 2.0)
    }

    /// torch.nn.init.trunc_normal_ with absolute bounds [a, b].
    pub fn trunc_normal_ab(&self, id: ParamId, std: f64, a: f64, b: f64) -> Result<()> {
        if self.be.is_meta() {
            return Ok(());
        }
        let data = self.draw(id, |r| r.trunc_normal(std, a, b));
        self.store.set(self.be, id, &data)
    }

    pub fn normal(&self, id: ParamId, std: f64) -> Result<()> {
        if self.be.is_meta() {
            return Ok(());
        }
        let data = self.draw(id, |r| r.normal() * std);
        self.store.set(self.be, id, &data)
    }

    pub fn ones(&self, id: ParamId) -> Result<()> {
        if self.be.is_meta() {
            return Ok(());
        }
        self.store
            .set(self.be, id, &vec![1.0; self.store.numel(id)])
    }
}
