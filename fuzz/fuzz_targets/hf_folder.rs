//! A Hugging Face folder: the input is model.safetensors (first byte even) or the
//! model.safetensors.index.json of the sharded fixture (odd). Open it and widen every tensor.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use titan::checkpoint::hf_folder::{HfCheckpoint, HF_INDEX, HF_SINGLE};

/// (single-file folder, sharded folder): copies of two fixtures.
fn dirs() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("titan-cargo-fuzz-hf-{}", std::process::id()));
        let copy = |name: &str| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/hf")
                .join(name);
            let dst = root.join(name);
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
            }
            dst
        };
        (copy("mha_tied"), copy("gqa_untied_sharded"))
    })
}

fuzz_target!(|data: &[u8]| {
    let (single, sharded) = dirs();
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let (dir, file) = if which % 2 == 0 {
        (single, HF_SINGLE)
    } else {
        (sharded, HF_INDEX)
    };
    let _ = std::fs::remove_file(dir.join(file));
    std::fs::write(dir.join(file), bytes).unwrap();
    if let Ok(ck) = HfCheckpoint::open(dir) {
        let names: Vec<String> = ck.names().map(str::to_string).collect();
        for n in names {
            if let Ok(t) = ck.get(&n) {
                let shape = t.shape.to_vec();
                if let Ok(v) = ck.read_f32(&n, &shape) {
                    assert_eq!(v.len(), shape.iter().product::<usize>());
                }
            }
        }
    }
});
