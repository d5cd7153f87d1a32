//! Activation checkpointing policy from torchtitan's `[activation_checkpoint]`: mode none | full |
//! selective; for selective, `selective_ac_option` is "op" (keep matmul and attention outputs,
//! recompute the rest) or an integer N (checkpoint every N-th layer fully).

use crate::error::{Error, Result};
use crate::tape::AcPolicy;

/// The parsed `[activation_checkpoint]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcConfig {
    None,
    Full,
    SelectiveOp,
    EveryNth(usize),
}

impl AcConfig {
    pub fn parse(mode: &str, selective_option: &str) -> Result<AcConfig> {
        match mode {
            "none" => Ok(AcConfig::None),
            "full" => Ok(AcConfig::Full),
            "selective" if selective_option == "op" => Ok(AcConfig::SelectiveOp),
            "selective" => {
                let every: usize = selective_option.parse().map_err(|_| {
                    Error::Config(format!(
                        "activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got '{selective_option}'"
                    ))
                })?;
                if every == 0 {
                    return Err(Error::Config(
                        "activation_checkpoint.selective_ac_option must be >= 1".into(),
                    ));
                }
                Ok(AcConfig::EveryNth(every))
            }
            other => Err(Error::Config(format!(
                "activation_checkpoint.mode must be none, full or selective, got '{other}'"
            ))),
        }
    }

    /// The policy of transformer block `layer_id` (0-based), None = no checkpointing.
    pub fn block_policy(self, layer_id: usize) -> Option<AcPolicy> {
        match self {
            AcConfig::None => None,
            AcConfig::Full => Some(AcPolicy::Full),
            AcConfig::SelectiveOp => Some(AcPolicy::SaveMatmulAndAttention),
            AcConfig::EveryNth(n) => (layer_id + 1).is_multiple_of(n).then_some(AcPolicy::Full),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_layer_and_errors() {
        let c = AcConfig::parse("selective", "2").unwrap();
        let got: Vec<bool> = (0..5).map(|l| c.block_policy(l).is_some()).collect();
        assert_eq!(got, [false, true, false, true, false]);
        assert_eq!(
            AcConfig::parse("selective", "op").unwrap().block_policy(3),
            Some(AcPolicy::SaveMatmulAndAttention)
        );
        assert!(AcConfig::parse("selective", "0").is_err());
        assert!(AcConfig::parse("selective", "x").is_err());
        assert!(AcConfig::parse("partial", "op").is_err());
        assert_eq!(AcConfig::parse("none", "op").unwrap().block_policy(0), None);
    }
}
