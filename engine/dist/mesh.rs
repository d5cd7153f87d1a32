//! The device mesh: how ranks are laid out over the parallel dimensions, torchtitan's
//! `ParallelDims`. Order outermost first: pp, dp_replicate, dp_shard, cp, tp — tensor-parallel
//! ranks are adjacent (one node, NVLink), pipeline and data parallelism cross nodes.

use super::Communicator;
use crate::error::{Error, Result};
use crate::train::config::{Degrees, Parallelism};

/// One axis of the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Pp,
    DpReplicate,
    DpShard,
    Cp,
    Tp,
}

/// The mesh order, outermost first.
pub const ORDER: [Dim; 5] = [Dim::Pp, Dim::DpReplicate, Dim::DpShard, Dim::Cp, Dim::Tp];

/// The resolved degrees of a world (`[parallelism]` validated against the world size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelDims {
    pub degrees: Degrees,
    pub world: usize,
}

impl ParallelDims {
    /// Resolves `[parallelism]` for `world` ranks (dp_shard = -1 takes the rest); an error names
    /// the product that does not match.
    pub fn new(p: &Parallelism, world: usize) -> Result<ParallelDims> {
        if world == 0 {
            return Err(Error::Config("world size must be at least 1".into()));
        }
        Ok(ParallelDims {
            degrees: p.resolve(world)?,
            world,
        })
    }

    pub fn size(&self, d: Dim) -> usize {
        let g = &self.degrees;
        match d {
            Dim::Pp => g.pp,
            Dim::DpReplicate => g.dp_replicate,
            Dim::DpShard => g.dp_shard,
            Dim::Cp => g.cp,
            Dim::Tp => g.tp,
        }
    }

    /// Ranks that see different data (dp_replicate x dp_shard).
    pub fn dp(&self) -> usize {
        self.degrees.dp()
    }

    /// The coordinate of `rank` along every axis, in `ORDER`.
    pub fn coords(&self, rank: usize) -> [usize; 5] {
        let mut c = [0; 5];
        let mut r = rank;
        for (i, d) in ORDER.iter().enumerate().rev() {
            let n = self.size(*d);
            c[i] = r % n;
            r /= n;
        }
        c
    }

    fn rank_of(&self, c: &[usize; 5]) -> usize {
        ORDER
            .iter()
            .zip(c)
            .fold(0, |acc, (d, &x)| acc * self.size(*d) + x)
    }

    /// The ranks sharing every coordinate with `rank` except along `dims`, ascending: the
    /// process group of those dimensions (e.g. [DpReplicate, DpShard] = the data-parallel group).
    pub fn group(&self, rank: usize, dims: &[Dim]) -> Vec<usize> {
        let base = self.coords(rank);
        let axes: Vec<usize> = (0..5).filter(|&i| dims.contains(&ORDER[i])).collect();
        let total: usize = axes.iter().map(|&i| self.size(ORDER[i])).product();
        let mut out: Vec<usize> = (0..total)
            .map(|mut k| {
                let mut c = base;
                for &i in axes.iter().rev() {
                    let n = self.size(ORDER[i]);
                    c[i] = k % n;
                    k /= n;
                }
                self.rank_of(&c)
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// This rank's index among the data-parallel ranks (which slice of the global batch it reads).
    pub fn dp_rank(&self, rank: usize) -> usize {
        let c = self.coords(rank);
        c[1] * self.degrees.dp_shard + c[2]
    }
}

/// The communicators of one rank: the world and one group per dimension it needs.
pub struct Mesh {
    pub dims: ParallelDims,
    pub world: Box<dyn Communicator>,
    /// dp_shard (FSDP's group).
    pub dp_shard: Box<dyn Communicator>,
    /// dp_replicate (HSDP's / DDP's all-reduce group).
    pub dp_replicate: Box<dyn Communicator>,
    /// Every data-parallel rank (replicate x shard): sums of per-batch values (tokens, losses).
    pub dp: Box<dyn Communicator>,
    /// The ranks of one data-parallel replica (pp x dp_shard x cp x tp): together they hold one
    /// copy of the model, so their gradient squares sum to the global norm's.
    pub replica: Box<dyn Communicator>,
    /// pp x dp: the ranks that hold different parts of the global batch's loss (its last
    /// pipeline stages, one per tp group).
    pub batch: Box<dyn Communicator>,
}

impl Mesh {
    /// Splits `world` into this rank's groups. Every rank calls it (collectively).
    pub fn new(dims: ParallelDims, world: Box<dyn Communicator>) -> Result<Mesh> {
        if world.size() != dims.world {
            return Err(Error::Config(format!(
                "the communicator has {} ranks, the parallel layout {}",
                world.size(),
                dims.world
            )));
        }
        let r = world.rank();
        let dp_shard = world.split(&dims.group(r, &[Dim::DpShard]))?;
        let dp_replicate = world.split(&dims.group(r, &[Dim::DpReplicate]))?;
        let dp = world.split(&dims.group(r, &[Dim::DpReplicate, Dim::DpShard]))?;
        let replica = world.split(&dims.group(r, &[Dim::Pp, Dim::DpShard, Dim::Cp, Dim::Tp]))?;
        let batch = world.split(&dims.group(r, &[Dim::Pp, Dim::DpReplicate, Dim::DpShard]))?;
        Ok(Mesh {
            dims,
            world,
            dp_shard,
            dp_replicate,
            dp,
            replica,
            batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(rep: i64, shard: i64, tp: i64, pp: i64, world: usize) -> ParallelDims {
        let p = Parallelism {
            data_parallel_replicate_degree: rep,
            data_parallel_shard_degree: shard,
            tensor_parallel_degree: tp,
            pipeline_parallel_degree: pp,
            ..Parallelism::default()
        };
        ParallelDims::new(&p, world).unwrap()
    }

    #[test]
    fn tp_is_innermost_pp_outermost() {
        let d = dims(1, 2, 2, 2, 8);
        assert_eq!(d.group(0, &[Dim::Tp]), vec![0, 1]);
        assert_eq!(d.group(0, &[Dim::DpShard]), vec![0, 2]);
        assert_eq!(d.group(0, &[Dim::Pp]), vec![0, 4]);
        assert_eq!(d.group(5, &[Dim::DpShard]), vec![5, 7]);
        assert_eq!(d.coords(7), [1, 0, 1, 0, 1]);
        // Every rank is in exactly one group of each dimension.
        for r in 0..8 {
            assert!(d.group(r, &[Dim::Tp]).contains(&r));
        }
    }

    #[test]
    fn hsdp_groups_and_dp_rank() {
        let d = dims(2, 2, 1, 1, 4);
        assert_eq!(d.group(0, &[Dim::DpReplicate]), vec![0, 2]);
        assert_eq!(d.group(3, &[Dim::DpShard]), vec![2, 3]);
        assert_eq!(
            d.group(1, &[Dim::DpReplicate, Dim::DpShard]),
            vec![0, 1, 2, 3]
        );
        let ranks: Vec<usize> = (0..4).map(|r| d.dp_rank(r)).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3]);
        assert_eq!(dims(1, -1, 1, 1, 4).degrees.dp_shard, 4);
    }

    #[test]
    fn bad_layouts_name_the_product() {
        let p = Parallelism {
            data_parallel_shard_degree: 3,
            ..Parallelism::default()
        };
        let e = ParallelDims::new(&p, 4).unwrap_err().to_string();
        assert!(
            e.contains("multiply to 3") && e.contains("world size is 4"),
            "{e}"
        );
    }
}
