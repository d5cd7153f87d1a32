//! Pipeline-parallel stage split: which layers each stage owns. The first stage also holds the
//! embedding and the last the final norm and output projection, so their layer counts are
//! balanced by giving the edge stages one layer less when that evens out the work. Generic over
//! models: a model folder's `infra/pipeline.rs` says what its layers and edge modules are.

use crate::error::{Error, Result};
use std::ops::Range;

/// What one pipeline stage owns: a contiguous run of transformer blocks, plus the embedding on
/// the first stage and the final norm + output projection on the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub layers: Range<usize>,
    pub embedding: bool,
    pub output: bool,
}

/// The stages of a decoder-only stack of `n_layers` blocks split `stages` ways.
pub fn split_stages(n_layers: usize, stages: usize) -> Result<Vec<Stage>> {
    let ranges = split_layers(n_layers, stages)?;
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

/// Splits `n_layers` across `stages` contiguous ranges (sizes differ by at most one; extra layers
/// go to the middle stages first, which carry no embedding or output work).
pub fn split_layers(n_layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    if stages == 0 || stages > n_layers {
        return Err(Error::Config(format!(
            "pipeline_parallel_degree {stages} must be between 1 and the number of layers ({n_layers})"
        )));
    }
    let base = n_layers / stages;
    let extra = n_layers % stages;
    // Order in which stages receive an extra layer: middle stages first, then the edges.
    let mut order: Vec<usize> = (1..stages.saturating_sub(1)).collect();
    order.extend([0, stages - 1].into_iter().filter(|&s| s < stages));
    order.dedup();
    let mut sizes = vec![base; stages];
    for &s in order.iter().take(extra) {
        sizes[s] += 1;
    }
    let mut start = 0;
    Ok(sizes
        .into_iter()
        .map(|n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn splits_cover_all_layers() {
        for (l, s) in [(32, 4), (126, 8), (6, 4), (7, 3), (1, 1)] {
            let r = split_layers(l, s).unwrap();
            assert_eq!(r.len(), s);
            assert_eq!(r[0].start, 0);
            assert_eq!(r.last().unwrap().end, l);
            let sizes: Vec<usize> = r.iter().map(|x| x.len()).collect();
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{sizes:?}"
            );
        }
        assert!(split_layers(4, 5).is_err());
        let st = split_stages(7, 3).unwrap();
        assert!(st[0].embedding && !st[0].output && st[2].output && !st[1].embedding);
    }
}
