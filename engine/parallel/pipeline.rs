//! Pipeline-parallel stage split: which layers each stage owns (torchtitan's
//! `pipeline_module_split` / `generate_llm_fqn_per_model_part`). The first stage also holds the
//! embedding and the last the final norm and output projection; each counts as
//! `pipeline_parallel_first_stage_less_layers` / `_last_stage_less_layers` layers of work, so the
//! edge stages get that many blocks fewer. Generic over models: a model folder's
//! `infra/pipeline.rs` says what its layers are.

use crate::error::{Error, Result};
use crate::train::config::Parallelism;
use std::ops::Range;

/// What one pipeline stage owns: a contiguous run of transformer blocks (by their global layer
/// ids), plus the embedding on the first stage and the final norm + output projection on the
/// last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub layers: Range<usize>,
    pub embedding: bool,
    pub output: bool,
}

impl Stage {
    /// The whole model as one stage.
    pub fn whole(n_layers: usize) -> Stage {
        Stage {
            layers: 0..n_layers,
            embedding: true,
            output: true,
        }
    }
}

/// A model folder's check that `stage` fits its `n_layers` blocks.
pub fn check_stage(stage: &Stage, n_layers: usize, model: &str) -> Result<()> {
    if stage.layers.start > stage.layers.end || stage.layers.end > n_layers {
        return Err(Error::Config(format!(
            "{model}: pipeline stage of layers {:?} outside the model's {n_layers} layers",
            stage.layers
        )));
    }
    Ok(())
}

/// The `[parallelism]` keys that decide the split, with the stage count resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitSpec {
    pub stages: usize,
    /// `pipeline_parallel_split_points`: "layers.N" starts a new stage at block N.
    pub split_points: Vec<String>,
    pub first_stage_less_layers: usize,
    pub last_stage_less_layers: usize,
}

impl SplitSpec {
    /// torchtitan's stage count: `len(split_points) + 1` when split points are given, else
    /// `ceil((n_layers + first_less + last_less) / layers_per_stage)` when that is set, else
    /// `pp * stages_per_rank` (1, or 2 for the interleaved schedules).
    pub fn from_config(p: &Parallelism, n_layers: usize, interleaved: bool) -> Result<SplitSpec> {
        let weight = |k: &str, v: i64| {
            usize::try_from(v)
                .map_err(|_| Error::Config(format!("parallelism.{k} = {v}: must be 0 or more")))
        };
        let first = weight(
            "pipeline_parallel_first_stage_less_layers",
            p.pipeline_parallel_first_stage_less_layers,
        )?;
        let last = weight(
            "pipeline_parallel_last_stage_less_layers",
            p.pipeline_parallel_last_stage_less_layers,
        )?;
        let pp = p.pipeline_parallel_degree.max(1) as usize;
        let stages = if !p.pipeline_parallel_split_points.is_empty() {
            p.pipeline_parallel_split_points.len() + 1
        } else if let Some(per) = p.pipeline_parallel_layers_per_stage {
            (n_layers + first + last).div_ceil(per.max(1) as usize)
        } else {
            pp * if interleaved { 2 } else { 1 }
        };
        Ok(SplitSpec {
            stages,
            split_points: p.pipeline_parallel_split_points.clone(),
            first_stage_less_layers: first,
            last_stage_less_layers: last,
        })
    }
}

/// The stages of a decoder-only stack of `n_layers` blocks.
pub fn split_decoder(n_layers: usize, s: &SplitSpec) -> Result<Vec<Stage>> {
    let ranges = if s.split_points.is_empty() {
        balanced(n_layers, s)?
    } else {
        at_split_points(n_layers, &s.split_points)?
    };
    let last = ranges.len() - 1;
    Ok(ranges
        .into_iter()
        .enumerate()
        .map(|(i, layers)| Stage {
            layers,
            embedding: i == 0,
            output: i == last,
        })
        .collect())
}

/// torchtitan's even split: the embedding and the output count as `first_less` / `last_less`
/// layers; `n_layers + first_less + last_less` units of work go to the stages evenly, the first
/// `extra` stages one more.
fn balanced(n_layers: usize, s: &SplitSpec) -> Result<Vec<Range<usize>>> {
    let (n, first, last) = (
        s.stages,
        s.first_stage_less_layers,
        s.last_stage_less_layers,
    );
    if n == 0 || n > n_layers {
        return Err(Error::Config(format!(
            "pipeline: {n} stages for {n_layers} layers: there must be between 1 stage and one \
             per layer (pipeline_parallel_degree x stages per rank, or \
             pipeline_parallel_layers_per_stage)"
        )));
    }
    if n == 1 {
        return Ok(std::iter::once(0..n_layers).collect());
    }
    let total = n_layers + first + last;
    let (per, extra) = (total / n, total % n);
    if first > per || last > per {
        return Err(Error::Config(format!(
            "pipeline: {n} stages of {per} layers cannot absorb \
             pipeline_parallel_first_stage_less_layers {first} / \
             pipeline_parallel_last_stage_less_layers {last} (use fewer stages or smaller \
             weights)"
        )));
    }
    let mut start = 0;
    Ok((0..n)
        .map(|i| {
            let mut k = per + usize::from(i < extra);
            if i == 0 {
                k -= first;
            } else if i == n - 1 {
                k -= last;
            }
            let r = start..(start + k).min(n_layers);
            start = r.end;
            r
        })
        .collect())
}

/// Stages that start at the blocks named "layers.N" (ascending, inside the stack).
fn at_split_points(n_layers: usize, points: &[String]) -> Result<Vec<Range<usize>>> {
    let mut starts = vec![0];
    for p in points {
        let n = p
            .strip_prefix("layers.")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "parallelism.pipeline_parallel_split_points: {p:?} is not \"layers.N\""
                ))
            })?;
        let prev = *starts.last().unwrap_or(&0);
        if n <= prev || n >= n_layers {
            return Err(Error::Config(format!(
                "parallelism.pipeline_parallel_split_points: {p:?} must name a block after the \
                 previous split (layers.{prev}) and before the last block (the model has \
                 {n_layers} layers)"
            )));
        }
        starts.push(n);
    }
    starts.push(n_layers);
    Ok(starts.windows(2).map(|w| w[0]..w[1]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(stages: usize, first: usize, last: usize) -> SplitSpec {
        SplitSpec {
            stages,
            split_points: vec![],
            first_stage_less_layers: first,
            last_stage_less_layers: last,
        }
    }

    fn layers(st: &[Stage]) -> Vec<Range<usize>> {
        st.iter().map(|s| s.layers.clone()).collect()
    }

    #[test]
    fn torchtitan_even_split_with_edge_weights() {
        // 6 layers + 2 edge units over 2 stages: 4 each, the embedding and output take one.
        let st = split_decoder(6, &spec(2, 1, 1)).unwrap();
        assert_eq!(layers(&st), vec![0..3, 3..6]);
        assert!(st[0].embedding && !st[0].output && st[1].output && !st[1].embedding);
        assert_eq!(
            layers(&split_decoder(6, &spec(4, 1, 1)).unwrap()),
            vec![0..1, 1..3, 3..5, 5..6]
        );
        // 32 layers + 2 over 4 stages: 9, 9, 8, 8 units (torchtitan's extra go first).
        assert_eq!(
            layers(&split_decoder(32, &spec(4, 1, 1)).unwrap()),
            vec![0..8, 8..17, 17..25, 25..32]
        );
        assert_eq!(
            layers(&split_decoder(8, &spec(2, 0, 0)).unwrap()),
            vec![0..4, 4..8]
        );
        for (l, s) in [(126, 8), (6, 6), (7, 3), (1, 1), (16, 4)] {
            let r = layers(&split_decoder(l, &spec(s, 1, 1)).unwrap());
            assert_eq!((r.len(), r[0].start, r[s - 1].end), (s, 0, l), "{r:?}");
            assert!(r.windows(2).all(|w| w[0].end == w[1].start), "{r:?}");
        }
    }

    #[test]
    fn bad_splits_are_errors() {
        let e = split_decoder(4, &spec(5, 1, 1)).unwrap_err().to_string();
        assert!(e.contains("5 stages for 4 layers"), "{e}");
        let e = split_decoder(6, &spec(4, 3, 1)).unwrap_err().to_string();
        assert!(e.contains("first_stage_less_layers 3"), "{e}");
        let pts = |p: &[&str]| SplitSpec {
            split_points: p.iter().map(|s| s.to_string()).collect(),
            ..spec(p.len() + 1, 1, 1)
        };
        let st = split_decoder(6, &pts(&["layers.2", "layers.5"])).unwrap();
        assert_eq!(layers(&st), vec![0..2, 2..5, 5..6]);
        for bad in [
            &["layers.0"][..],
            &["layers.6"],
            &["layers.3", "layers.2"],
            &["blocks.2"],
        ] {
            let e = split_decoder(6, &pts(bad)).unwrap_err().to_string();
            assert!(e.contains("pipeline_parallel_split_points"), "{bad:?}: {e}");
        }
    }
}
