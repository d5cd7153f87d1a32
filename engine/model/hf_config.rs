//! Reading fields of a Hugging Face `config.json`, with errors that name the file and the field:
//! what every model's `HfInterop::args_from_config` needs.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Reads and parses a `config.json` file; errors name the file.
pub fn read_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON ({e})", path.display())))
}

pub struct HfFields<'a> {
    pub v: &'a Value,
    pub path: &'a Path,
}

impl<'a> HfFields<'a> {
    pub fn new(v: &'a Value, path: &'a Path) -> Self {
        HfFields { v, path }
    }

    /// An error about `field`.
    pub fn bad(&self, field: &str, why: impl std::fmt::Display) -> Error {
        Error::Config(format!("{}: field {field}: {why}", self.path.display()))
    }

    /// The field, absent when missing or null.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }

    /// A required positive integer.
    pub fn uint(&self, k: &str) -> Result<usize> {
        let x = self.get(k).ok_or_else(|| self.bad(k, "missing"))?;
        x.as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| self.bad(k, format!("{x} is not a positive integer")))
    }

    /// A positive integer, `default` when absent.
    pub fn uint_or(&self, k: &str, default: usize) -> Result<usize> {
        match self.get(k) {
            Some(_) => self.uint(k),
            None => Ok(default),
        }
    }

    /// A number (`key` names it in errors, for nested fields).
    pub fn number(&self, key: &str, x: &Value) -> Result<f64> {
        x.as_f64()
            .ok_or_else(|| self.bad(key, format!("{x} is not a number")))
    }

    /// A number, `default` when absent.
    pub fn float_or(&self, k: &str, default: f64) -> Result<f64> {
        match self.get(k) {
            Some(x) => self.number(k, x),
            None => Ok(default),
        }
    }

    pub fn bool_or(&self, k: &str, default: bool) -> bool {
        self.get(k).and_then(Value::as_bool).unwrap_or(default)
    }

    /// Refuses `k` when it is set to anything but `allowed` (absent is fine).
    pub fn require_str(&self, k: &str, allowed: &str) -> Result<()> {
        match self.get(k) {
            Some(x) if x.as_str() != Some(allowed) => {
                Err(self.bad(k, format!("{x} is not supported (only \"{allowed}\")")))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a boolean feature flag that is true.
    pub fn refuse_true(&self, k: &str, why: &str) -> Result<()> {
        if self.bool_or(k, false) {
            return Err(self.bad(k, format!("true is not supported ({why})")));
        }
        Ok(())
    }

    /// `rope_theta`: top level (transformers 4) or inside `rope_parameters` (transformers 5).
    pub fn rope_theta(&self, default: f64) -> Result<f64> {
        if let Some(x) = self.get("rope_theta") {
            return self.number("rope_theta", x);
        }
        match self
            .get("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
        {
            Some(x) => self.number("rope_parameters.rope_theta", x),
            None => Ok(default),
        }
    }

    /// The rotary scaling object and its field name: `rope_scaling` (transformers 4) or
    /// `rope_parameters` (transformers 5, which also holds rope_theta).
    pub fn rope_scaling(&self) -> (&'static str, Option<&'a Value>) {
        match self.get("rope_scaling") {
            Some(s) => ("rope_scaling", Some(s)),
            None => ("rope_parameters", self.get("rope_parameters")),
        }
    }
}

/// The `rope_type` (or legacy `type`) of a rotary scaling object; None = default rotary.
pub fn rope_type(scaling: &Value) -> Option<&str> {
    scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .filter(|t| *t != "default")
}
