//! The `titan` binary end to end on the CPU: training, exact resume, plan, list-models, eval, and
//! every bad input a user can reach (one clear line, non-zero exit, no panic).

mod cli_common;

use cli_common::{assert_clean_error, text, titan};
use std::path::{Path, PathBuf};
use std::process::Output;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("titan-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CFG: &str = "configs/llama3_debugmodel.toml";

fn small_run(dump: &Path, extra: &[&str]) -> Output {
    let dump_arg = format!("--job.dump_folder={}", dump.display());
    let mut args = vec![
        "train",
        "--config",
        CFG,
        "--quiet",
        dump_arg.as_str(),
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--metrics.log_freq",
        "1",
        "--training.device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    titan(&args)
}

fn losses(dump: &Path) -> Vec<(u64, u64)> {
    let s = std::fs::read_to_string(dump.join("metrics.jsonl")).unwrap();
    s.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

#[test]
fn resume_is_bitwise_exact() {
    let a = tmp("straight");
    let o = small_run(
        &a,
        &[
            "--training.steps",
            "20",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "10",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let b = tmp("resumed");
    let first = [
        "--training.steps",
        "10",
        "--lr_scheduler.total_steps",
        "20",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "10",
    ];
    let o = small_run(&b, &first);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = small_run(
        &b,
        &[
            "--training.steps",
            "20",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "10",
        ],
    );
    let (out, _) = text(&o);
    assert!(
        o.status.success() && out.contains("resumed from checkpoint step 10"),
        "{out}"
    );
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 20);
    assert_eq!(lb.len(), 20);
    assert_eq!(
        la, lb,
        "20 straight steps and 10 + resume + 10 must give identical losses"
    );
    assert!(a.join("loss.png").exists());
    // eval of the final checkpoint prints one JSON line.
    let tokens = a.join("tokens.json");
    std::fs::write(&tokens, "[[1,2,3,4,5,6,7,8,9],[9,8,7,6,5,4,3,2,1]]").unwrap();
    let ck = a.join("checkpoint");
    let o = titan(&[
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite());
    assert_eq!(v["tokens"].as_u64().unwrap(), 16);
}

#[test]
fn debugmodel_learns_the_synthetic_corpus() {
    let d = tmp("learn");
    let o = small_run(
        &d,
        &[
            "--training.steps",
            "60",
            "--training.seq_len",
            "64",
            "--training.local_batch_size",
            "4",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let l = losses(&d);
    let first = f64::from_bits(l[0].1);
    let last = f64::from_bits(l.last().unwrap().1);
    // Start near ln(259) = 5.56 (uniform over the byte vocabulary); the corpus's unigram entropy
    // is ~3.4 nats; 60 steps must get well below the start.
    assert!(first > 5.0 && last < 3.0, "loss {first} -> {last}");
}

#[test]
fn plan_405b_and_list_models() {
    let o = titan(&["plan", "--config", "configs/llama3_405b.toml"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("405B") && out.contains("activations (planned)") && out.contains("peak"),
        "{out}"
    );
    let o = titan(&["list-models"]);
    let (out, _) = text(&o);
    for f in ["debugmodel", "1B", "3B", "8B", "70B", "405B"] {
        assert!(out.contains(f), "{out}");
    }
    assert!(out.contains("8,030,261,248"), "{out}");
}

#[test]
fn plan_per_rank_for_fsdp_layouts() {
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["plan", "--json", "--config", "configs/llama3_8b.toml"];
        a.extend(args);
        let o = titan(&a);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let one = json(&[]);
    let eight = json(&[
        "--world-size",
        "8",
        "--parallelism.data_parallel_shard_degree",
        "8",
    ]);
    let p1 = one["state"]["params"].as_f64().unwrap();
    let p8 = eight["state"]["params"].as_f64().unwrap();
    // Each rank keeps an eighth of the f32 masters (rows rounded up, shards aligned).
    assert!(p8 >= p1 / 8.0 && p8 < p1 / 8.0 * 1.01, "{p8} vs {p1} / 8");
    assert!(eight["state"]["gathered"].as_f64().unwrap() > 0.0);
    assert!(eight["state"]["comm_buffers"].as_f64().unwrap() > 0.0);
    assert_eq!(one["state"]["gathered"].as_f64(), Some(0.0));
    // HSDP shards over dp_shard only: the same per-rank state as FSDP 8 at world 16.
    let hsdp = json(&[
        "--world-size",
        "16",
        "--parallelism.data_parallel_replicate_degree",
        "2",
        "--parallelism.data_parallel_shard_degree",
        "8",
    ]);
    assert_eq!(hsdp["state"], eight["state"]);
    // Tensor parallel 8: each rank holds an eighth of every split weight (norms whole), and
    // fewer activations than one rank of the whole model.
    let tp8 = json(&[
        "--world-size",
        "8",
        "--parallelism.tensor_parallel_degree",
        "8",
        "--parallelism.data_parallel_shard_degree",
        "1",
    ]);
    let pt = tp8["state"]["params"].as_f64().unwrap();
    assert!(pt >= p1 / 8.0 && pt < p1 / 8.0 * 1.01, "{pt} vs {p1} / 8");
    assert_eq!(tp8["state"]["gathered"].as_f64(), Some(0.0));
    let act = |v: &serde_json::Value| v["activations_peak"].as_f64().unwrap();
    assert!(
        act(&tp8) < act(&one) / 2.0,
        "{} vs {}",
        act(&tp8),
        act(&one)
    );
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_70b.toml",
        "--world-size",
        "64",
        "--parallelism.tensor_parallel_degree",
        "1",
        "--parallelism.data_parallel_shard_degree",
        "64",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("world 64 = dp_replicate 1 x dp_shard 64") && out.contains("per rank"),
        "{out}"
    );
    // Degrees that do not multiply to the world, and a shard degree above a parameter's dim 0.
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_debugmodel.toml",
        "--world-size",
        "6",
        "--parallelism.data_parallel_shard_degree",
        "4",
    ]);
    assert_clean_error(&o, "world size is 6");
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_debugmodel.toml",
        "--world-size",
        "512",
        "--parallelism.data_parallel_shard_degree",
        "512",
    ]);
    assert_clean_error(&o, "larger than dim 0");
}

#[test]
fn qwen3_plan_list_models_and_hf_eval() {
    let o = titan(&["plan", "--config", "configs/qwen3_8b.toml"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("memory plan: qwen3 8B") && out.contains("8.191B params"),
        "{out}"
    );
    let o = titan(&["list-models"]);
    let (out, _) = text(&o);
    // transformers' Qwen3ForCausalLM(...).num_parameters() (scripts/hf_param_counts.py).
    for (flavor, n) in [
        ("0.6B", "596,049,920"),
        ("8B", "8,190,735,360"),
        ("32B", "32,762,123,264"),
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(flavor) && l.contains("head_dim"))
            .unwrap_or_else(|| panic!("no qwen3 {flavor} line in {out}"));
        assert!(line.contains(n), "{line}");
    }
    // eval --hf-checkpoint picks the model from config.json's model_type.
    let fx = "tests/fixtures/hf/qwen3_gqa_tied";
    let tokens = format!("{fx}/inputs.json");
    let o = titan(&[
        "eval",
        "--hf-checkpoint",
        fx,
        "--tokens",
        &tokens,
        "--device",
        "cpu",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    // The fixture's float64 reference loss, 4.594592 (scripts/make_hf_fixtures.py).
    assert!((loss - 4.594592).abs() < 1e-4, "{out}");
}

#[test]
fn bad_inputs_fail_with_one_clear_error() {
    let d = tmp("bad");
    let broken = d.join("broken.toml");
    std::fs::write(&broken, "[training\nsteps = 3").unwrap();
    assert_clean_error(
        &titan(&["train", "--config", broken.to_str().unwrap()]),
        "broken.toml",
    );
    let unknown = d.join("unknown.toml");
    std::fs::write(&unknown, "[training]\nstepz = 3\n").unwrap();
    assert_clean_error(
        &titan(&["train", "--config", unknown.to_str().unwrap()]),
        "stepz",
    );
    assert_clean_error(
        &titan(&["train", "--config", CFG, "--model.name", "gpt9"]),
        "llama3",
    );
    assert_clean_error(
        &titan(&["train", "--config", CFG, "--model.flavor", "7B"]),
        "debugmodel",
    );
    assert_clean_error(
        &titan(&[
            "train",
            "--config",
            CFG,
            "--training.dataset_path",
            "/no/such/data.txt",
        ]),
        "/no/such/data.txt",
    );
    assert_clean_error(
        &titan(&["train", "--config", CFG, "--training.seq_len", "200000"]),
        "seq_len",
    );
    // Degrees a one-rank launch cannot honour are refused, not ignored, and say how to launch.
    for degree in [
        "--parallelism.tensor_parallel_degree=2",
        "--parallelism.data_parallel_shard_degree=4",
        "--parallelism.pipeline_parallel_degree=2",
    ] {
        assert_clean_error(
            &titan(&["train", "--config", CFG, degree]),
            "--nproc-per-node",
        );
    }
    // No GPU here: asking for CUDA is one clear error, whether or not the binary has CUDA built in.
    let o = titan(&["train", "--config", CFG, "--training.device", "cuda"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.to_lowercase().contains("cuda") && !err.contains("panicked"),
        "{err}"
    );
    let nock = d.join("empty");
    let dump = format!("--job.dump_folder={}", nock.display());
    assert_clean_error(
        &titan(&[
            "train",
            "--config",
            CFG,
            &dump,
            "--checkpoint.enable",
            "--checkpoint.load_step",
            "5",
            "--training.device",
            "cpu",
        ]),
        "checkpoint",
    );
}

#[test]
fn truncated_checkpoint_and_divergence_are_reported() {
    let d = tmp("trunc");
    let o = small_run(
        &d,
        &[
            "--training.steps",
            "2",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "1",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let shard = d.join("checkpoint/step-2/rank-00000.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let o = small_run(&d, &["--training.steps", "4", "--checkpoint.enable"]);
    assert_clean_error(&o, "rank-00000.safetensors");

    // A huge LR blows the loss up: the run stops naming the step, and the last good checkpoint
    // (written before the bad step) still loads.
    let n = tmp("nan");
    let o = small_run(
        &n,
        &[
            "--training.steps",
            "30",
            "--optimizer.lr",
            "1e12",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "1",
        ],
    );
    assert_clean_error(&o, "step");
    let (_, err) = text(&o);
    assert!(err.contains("diverged"), "{err}");
    let steps: Vec<u64> = std::fs::read_dir(n.join("checkpoint"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    let last = *steps
        .iter()
        .max()
        .expect("a checkpoint before the divergence");
    let tokens = n.join("t.json");
    std::fs::write(&tokens, "[[1,2,3,4]]").unwrap();
    let o = titan(&[
        "eval",
        "--checkpoint",
        n.join("checkpoint").to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--step",
        &last.to_string(),
        "--device",
        "cpu",
    ]);
    assert!(
        o.status.success(),
        "last good checkpoint must load: {:?}",
        text(&o)
    );
}

#[test]
fn options_are_accepted_after_overrides() {
    let d = tmp("late-options");
    let dump = format!("--job.dump_folder={}", d.display());
    // clap hands everything from the first override on to the override list.
    let o = titan(&[
        "train",
        "--config",
        CFG,
        &dump,
        "--training.steps",
        "2",
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--training.device",
        "cpu",
        "--metrics.log_freq",
        "1",
        "--quiet",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("titan: done 2 steps"), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("step ")),
        "--quiet: {out}"
    );
    let o = titan(&[
        "plan",
        "--config",
        CFG,
        "--training.seq_len",
        "64",
        "--json",
        "--dtype=float32",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // float32 has no separate compute copy (bfloat16 would).
    assert_eq!(v["state"]["compute_copy"], 0, "{out}");
    let o = titan(&[
        "bench",
        "--config",
        CFG,
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--training.device",
        "cpu",
        "--steps",
        "1",
        "--warmup=0",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("bench: 1 steps in") && !out.contains("warm-up"),
        "{out}"
    );
    assert_clean_error(
        &titan(&[
            "plan",
            "--config",
            CFG,
            "--training.seq_len",
            "64",
            "--dtype",
        ]),
        "--dtype needs a value",
    );
}

#[test]
fn short_datasets_are_clear_errors_and_repeats_are_warned() {
    let d = tmp("short-data");
    std::fs::write(d.join("empty.txt"), "").unwrap();
    std::fs::write(d.join("two.txt"), "ab").unwrap();
    let arg = |f: &str| format!("--training.dataset_path={}", d.join(f).display());
    assert_clean_error(
        &small_run(&d.join("e"), &["--training.steps", "2", &arg("empty.txt")]),
        "is empty",
    );
    assert_clean_error(
        &small_run(&d.join("t"), &["--training.steps", "2", &arg("two.txt")]),
        "fewer than one sample of seq_len 32 + 1 = 33 tokens",
    );
    // 98 bytes + BOS + EOS = 100 tokens; 3 steps of 2 samples of 33 tokens read 198: 2.0 passes.
    std::fs::write(d.join("small.txt"), "y".repeat(98)).unwrap();
    let o = small_run(&d.join("s"), &["--training.steps", "3", &arg("small.txt")]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains("holds 100 tokens")
            && warnings[0]
                .contains("3 steps x 2 sequences x 33 tokens = 198 tokens read it 2.0 times"),
        "{}",
        warnings[0]
    );
    // Within one pass: no warning.
    let o = small_run(&d.join("s1"), &["--training.steps", "1", &arg("small.txt")]);
    let (_, err) = text(&o);
    assert!(o.status.success() && !err.contains("warning"), "{err}");
}
