//! Native checkpoints: `checkpoint::load_dir` (the manifest reader, the layout check, the shard
//! headers) and every read (`read_global`, `read_rows`, `verify_all`) over a folder whose
//! manifest or shard files were mutated.
//!
//! Correct results checked: a folder whose bytes were not changed, or whose manifest was only
//! reformatted, loads to the same manifest and tensors; any tensor read from a mutated folder
//! whose manifest entry is unchanged has the saved bytes; a truncated shard, or one whose
//! tensor bytes changed, is an error naming that file; every error names the folder.

use super::safetensors_mut::{self as st, Change};
use super::{mutate, Case, Check, Dump, Fz, Verdict};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use titan::checkpoint::{self, load_dir, Manifest, NamedTensor, MANIFEST_FILE};
use titan::rng::Rng;
use titan::{DType, Error};

const SHARDS: [&str; 2] = ["rank-00000.safetensors", "rank-00001.safetensors"];

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Rows [a, b) x cols [c, d) of a row-major [.., cols] matrix.
fn block(full: &[f32], cols: usize, (a, b): (usize, usize), (c, d): (usize, usize)) -> Vec<f32> {
    (a..b)
        .flat_map(|r| full[r * cols + c..r * cols + d].to_vec())
        .collect()
}

struct Pristine {
    files: BTreeMap<&'static str, Vec<u8>>,
    manifest: Manifest,
    /// Every tensor's global bytes, as written.
    tensors: BTreeMap<String, Vec<u8>>,
}

/// Two ranks: dim-0 and dim-1 shards, a replica, a rank-0-only i32, bf16 halves, a scalar.
fn pristine(root: &Path) -> Pristine {
    let w: Vec<f32> = (0..24).map(|i| 1.0 + i as f32 * 0.5).collect(); // [6, 4]
    let m: Vec<f32> = (0..24).map(|i| -3.0 - i as f32).collect(); // [4, 6]
    let norm: Vec<f32> = vec![0.5, 1.5, 2.5, 3.5];
    let tok: Vec<u8> = [7i32, -1, 3, 9, 0, 2]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let b: Vec<u8> = (10..18u8).collect(); // [4] bf16
    let s = f32_bytes(&[42.0]);
    let (wb, nb) = (f32_bytes(&w), f32_bytes(&norm));
    let mb: Vec<Vec<u8>> = [(0, 3), (3, 6)]
        .iter()
        .map(|&c| f32_bytes(&block(&m, 6, (0, 4), c)))
        .collect();
    let cols = |r: usize| NamedTensor {
        name: "m".into(),
        dtype: DType::F32,
        shape: vec![4, 3],
        global_shape: vec![4, 6],
        offset: vec![0, 3 * r],
        bytes: &mb[r],
    };
    let ranks = vec![
        vec![
            NamedTensor::dim0_shard("w", DType::F32, &[4, 4], 6, 0, &wb[..64]),
            cols(0),
            NamedTensor::full("norm", DType::F32, &[4], &nb),
            NamedTensor::full("tok", DType::I32, &[2, 3], &tok),
            NamedTensor::dim0_shard("b", DType::BF16, &[2], 4, 0, &b[..4]),
        ],
        vec![
            NamedTensor::dim0_shard("w", DType::F32, &[2, 4], 6, 4, &wb[64..]),
            cols(1),
            NamedTensor::full("norm", DType::F32, &[4], &nb),
            NamedTensor::dim0_shard("b", DType::BF16, &[2], 4, 2, &b[4..]),
            NamedTensor::full("s", DType::F32, &[], &s),
        ],
    ];
    let meta = checkpoint::CheckpointMeta {
        config_toml: "[training]\nsteps = 3\n".into(),
        parallel: json!({"dp_shard": 2}),
        dataloader: json!({"kind": "tokens", "offset": 96}),
        rng: json!({"seed": 1}),
        lr_scheduler: json!({"last_step": 3}),
        extra: json!({"tokens_seen": 96}),
    };
    let dir = checkpoint::save(root, 3, &ranks, &meta, 0).expect("save the pristine checkpoint");
    let mut files = BTreeMap::new();
    for f in [MANIFEST_FILE].into_iter().chain(SHARDS) {
        files.insert(f, std::fs::read(dir.join(f)).unwrap());
    }
    let tensors: BTreeMap<String, Vec<u8>> = [
        ("w", wb),
        ("m", f32_bytes(&m)),
        ("norm", nb),
        ("tok", tok),
        ("b", b),
        ("s", s),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ck = load_dir(&dir).expect("the pristine checkpoint loads");
    for (name, want) in &tensors {
        assert_eq!(&ck.read_global(name).unwrap(), want, "pristine {name}");
    }
    Pristine {
        files,
        manifest: ck.manifest.clone(),
        tensors,
    }
}

/// Everything a reader may be asked for: each tensor whole, then some rows, then all checksums.
type Reads = (
    Manifest,
    Vec<(String, Vec<u8>)>,
    Vec<(String, usize, usize, Vec<u8>)>,
);

fn read_all(dir: &Path, picks: u64) -> titan::Result<Reads> {
    let ck = load_dir(dir)?;
    let mut rng = Rng::new(picks);
    let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
    let (mut whole, mut rows) = (Vec::new(), Vec::new());
    for name in names {
        whole.push((name.clone(), ck.read_global(&name)?));
        let n = ck.entry(&name)?.shape.first().copied().unwrap_or(0);
        if n > 0 && n < 1 << 20 {
            let a = rng.below(n as u64) as usize;
            let k = 1 + rng.below((n - a) as u64) as usize;
            rows.push((name.clone(), a, k, ck.read_rows(&name, a, k)?));
        }
    }
    ck.verify_all()?;
    Ok((ck.manifest.clone(), whole, rows))
}

fn check(
    result: titan::Result<Reads>,
    dir: &Path,
    p: &Pristine,
    same: bool,
    broken: Option<(&str, Change)>,
) -> Check {
    let folder = dir.display().to_string();
    let (manifest, whole, rows) = match result {
        Err(e) => {
            let msg = match &e {
                Error::Checkpoint(m) => m.clone(),
                Error::Io { path, source } => format!("{path}: {source}"),
                other => return Err(format!("not a checkpoint error: {other:?}")),
            };
            if same {
                return Err(format!("an unchanged checkpoint is rejected: {msg}"));
            }
            super::names(&msg, &folder)?;
            if let Some((file, Change::Truncated | Change::DataOnly)) = broken {
                super::names(&msg, file)?;
            }
            return Ok(Verdict::Rejected);
        }
        Ok(r) => r,
    };
    if let Some((file, c @ (Change::Truncated | Change::DataOnly))) = broken {
        return Err(format!("{file} was {c:?} but the checkpoint loaded"));
    }
    if same && manifest != p.manifest {
        return Err(format!(
            "an unchanged checkpoint reads back another manifest: {manifest:?}"
        ));
    }
    let unchanged = |name: &str| p.manifest.tensors.get(name) == manifest.tensors.get(name);
    for (name, got) in &whole {
        if unchanged(name) && Some(got) != p.tensors.get(name) {
            return Err(format!(
                "tensor {name} reads {got:?}, saved {:?}",
                p.tensors[name]
            ));
        }
    }
    for (name, a, k, got) in &rows {
        if unchanged(name) {
            let full = &p.tensors[name];
            let row = full.len() / p.manifest.tensors[name].shape[0];
            if got[..] != full[a * row..(a + k) * row] {
                return Err(format!("rows {a}..{} of {name} read {got:?}", a + k));
            }
        }
    }
    if same && whole.len() != p.tensors.len() {
        return Err(format!(
            "an unchanged checkpoint reads {} tensors",
            whole.len()
        ));
    }
    Ok(Verdict::Accepted)
}

/// Manifest edits aimed at the reader's checks: world size, shard ranks, boxes, dtypes, files,
/// checksums and the format fields.
fn targeted(fz: &mut Fz, manifest: &Value) -> Vec<u8> {
    let mut v = manifest.clone();
    let names: Vec<String> = v["tensors"].as_object().unwrap().keys().cloned().collect();
    let name = fz.pick(&names).clone();
    let k = fz.below(v["tensors"][&name]["shards"].as_array().unwrap().len());
    let huge = *fz.pick(&[u64::MAX, 1 << 63, 1 << 40, 1 << 32]);
    let (field, x) = match fz.below(10) {
        0 => ("world_size", json!(*fz.pick(&[0, 1, 3, huge]))),
        1 => (
            "step",
            fz.pick(&[json!(-1), json!(huge), json!("3")]).clone(),
        ),
        2 => ("version", json!(*fz.pick(&[0, 2, huge]))),
        3 => ("shape", json!([huge, huge, 16])),
        4 => ("dtype", json!(*fz.pick(&["F64", "f32", "I64", "", "U8"]))),
        5 => ("rank", json!(*fz.pick(&[0, 1, 2, huge]))),
        6 => ("offset", json!([huge, 0])),
        7 => (
            "shape ",
            fz.pick(&[json!([huge]), json!([]), json!([0, 0])]).clone(),
        ),
        8 => (
            "file",
            json!(*fz.pick(&[SHARDS[0], SHARDS[1], "../rank-00000.safetensors", ""])),
        ),
        _ => ("checksum", json!(*fz.pick(&["", "0000000000000000", "zz"]))),
    };
    let slot = match field {
        "world_size" | "step" | "version" => &mut v[field],
        "shape" | "dtype" => &mut v["tensors"][&name][field],
        shard_field => &mut v["tensors"][&name]["shards"][k][shard_field.trim()],
    };
    fz.note(format!("manifest: {name} / shard {k}: {field:?} = {x}"));
    *slot = x;
    serde_json::to_vec_pretty(&v).unwrap()
}

/// The native checkpoint generator: manifest edits, shard edits, missing or empty files.
pub fn generator(root: PathBuf) -> impl FnMut(&mut Fz) -> Case {
    let p = std::sync::Arc::new(pristine(&root.join("pristine")));
    let dir = root.join("work");
    let manifest_json: Value = serde_json::from_slice(&p.files[MANIFEST_FILE]).unwrap();
    move |fz: &mut Fz| {
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = p.files.clone();
        let mut broken = None;
        let same = match fz.below(20) {
            0..=8 => {
                let reformat = fz.chance(0.15);
                let bytes = if reformat {
                    mutate::reformat(fz, &manifest_json)
                } else if fz.chance(0.4) {
                    targeted(fz, &manifest_json)
                } else {
                    mutate::json_bytes(fz, &manifest_json)
                };
                // Duplicate keys may parse to the same Value yet be refused: only whitespace
                // edits and no-ops count as unchanged.
                let same = reformat || bytes == p.files[MANIFEST_FILE];
                files.insert(MANIFEST_FILE, bytes);
                same
            }
            9..=17 => {
                let f = *fz.pick(&SHARDS);
                fz.note(format!("mutate {f}"));
                let new = st::mutate(fz, &p.files[f]);
                let c = st::classify(&p.files[f], &new);
                broken = Some((f, c));
                files.insert(f, new);
                c == Change::None
            }
            _ => {
                let f = *fz.pick(&[MANIFEST_FILE, SHARDS[0], SHARDS[1]]);
                if fz.chance(0.5) {
                    fz.note(format!("remove {f}"));
                    files.remove(f);
                } else {
                    fz.note(format!("empty {f}"));
                    files.insert(f, Vec::new());
                }
                false
            }
        };
        for f in p.files.keys() {
            match files.get(f) {
                Some(b) => super::write_fresh(&dir.join(f), b),
                None => {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
        }
        let inputs = files
            .iter()
            .map(|(f, b)| Dump::new(*f, b.clone()))
            .collect();
        let (dir, p) = (dir.clone(), p.clone());
        let picks = fz.u64();
        let run = move || {
            let r = read_all(&dir, picks);
            check(r, &dir, &p, same, broken)
        };
        Case {
            inputs,
            run: Box::new(run),
        }
    }
}
