//! Randomized-mutation tests of every reader of user files (issue 15): the TOML config and its
//! overrides, native checkpoints (manifest and safetensors shards), Hugging Face folders
//! (single file and sharded with model.safetensors.index.json) and token files (eval inputs,
//! training datasets). Thousands of seeded mutations per run; each input must give a clean
//! error or a correct result, never a panic or a hang. The harness and the environment
//! variables that change the seed or the number of cases: fuzz_common/mod.rs.
//!
//! The `regression_*` tests pin inputs the fuzzer (or reading the code it pointed at) found.

mod fuzz_common;

use fuzz_common::{checkpoint, config, fuzz, hf, scratch, tokens};

#[test]
fn fuzz_config() {
    let dir = scratch("config");
    let stats = fuzz("config", 6000, config::generator(dir.clone()));
    stats.assert_mix("config", 0.1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fuzz_native() {
    let dir = scratch("native");
    let stats = fuzz("native", 4000, checkpoint::generator(dir.clone()));
    stats.assert_mix("native", 0.05);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fuzz_hf() {
    let dir = scratch("hf");
    let stats = fuzz("hf", 3000, hf::generator(dir.clone()));
    stats.assert_mix("hf", 0.05);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fuzz_eval() {
    let dir = scratch("eval");
    let stats = fuzz("eval", 4000, tokens::eval_generator(dir.clone()));
    stats.assert_mix("eval", 0.05);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fuzz_loader() {
    let dir = scratch("loader");
    let stats = fuzz("loader", 3000, tokens::loader_generator(dir.clone()));
    stats.assert_mix("loader", 0.05);
    let _ = std::fs::remove_dir_all(dir);
}

// ---- Regressions: each input panicked, aborted or gave a wrong result before its fix. ----

use std::path::Path;
use titan::train::config::JobConfig;
use titan::Error;

const SMALL: &str = "[training]\nsteps = 5\nseq_len = 32\nlocal_batch_size = 2\n";

fn config_err(r: titan::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Config(m)) => m,
        other => panic!("expected a config error, got {other:?}"),
    }
}

fn overrides(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Found by fuzz_config: local_batch_size x dp wrapped to 0 in i64, then `g % 0` panicked.
#[test]
fn regression_global_batch_with_huge_degrees_is_an_error() {
    let ov = overrides(&[
        "--training.local_batch_size=4294967296",
        "--parallelism.data_parallel_shard_degree=4294967296",
        "--training.global_batch_size=8",
    ]);
    let m = config_err(JobConfig::from_toml_str(SMALL, "x.toml", &ov));
    assert!(
        m.contains("x.toml") && m.contains("global_batch_size"),
        "{m}"
    );
    // dp_replicate x dp_shard itself past i64.
    let ov = overrides(&[
        "--parallelism.data_parallel_replicate_degree=4294967296",
        "--parallelism.data_parallel_shard_degree=4294967296",
    ]);
    let m = config_err(JobConfig::from_toml_str(SMALL, "x.toml", &ov));
    assert!(
        m.contains("data_parallel_shard_degree") && m.contains("too large"),
        "{m}"
    );
}

/// Found by fuzz_config: degrees whose product wraps to the world size resolved "fine"
/// ((2^63 - 1)^2 = 1 mod 2^64; so is 3 x 11 x 1117984489315730401).
#[test]
fn regression_degrees_that_wrap_to_the_world_size_do_not_resolve() {
    for (degrees, world) in [
        (["9223372036854775807", "9223372036854775807", "4", "1"], 4),
        (["3", "1", "1117984489315730401", "11"], 1),
    ] {
        let [rep, pp, tp, cp] = degrees;
        let ov = overrides(&[
            &format!("--parallelism.data_parallel_replicate_degree={rep}"),
            &format!("--parallelism.pipeline_parallel_degree={pp}"),
            &format!("--parallelism.tensor_parallel_degree={tp}"),
            &format!("--parallelism.context_parallel_degree={cp}"),
        ]);
        let cfg = JobConfig::from_toml_str(SMALL, "x.toml", &ov).unwrap();
        let m = config_err(cfg.parallelism.resolve(world));
        assert!(m.contains("multiply past the world size"), "{m}");
    }
}

/// Found by fuzz_config: a `--job.config_file` that was another flag's value dropped the
/// config file named before it, and the run silently used the defaults.
#[test]
fn regression_config_file_flag_as_a_value_keeps_the_file() {
    let dir = scratch("regression-config-file");
    let path = dir.join("run.toml");
    std::fs::write(&path, SMALL).unwrap();
    let p = path.display().to_string();
    let ov = overrides(&[
        "--job.config_file",
        &p,
        "--job.description",
        "--job.config_file",
    ]);
    let cfg = JobConfig::load(None, &ov).unwrap();
    assert_eq!((cfg.training.steps, cfg.training.seq_len), (5, 32));
    assert_eq!(cfg.job.description, "--job.config_file");
    let _ = std::fs::remove_dir_all(dir);
}

/// Found by fuzz_eval: seq_len usize::MAX made seq_len + 1 wrap to 0 and chunks_exact(0) panic.
#[test]
fn regression_eval_seq_len_usize_max_is_an_error() {
    let dir = scratch("regression-eval");
    for (name, bytes) in [
        ("t.bin", vec![1u8, 0, 0, 0, 2, 0, 0, 0]),
        ("t.json", b"[[1, 2]]".to_vec()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        match titan::data::read_token_batches(&path, Some(usize::MAX), 1, None) {
            Err(Error::Data(m)) => assert!(m.contains(name), "{m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Found by fuzz_loader: a batch too large to allocate panicked (capacity overflow).
#[test]
fn regression_loader_batch_too_large_to_hold_is_an_error() {
    for (seq_len, batch) in [(usize::MAX, 1), (1 << 62, 3)] {
        let cfg = titan::data::DataConfig {
            seq_len,
            batch,
            ..Default::default()
        };
        let m = config_err(titan::data::build_loader(&cfg).map(|_| ()));
        assert!(m.contains("too large"), "{m}");
    }
}

/// Found by fuzz_native: a manifest's world size of 2^40 aborted the process while reserving
/// room for 2^40 shard files.
#[test]
fn regression_manifest_world_size_huge_names_the_missing_shard() {
    use titan::checkpoint::{load_dir, save, CheckpointMeta, NamedTensor, MANIFEST_FILE};
    let root = scratch("regression-world");
    let bytes = [0u8; 8];
    let t = NamedTensor::full("w", titan::DType::F32, &[2], &bytes);
    let dir = save(&root, 1, &[vec![t]], &CheckpointMeta::default(), 0).unwrap();
    let path = dir.join(MANIFEST_FILE);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["world_size"] = serde_json::json!(1u64 << 40);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    match load_dir(Path::new(&dir)) {
        Err(Error::Checkpoint(msg)) => assert!(msg.contains("rank-00001.safetensors"), "{msg}"),
        other => panic!("{:?}", other.map(|c| c.manifest.world_size)),
    }
    let _ = std::fs::remove_dir_all(root);
}
