//! TOML text, then after a 0 byte one override per line: a clean error or a config that saves
//! and loads back equal.
#![no_main]
use libfuzzer_sys::fuzz_target;
use titan::train::config::JobConfig;

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let overrides: Vec<String> = String::from_utf8_lossy(rest)
        .lines()
        .map(str::to_string)
        .collect();
    if let Ok(cfg) = JobConfig::from_toml_str(&text, "fuzz.toml", &overrides) {
        let saved = cfg.to_toml_string().expect("an accepted config saves");
        let back = JobConfig::from_toml_str(&saved, "saved.toml", &[]).expect("and loads back");
        assert_eq!(
            back,
            JobConfig {
                ignored: Vec::new(),
                ..cfg
            }
        );
        for world in [1, 2, 8] {
            if let Ok(d) = back.parallelism.resolve(world) {
                let _ = back.gradient_accumulation_steps(d.dp());
            }
        }
    }
});
