//! Token files: byte 0 picks the reader and format (eval .bin / .u16.bin / .json, or the
//! training loader on .u32.bin / .u16.bin / .txt / .jsonl), bytes 1-2 seq_len and batch, the
//! rest is the file. A clean error, or batches of the promised shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use titan::data::{build_loader, read_token_batches, DataConfig};

fuzz_target!(|data: &[u8]| {
    let [kind, t, b, bytes @ ..] = data else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("titan-cargo-fuzz-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (seq_len, batch) = (*t as usize, *b as usize % 4);
    let names = [
        "e.bin",
        "e.u16.bin",
        "e.json",
        "d.u32.bin",
        "d.u16.bin",
        "d.txt",
        "d.jsonl",
    ];
    let name = names[*kind as usize % names.len()];
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).unwrap();
    if name.starts_with('e') {
        if let Ok(batches) = read_token_batches(&path, Some(seq_len), batch, Some(300)) {
            for x in batches {
                assert_eq!(x.inputs.len(), x.batch * x.seq);
            }
        }
        return;
    }
    let cfg = DataConfig {
        dataset_path: Some(path),
        seq_len,
        batch,
        vocab_size: Some(300),
        progress: false,
        ..Default::default()
    };
    if let Ok(mut l) = build_loader(&cfg) {
        for _ in 0..3 {
            if let Ok(x) = l.next_batch() {
                assert_eq!(x.inputs.len(), batch * seq_len);
            }
        }
        let state = l.state();
        let mut again = build_loader(&cfg).expect("the same dataset builds twice");
        again
            .restore(&state)
            .expect("a loader restores its own state");
    }
});
