//! Hugging Face folders: `HfCheckpoint::open` (the index `model.safetensors.index.json` and
//! every shard it names, or one `model.safetensors`) and `get` / `to_f32` / `read_f32` of every
//! tensor, over fixture folders with one file mutated.
//!
//! Correct results checked against the `safetensors` crate and a decoder written here: an
//! unchanged folder (or one whose index was only reformatted) opens to the fixture's tensors
//! bit for bit; in any folder that opens, tensors of files left alone read exactly as stored,
//! tensors of the edited shard read as the crate decodes the edited bytes, and an edited index
//! never invents a tensor; a truncated shard is an error naming that file; asking for the wrong
//! shape is an error naming the file; every error names the folder.

use super::safetensors_mut::{self as st, Change};
use super::{mutate, Case, Check, Dump, Fz, Verdict};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use titan::checkpoint::hf_folder::{HfCheckpoint, HF_INDEX};
use titan::Error;

const FIXTURES: &[&str] = &["gqa_untied_sharded", "mha_tied", "bf16_gqa"];

struct Fixture {
    dir: PathBuf,
    /// The files the reader looks at (index and shards), as shipped.
    files: BTreeMap<String, Vec<u8>>,
    /// tensor -> (file, f32 bits).
    tensors: BTreeMap<String, (String, Vec<u32>)>,
}

/// f32 bits of a tensor, decoded here (None: a dtype titan must refuse to widen).
fn decode(v: &safetensors::tensor::TensorView<'_>) -> Option<Vec<u32>> {
    use safetensors::Dtype;
    let b = v.data();
    Some(match v.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| (f64::from_le_bytes(c.try_into().unwrap()) as f32).to_bits())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32().to_bits())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_bits())
            .collect(),
        _ => return None,
    })
}

/// What a safetensors file holds, by the `safetensors` crate (None: the crate refuses it).
type Decoded = Option<BTreeMap<String, Option<Vec<u32>>>>;

fn decode_file(bytes: &[u8]) -> Decoded {
    let sf = safetensors::SafeTensors::deserialize(bytes).ok()?;
    Some(
        sf.tensors()
            .into_iter()
            .map(|(t, v)| (t, decode(&v)))
            .collect(),
    )
}

fn load_fixture(name: &str, work: &Path) -> Fixture {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let f = p.file_name().unwrap().to_string_lossy().into_owned();
        let is_model = f.starts_with("model") && f.ends_with(".safetensors");
        let bytes = std::fs::read(&p).unwrap();
        // config.json comes along as a file an edited index may point at.
        if is_model || f == HF_INDEX || f == "config.json" {
            std::fs::write(dir.join(&f), &bytes).unwrap();
        }
        if !(is_model || f == HF_INDEX) {
            continue;
        }
        if is_model {
            for (t, bits) in decode_file(&bytes).expect("fixtures are well formed") {
                tensors.insert(t, (f.clone(), bits.expect("fixtures hold float tensors")));
            }
        }
        files.insert(f, bytes);
    }
    Fixture {
        dir,
        files,
        tensors,
    }
}

/// (tensor, its file as reported, f32 bits) of every tensor the folder opens to.
type Reads = Vec<(String, String, Vec<u32>)>;

fn read_all(dir: &Path) -> titan::Result<Reads> {
    let ck = HfCheckpoint::open(dir)?;
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    let mut out = Vec::new();
    for name in names {
        if !ck.contains(&name) {
            return Err(Error::Other(format!(
                "names() lists {name} but contains() denies it"
            )));
        }
        let t = ck.get(&name)?;
        let file = t.file.file_name().unwrap().to_string_lossy().into_owned();
        let shape = t.shape.to_vec();
        let vals = t.to_f32()?;
        let again = ck.read_f32(&name, &shape)?;
        if again
            .iter()
            .map(|x| x.to_bits())
            .ne(vals.iter().map(|x| x.to_bits()))
        {
            return Err(Error::Other(format!("{name}: read_f32 and to_f32 differ")));
        }
        if vals.len() as u128 != shape.iter().map(|&d| d as u128).product::<u128>() {
            return Err(Error::Other(format!(
                "{name}: {} values for shape {shape:?}",
                vals.len()
            )));
        }
        let mut wrong = shape.clone();
        wrong.push(1);
        match ck.read_f32(&name, &wrong) {
            Err(Error::Checkpoint(m)) if m.contains(&file) => {}
            other => {
                return Err(Error::Other(format!(
                    "{name}: reading it as {wrong:?} gave {:?}, not an error naming {file}",
                    other.map(|v| v.len())
                )))
            }
        }
        out.push((name, file, vals.into_iter().map(f32::to_bits).collect()));
    }
    Ok(out)
}

/// `mutated_holds`: the mutated file as the `safetensors` crate reads it (shards only).
fn check(
    r: titan::Result<Reads>,
    fx: &Fixture,
    mutated: &str,
    same: bool,
    c: Change,
    mutated_holds: &Decoded,
) -> Check {
    let folder = fx.dir.display().to_string();
    let reads = match r {
        Err(Error::Other(m)) => return Err(m),
        Err(e) => {
            let msg = match &e {
                Error::Checkpoint(m) => m.clone(),
                Error::Io { path, source } => format!("{path}: {source}"),
                other => return Err(format!("not a checkpoint error: {other:?}")),
            };
            if same {
                return Err(format!("an unchanged folder is rejected: {msg}"));
            }
            super::names(&msg, &folder)?;
            if c == Change::Truncated {
                super::names(&msg, mutated)?;
            }
            return Ok(Verdict::Rejected);
        }
        Ok(r) => r,
    };
    if c == Change::Truncated {
        return Err(format!("{mutated} was truncated but the folder opened"));
    }
    for (name, file, bits) in &reads {
        if file == mutated && !same {
            // A tensor of the edited shard: as the safetensors crate decodes the edited bytes.
            let want = mutated_holds.as_ref().and_then(|m| m.get(name));
            if want != Some(&Some(bits.clone())) {
                return Err(format!(
                    "{name} of the edited {file} reads {} values; the safetensors crate: {:?}",
                    bits.len(),
                    want.map(|w| w.as_ref().map(Vec::len))
                ));
            }
            continue;
        }
        match fx.tensors.get(name) {
            Some((f, want)) if f == file && bits == want => {}
            Some((f, _)) => return Err(format!("{name} ({file}) does not read as stored in {f}")),
            None => return Err(format!("{name} ({file}) is no tensor of the fixture")),
        }
    }
    if same && reads.len() != fx.tensors.len() {
        return Err(format!(
            "an unchanged folder opens to {} tensors",
            reads.len()
        ));
    }
    Ok(Verdict::Accepted)
}

/// Index edits aimed at the reader's checks: a tensor sent to a file that does not hold it,
/// to a missing file, or to a path outside the folder.
fn retarget(fz: &mut Fz, index: &Value, shards: &[String]) -> Vec<u8> {
    let mut v = index.clone();
    let Some(map) = v.get_mut("weight_map").and_then(Value::as_object_mut) else {
        return serde_json::to_vec(&v).unwrap();
    };
    let names: Vec<String> = map.keys().cloned().collect();
    let name = fz.pick(&names).clone();
    let to = match fz.below(4) {
        0 => fz.pick(shards).clone(),
        1 => "model-00009-of-00004.safetensors".into(),
        2 => fz
            .pick(&[
                "../model.safetensors",
                "/dev/null",
                ".",
                "",
                "sub/x.safetensors",
            ])
            .to_string(),
        _ => "config.json".into(),
    };
    fz.note(format!("index: {name} -> {to:?}"));
    map.insert(name, Value::String(to));
    serde_json::to_vec_pretty(&v).unwrap()
}

pub fn generator(root: PathBuf) -> impl FnMut(&mut Fz) -> Case {
    let fixtures: Vec<std::sync::Arc<Fixture>> = FIXTURES
        .iter()
        .map(|n| std::sync::Arc::new(load_fixture(n, &root)))
        .collect();
    // The file the previous case changed, restored before the next case.
    let mut dirty: Option<(usize, String)> = None;
    move |fz: &mut Fz| {
        if let Some((k, f)) = dirty.take() {
            let fx = &fixtures[k];
            super::write_fresh(&fx.dir.join(&f), &fx.files[&f]);
        }
        let k = fz.below(fixtures.len());
        let fx = fixtures[k].clone();
        let names: Vec<String> = fx.files.keys().cloned().collect();
        let shards: Vec<String> = names.iter().filter(|f| *f != HF_INDEX).cloned().collect();
        let file = if fx.files.contains_key(HF_INDEX) && fz.chance(0.4) {
            HF_INDEX.to_string()
        } else {
            fz.pick(&shards).clone()
        };
        fz.note(format!("{}: mutate {file}", FIXTURES[k]));
        let orig = &fx.files[&file];
        let (new, same, change) = if fz.chance(0.05) {
            fz.note("no change (control)");
            (orig.clone(), true, Change::None)
        } else if file == HF_INDEX {
            let index: Value = serde_json::from_slice(orig).unwrap();
            let (new, reformat) = match fz.below(10) {
                0 | 1 => (mutate::reformat(fz, &index), true),
                2..=4 => (retarget(fz, &index, &shards), false),
                _ => (mutate::json_bytes(fz, &index), false),
            };
            let same = reformat || new == *orig;
            (new, same, Change::Other)
        } else if fz.chance(0.05) {
            fz.note("empty the file");
            (Vec::new(), false, Change::Truncated)
        } else {
            let new = st::mutate(fz, orig);
            let c = st::classify(orig, &new);
            (new, c == Change::None, c)
        };
        super::write_fresh(&fx.dir.join(&file), &new);
        dirty = Some((k, file.clone()));
        let holds = if file == HF_INDEX {
            None
        } else {
            decode_file(&new)
        };
        let inputs = vec![Dump::new(file.clone(), new)];
        let run = move || check(read_all(&fx.dir), &fx, &file, same, change, &holds);
        Case {
            inputs,
            run: Box::new(run),
        }
    }
}
