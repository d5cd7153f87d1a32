//! Mutations that know the safetensors layout (8-byte little-endian header length, JSON header,
//! data), shared by the native-checkpoint and Hugging Face targets; and the classification of a
//! mutated file against its original, which decides what result is correct.

use super::{mutate, Fz};
use serde_json::{json, Value};

/// The header length and parsed header of a well-formed file.
pub fn header_of(bytes: &[u8]) -> Option<(usize, Value)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let text = bytes.get(8..8usize.checked_add(n)?)?;
    Some((n, serde_json::from_slice(text).ok()?))
}

fn with_header(fz: &mut Fz, orig: &[u8], n: usize, header: &Value) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    if fz.chance(0.5) {
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
    }
    let len = if fz.chance(0.75) {
        h.len() as u64
    } else {
        fz.note("keep the old header length");
        n as u64
    };
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&orig[8 + n..]);
    out
}

/// A tensor entry of the header edited the way a corrupt or hostile file would be.
fn edit_entry(fz: &mut Fz, header: &mut Value) {
    let Some(m) = header.as_object_mut() else {
        return;
    };
    let names: Vec<String> = m.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return;
    }
    let name = fz.pick(&names).clone();
    let e = &mut m[&name];
    let (a, b) = (
        e["data_offsets"][0].as_u64().unwrap_or(0),
        e["data_offsets"][1].as_u64().unwrap_or(0),
    );
    let (field, v) = match fz.below(9) {
        0 => ("shape", json!([1u64 << 32, 1u64 << 32, 1u64 << 32])),
        1 => ("shape", json!([usize::MAX, 2])),
        2 => ("shape", json!([])),
        3 => ("shape", json!([0])),
        4 => (
            "dtype",
            json!(*fz.pick(&["F64", "F8_E4M3", "Q4_0", "bf16", "", "BOOL"])),
        ),
        5 => ("data_offsets", json!([b, a])),
        6 => ("data_offsets", json!([a, u64::MAX])),
        7 => ("data_offsets", json!([a + 1, b + 1])),
        _ => ("data_offsets", json!([a, b.saturating_sub(2)])),
    };
    fz.note(format!("header: {name}.{field} = {v}"));
    e[field] = v;
}

/// One safetensors-aware mutation of `orig` (a well-formed file).
pub fn mutate(fz: &mut Fz, orig: &[u8]) -> Vec<u8> {
    let (n, header) = header_of(orig).expect("pristine files are well formed");
    let data_start = 8 + n;
    let mut out = orig.to_vec();
    match fz.below(8) {
        0 => {
            let random = fz.u64();
            let v = *fz.pick(&[
                u64::MAX,
                1 << 63,
                (-8i64) as u64,
                n as u64 + 1,
                n as u64 - 1,
                0,
                orig.len() as u64,
                orig.len() as u64 - 7,
                100_000_001,
                random,
            ]);
            fz.note(format!("header length = {v} (was {n})"));
            out[..8].copy_from_slice(&v.to_le_bytes());
        }
        1 | 2 => {
            let mut h = header;
            if fz.chance(0.5) {
                edit_entry(fz, &mut h);
            } else {
                for _ in 0..fz.range(1, 2) {
                    mutate::json(fz, &mut h);
                }
            }
            out = with_header(fz, orig, n, &h);
        }
        3 => {
            let at = match fz.below(4) {
                0 => fz.below(9),
                1 => fz.range(8, data_start),
                2 => fz.range(data_start, orig.len() - 1),
                _ => orig.len() - 1,
            };
            fz.note(format!("truncate to {at} bytes (of {})", orig.len()));
            out.truncate(at);
        }
        4 => {
            for _ in 0..fz.range(1, 3) {
                mutate::bytes(fz, &mut out, Some((0, data_start)));
            }
        }
        5 => {
            let k = fz.range(1, 64);
            fz.note(format!("append {k} zero bytes"));
            out.extend(std::iter::repeat_n(0u8, k));
        }
        _ if orig.len() > data_start => {
            let at = fz.range(data_start, orig.len() - 1);
            let bit = fz.below(8);
            fz.note(format!("flip bit {bit} of data byte {at}"));
            out[at] ^= 1 << bit;
        }
        _ => {}
    }
    out
}

/// How a mutated file relates to its original.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// A strict prefix of the original.
    Truncated,
    /// Same length and header; only tensor bytes differ.
    DataOnly,
    Other,
}

pub fn classify(orig: &[u8], new: &[u8]) -> Change {
    if orig == new {
        return Change::None;
    }
    if new.len() < orig.len() && orig.starts_with(new) {
        return Change::Truncated;
    }
    let (n, _) = header_of(orig).expect("pristine files are well formed");
    if new.len() == orig.len() && new[..8 + n] == orig[..8 + n] {
        return Change::DataOnly;
    }
    Change::Other
}
