//! FSDP (ZeRO-3 with FSDP2's semantics) over the flat parameter store: the layout.
//!
//! Every parameter is sharded on dim 0 across the `dp_shard` ranks: rank j holds rows
//! `[j c, j c + c)` of a parameter with `c = ceil(rows / ranks)` (the last ranks hold fewer, or
//! none; their padding rows stay zero). A rank's shards of all parameters form its *local* flat
//! regions (f32 master, gradient, AdamW m and v, the compute-dtype copy), so the optimizer is
//! still one fused AdamW over one contiguous range and a checkpoint box is a dim-0 row range.
//!
//! Parameters are grouped into *units*, torchtitan's `fully_shard` modules: each transformer block
//! (declared by the model's `infra/parallelize.rs`) and the root unit of everything else
//! (embeddings, final norm, output). A unit's shards are contiguous in the local regions, so one
//! all-gather brings a whole unit: rank j's `shard_len` elements land at `j shard_len` of a
//! staging buffer and are copied out into the unit's *slot*, where each parameter is whole and
//! contiguous (kernels see ordinary tensors). Gradients go the other way: the unit's full f32
//! gradients accumulate in a grad slot, are packed per destination rank and reduce-scattered
//! into the local gradient shard.
//!
//! Slots are planned statically, like activations: a unit always uses the same slot, so the
//! pointers the tape records in forward are valid again in backward. Units whose lifetimes
//! overlap get different slots:
//! - the root unit (parameters no declared unit holds, e.g. a tied embedding used first and
//!   last) has its own slots (FSDP2 never reshards the root after forward either);
//! - `fsdp_reshard_after_forward = "never"` gives every unit its own parameter slot: gathered
//!   once per step, no re-gather in backward;
//! - `"always"` rotates the declared units through two parameter slots: unit k computes in one
//!   while unit k + 1 is gathered into the other, and backward gathers again;
//! - `"default"` is `"always"` except that the last declared unit (the final norm and output,
//!   which backward starts with) keeps its own slot, as torchtitan does.
//!
//! Gradient slots: the root's is its own (its gradients may span the whole backward); declared
//! units rotate through two when each micro-batch reduces (one step = one micro-batch), and have
//! one each when gradient accumulation defers the reduce-scatter to the step's last micro-batch.

use crate::error::{Error, Result};
use crate::params::{ParamId, ParamSpec};

/// Local shard offsets are rounded up to this (elements): 512-byte aligned kernels' operands.
pub const ALIGN: usize = 128;

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// `fsdp_reshard_after_forward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reshard {
    Default,
    Always,
    Never,
}

impl Reshard {
    pub fn parse(s: &str) -> Result<Reshard> {
        match s {
            "default" => Ok(Reshard::Default),
            "always" => Ok(Reshard::Always),
            "never" => Ok(Reshard::Never),
            _ => Err(Error::Config(format!(
                "parallelism.fsdp_reshard_after_forward = \"{s}\": expected \"default\", \
                 \"always\" or \"never\""
            ))),
        }
    }
}

/// One parameter's shard on this rank.
#[derive(Clone, Debug)]
pub struct ShardedParam {
    /// dim 0 of the parameter, and the elements of one row (the other dims' product).
    pub rows: usize,
    pub row: usize,
    /// Rows per rank: ceil(rows / ranks).
    pub chunk: usize,
    /// Element offset of this parameter's shard in the local regions.
    pub local_off: usize,
    /// Element offset of the whole parameter in its unit's slot.
    pub full_off: usize,
    pub unit: usize,
}

impl ShardedParam {
    /// The rows rank `j` holds: (first row, count).
    pub fn rows_of(&self, j: usize) -> (usize, usize) {
        let start = (j * self.chunk).min(self.rows);
        (start, (start + self.chunk).min(self.rows) - start)
    }
    /// Elements of every rank's (padded) shard.
    pub fn shard_len(&self) -> usize {
        self.chunk * self.row
    }
}

/// One `fully_shard` unit.
#[derive(Clone, Debug)]
pub struct Unit {
    pub params: Vec<ParamId>,
    /// Start of the unit's shards in the local regions, and their padded length (the same on
    /// every rank: the all-gather's per-rank count).
    pub local_off: usize,
    pub shard_len: usize,
    /// Elements of the unit's whole parameters (its slot's size).
    pub full_len: usize,
    pub param_slot: usize,
    pub grad_slot: usize,
}

/// The sharding of one model over `ranks` dp_shard ranks, seen from rank `rank`.
#[derive(Clone, Debug)]
pub struct FsdpLayout {
    pub ranks: usize,
    pub rank: usize,
    pub reshard: Reshard,
    /// By `ParamId`.
    pub params: Vec<ShardedParam>,
    /// Unit 0 is the root; 1.. the modules in the order given (forward order).
    pub units: Vec<Unit>,
    /// Elements of each local region.
    pub local_len: usize,
    /// Slot (offset, len) in the gathered-parameter arena (compute dtype) and in the gradient
    /// arena (f32).
    pub param_slots: Vec<(usize, usize)>,
    pub grad_slots: Vec<(usize, usize)>,
    /// Largest `shard_len` of any unit: the staging buffers hold `ranks` of it.
    pub max_shard: usize,
}

/// Assigns each unit (by position) a slot: units with `Some(k)` share rotating slot k, the rest
/// have their own. Returns slot per unit and slot sizes.
fn plan_slots(
    units: &[Unit],
    rotating: &dyn Fn(usize) -> Option<usize>,
) -> (Vec<usize>, Vec<usize>) {
    let mut sizes: Vec<usize> = Vec::new();
    let mut shared: Vec<Option<usize>> = Vec::new(); // rotating index -> slot
    let mut slot_of = Vec::with_capacity(units.len());
    for (i, u) in units.iter().enumerate() {
        let s = match rotating(i) {
            Some(k) => {
                if shared.len() <= k {
                    shared.resize(k + 1, None);
                }
                *shared[k].get_or_insert_with(|| {
                    sizes.push(0);
                    sizes.len() - 1
                })
            }
            None => {
                sizes.push(0);
                sizes.len() - 1
            }
        };
        sizes[s] = sizes[s].max(u.full_len);
        slot_of.push(s);
    }
    (slot_of, sizes)
}

fn offsets(sizes: &[usize]) -> Vec<(usize, usize)> {
    let mut off = 0;
    sizes
        .iter()
        .map(|&n| {
            let o = off;
            off += align(n);
            (o, n)
        })
        .collect()
}

impl FsdpLayout {
    /// Shards `specs` over `ranks` ranks; `modules` are the blocks' parameters (each a unit),
    /// everything else is the root unit. `defer_reduce`: gradient accumulation reduces on the
    /// step's last micro-batch only.
    pub fn new(
        specs: &[ParamSpec],
        modules: &[Vec<ParamId>],
        ranks: usize,
        rank: usize,
        reshard: Reshard,
        defer_reduce: bool,
    ) -> Result<FsdpLayout> {
        if ranks == 0 || rank >= ranks {
            return Err(Error::Config(format!("FSDP rank {rank} of {ranks} ranks")));
        }
        let mut unit_of = vec![usize::MAX; specs.len()];
        for (m, ids) in modules.iter().enumerate() {
            for id in ids {
                let u = unit_of.get_mut(id.0).ok_or_else(|| {
                    Error::Config(format!(
                        "FSDP unit {m} names parameter {} of {}",
                        id.0,
                        specs.len()
                    ))
                })?;
                if *u != usize::MAX {
                    return Err(Error::Config(format!(
                        "parameter {} is in two FSDP units",
                        specs[id.0].name
                    )));
                }
                *u = m + 1;
            }
        }
        let mut members: Vec<Vec<ParamId>> = vec![Vec::new(); modules.len() + 1];
        for (i, u) in unit_of.iter_mut().enumerate() {
            if *u == usize::MAX {
                *u = 0;
            }
            members[*u].push(ParamId(i));
        }
        let mut params: Vec<Option<ShardedParam>> = vec![None; specs.len()];
        let mut units = Vec::with_capacity(members.len());
        let mut local = 0usize;
        for (ui, ids) in members.into_iter().enumerate() {
            let start = local;
            let mut full = 0usize;
            for &id in &ids {
                let shape = &specs[id.0].shape;
                let rows = shape.dims().first().copied().unwrap_or(1).max(1);
                if rows < ranks {
                    return Err(Error::Config(format!(
                        "parallelism.data_parallel_shard_degree = {ranks} is larger than dim 0 \
                         ({rows}) of parameter {} {shape}: FSDP shards every parameter on dim 0",
                        specs[id.0].name
                    )));
                }
                let row = shape.numel() / rows;
                let chunk = rows.div_ceil(ranks);
                params[id.0] = Some(ShardedParam {
                    rows,
                    row,
                    chunk,
                    local_off: local,
                    full_off: full,
                    unit: ui,
                });
                local += align(chunk * row);
                full += align(rows * row);
            }
            units.push(Unit {
                params: ids,
                local_off: start,
                shard_len: local - start,
                full_len: full,
                param_slot: 0,
                grad_slot: 0,
            });
        }
        let blocks = modules.len();
        let last = blocks; // unit index of the last block
        let param_rot = |i: usize| -> Option<usize> {
            match reshard {
                _ if i == 0 => None,
                Reshard::Never => None,
                Reshard::Default if i == last => None,
                _ => Some(i % 2),
            }
        };
        let grad_rot = |i: usize| (i != 0 && !defer_reduce).then_some(i % 2);
        let (pslot, psizes) = plan_slots(&units, &param_rot);
        let (gslot, gsizes) = plan_slots(&units, &grad_rot);
        for (i, u) in units.iter_mut().enumerate() {
            u.param_slot = pslot[i];
            u.grad_slot = gslot[i];
        }
        let max_shard = units.iter().map(|u| u.shard_len).max().unwrap_or(0);
        Ok(FsdpLayout {
            ranks,
            rank,
            reshard,
            params: params
                .into_iter()
                .map(|p| p.expect("every parameter is in a unit"))
                .collect(),
            units,
            local_len: local.max(ALIGN),
            param_slots: offsets(&psizes),
            grad_slots: offsets(&gsizes),
            max_shard,
        })
    }

    /// Elements of the gathered-parameter arena and of the gradient arena.
    pub fn param_arena(&self) -> usize {
        self.param_slots
            .last()
            .map_or(0, |&(o, n)| o + align(n))
            .max(ALIGN)
    }
    pub fn grad_arena(&self) -> usize {
        self.grad_slots
            .last()
            .map_or(0, |&(o, n)| o + align(n))
            .max(ALIGN)
    }
    /// Elements of one staging buffer (every rank's shard of the largest unit).
    pub fn staging(&self) -> usize {
        (self.ranks * self.max_shard).max(ALIGN)
    }

    /// This rank's rows of parameter `id`: (first row, count).
    pub fn my_rows(&self, id: ParamId) -> (usize, usize) {
        self.params[id.0].rows_of(self.rank)
    }

    /// Every (rank j's rows of a parameter of unit `u`) block, as (offset in a staging buffer of
    /// `ranks x shard_len`, offset in the unit's slot, elements): the copy-out after an
    /// all-gather and the pack before a reduce-scatter.
    pub fn blocks(&self, u: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let unit = &self.units[u];
        unit.params.iter().flat_map(move |id| {
            let p = &self.params[id.0];
            let at = p.local_off - unit.local_off;
            (0..self.ranks).filter_map(move |j| {
                let (row0, rows) = p.rows_of(j);
                (rows > 0).then(|| {
                    (
                        j * unit.shard_len + at,
                        p.full_off + row0 * p.row,
                        rows * p.row,
                    )
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Shape;

    fn spec(name: &str, dims: &[usize]) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: Shape::new(dims),
            init_key: 0,
        }
    }

    fn model(blocks: usize) -> (Vec<ParamSpec>, Vec<Vec<ParamId>>) {
        let mut specs = vec![spec("emb", &[37, 8])];
        let mut modules = Vec::new();
        for b in 0..blocks {
            let first = specs.len();
            specs.push(spec(&format!("b{b}.w"), &[24, 8]));
            specs.push(spec(&format!("b{b}.norm"), &[8]));
            modules.push((first..specs.len()).map(ParamId).collect());
        }
        specs.push(spec("out", &[37, 8]));
        (specs, modules)
    }

    #[test]
    fn rows_tile_every_parameter_and_units_are_contiguous() {
        let (specs, modules) = model(3);
        for ranks in [1, 2, 3, 4] {
            let l = FsdpLayout::new(&specs, &modules, ranks, 0, Reshard::Default, false).unwrap();
            for p in &l.params {
                let mut next = 0;
                for j in 0..ranks {
                    let (s, n) = p.rows_of(j);
                    assert!(n <= p.chunk);
                    if n > 0 {
                        assert_eq!(s, next);
                        next = s + n;
                    }
                }
                assert_eq!(next, p.rows, "ranks {ranks}");
            }
            // Root first: emb and out; then blocks in order.
            assert_eq!(l.units[0].params, vec![ParamId(0), ParamId(7)]);
            for (u, unit) in l.units.iter().enumerate() {
                let mut off = unit.local_off;
                for id in &unit.params {
                    assert_eq!(l.params[id.0].local_off, off);
                    assert_eq!(l.params[id.0].unit, u);
                    off += align(l.params[id.0].shard_len());
                }
                assert_eq!(off, unit.local_off + unit.shard_len);
            }
        }
    }

    #[test]
    fn slots_follow_the_reshard_policy() {
        let (specs, modules) = model(4);
        let slots = |r, defer| {
            let l = FsdpLayout::new(&specs, &modules, 2, 1, r, defer).unwrap();
            let p: Vec<usize> = l.units.iter().map(|u| u.param_slot).collect();
            let g: Vec<usize> = l.units.iter().map(|u| u.grad_slot).collect();
            (p, g)
        };
        // Units: root, b0..b3. Blocks b0, b2 share a slot, b1 (and b3 unless kept) the other.
        assert_eq!(slots(Reshard::Always, false).0, vec![0, 1, 2, 1, 2]);
        assert_eq!(slots(Reshard::Default, false).0, vec![0, 1, 2, 1, 3]);
        assert_eq!(slots(Reshard::Never, false).0, vec![0, 1, 2, 3, 4]);
        assert_eq!(slots(Reshard::Default, false).1, vec![0, 1, 2, 1, 2]);
        assert_eq!(slots(Reshard::Default, true).1, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_dimension_smaller_than_the_degree_is_refused() {
        let (specs, modules) = model(1);
        let e = FsdpLayout::new(&specs, &modules, 9, 0, Reshard::Default, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b0.norm") && e.contains("dim 0 (8)"), "{e}");
    }
}
