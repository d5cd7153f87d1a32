//! A native checkpoint of one rank whose manifest.json (first byte even) or shard file (odd)
//! is the input: a clean error or reads that succeed; unchanged bytes read as saved.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use titan::checkpoint::{load_dir, save, CheckpointMeta, NamedTensor, MANIFEST_FILE};
use titan::DType;

const SHARD: &str = "rank-00000.safetensors";

/// A saved two-tensor checkpoint: its folder and the pristine manifest and shard bytes.
fn pristine() -> &'static (PathBuf, Vec<u8>, Vec<u8>) {
    static P: OnceLock<(PathBuf, Vec<u8>, Vec<u8>)> = OnceLock::new();
    P.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("titan-cargo-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let w: Vec<u8> = (0..24u8).collect();
        let tok: Vec<u8> = (0..12u8).collect();
        let tensors = vec![
            NamedTensor::full("w", DType::F32, &[2, 3], &w),
            NamedTensor::full("tok", DType::I32, &[3], &tok),
        ];
        let dir = save(&root, 1, &[tensors], &CheckpointMeta::default(), 0).unwrap();
        let m = std::fs::read(dir.join(MANIFEST_FILE)).unwrap();
        let s = std::fs::read(dir.join(SHARD)).unwrap();
        (dir, m, s)
    })
}

fuzz_target!(|data: &[u8]| {
    let (dir, manifest, shard) = pristine();
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let (m, s) = if which % 2 == 0 {
        (bytes, &shard[..])
    } else {
        (&manifest[..], bytes)
    };
    for (f, b) in [(MANIFEST_FILE, m), (SHARD, s)] {
        // A new file each time: ext4 flushes a file rewritten in place when it is closed.
        let _ = std::fs::remove_file(dir.join(f));
        std::fs::write(dir.join(f), b).unwrap();
    }
    if let Ok(ck) = load_dir(dir) {
        let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
        for n in names {
            if let Ok(b) = ck.read_global(&n) {
                if m == &manifest[..] && s == &shard[..] {
                    assert_eq!(b.len(), if n == "w" { 24 } else { 12 });
                }
            }
        }
        let _ = ck.verify_all();
    }
});
