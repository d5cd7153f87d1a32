//! `titan plan`'s step-time estimate through the real binary: the machine flags change it, the
//! table prints the assumptions and the model's limits, bad flags are one clear error.

use std::process::{Command, Output};

fn titan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_titan"))
        .args(args)
        .output()
        .expect("run titan")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A failed command: non-zero exit, one "error:" line naming `needle`, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let (out, err) = text(o);
    assert!(
        !o.status.success(),
        "expected failure; stdout {out} stderr {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "want exactly one error line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "error should mention '{needle}': {}",
        lines[0]
    );
}

#[test]
fn plan_estimates_step_time_and_takes_the_machine_from_flags() {
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["plan", "--json", "--config", "configs/llama3_8b.toml"];
        a.extend([
            "--world-size",
            "8",
            "--parallelism.data_parallel_shard_degree",
            "8",
        ]);
        a.extend(args);
        let o = titan(&a);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let f = |v: &serde_json::Value, path: &[&str]| -> f64 {
        path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap()
    };
    let base = json(&[]);
    let half = json(&["--peak-tflops", "494.5"]);
    assert_eq!(f(&base, &["estimate", "assumptions", "peak_flops"]), 989e12);
    assert_eq!(
        f(&half, &["estimate", "assumptions", "peak_flops"]),
        494.5e12
    );
    // Half the FLOP/s: a slower step, fewer tokens/s; the memory plan is untouched.
    let step = |v: &serde_json::Value| f(v, &["estimate", "cost", "step_s"]);
    assert!(
        step(&half) > 1.5 * step(&base),
        "{} vs {}",
        step(&half),
        step(&base)
    );
    assert!(f(&half, &["estimate", "tokens_per_s"]) < f(&base, &["estimate", "tokens_per_s"]));
    assert_eq!(half["state"], base["state"]);
    assert_eq!(base["estimate"]["fits"], serde_json::json!(true));
    // A slower network across nodes: 16 GPUs as two nodes of 8 expose more communication.
    let two_nodes = |net: &str| {
        json(&[
            "--world-size",
            "16",
            "--parallelism.data_parallel_shard_degree",
            "16",
            "--net-gbps",
            net,
        ])
    };
    let (fast, slow) = (two_nodes("50"), two_nodes("5"));
    let exposed = |v: &serde_json::Value| f(v, &["estimate", "cost", "exposed_comm_s"]);
    assert!(
        exposed(&slow) > exposed(&fast),
        "{} vs {}",
        exposed(&slow),
        exposed(&fast)
    );
    // The table prints the assumptions, the estimate and what the model leaves out.
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_70b.toml",
        "--world-size",
        "8",
        "--parallelism.tensor_parallel_degree",
        "1",
        "--parallelism.data_parallel_shard_degree",
        "8",
        "--gpus-per-node",
        "4",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "step-time estimate on h100",
        "4 GPUs per node",
        "exposed comm",
        "MFU",
        "tokens/s",
        "does not fit in 80 GB",
        "pipeline parallelism is not in the model",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let bad = |args: &[&str], msg: &str| {
        let mut a = vec!["plan", "--config", "configs/llama3_debugmodel.toml"];
        a.extend(args);
        assert_clean_error(&titan(&a), msg);
    };
    bad(&["--device", "tpu"], "--device tpu");
    bad(&["--peak-tflops", "-3"], "--peak-tflops -3");
    bad(&["--net-gbps", "fast"], "--net-gbps");
    bad(&["--gpus-per-node", "0"], "--gpus-per-node 0");
}

#[test]
fn plan_search_ranks_the_layouts_of_a_world_size() {
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_8b.toml",
        "--world-size",
        "8",
        "--search",
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v["layouts"].as_array().unwrap();
    // tp 1, 2, 4, 8 times the dp splits of 8, 4, 2, 1 ranks: 4 + 3 + 2 + 1 layouts.
    assert_eq!(
        rows.len() + v["refused"].as_array().unwrap().len(),
        10,
        "{v}"
    );
    let key = |r: &serde_json::Value| {
        let e = &r["estimate"];
        (
            e["fits"].as_bool() != Some(false),
            e["tokens_per_s_per_rank"].as_f64().unwrap(),
        )
    };
    for w in rows.windows(2) {
        let (a, b) = (key(&w[0]), key(&w[1]));
        assert!(
            (a.0 && !b.0) || (a.0 == b.0 && a.1 >= b.1),
            "not ranked: {a:?} before {b:?}"
        );
    }
    for r in rows {
        let n: u64 = ["dp_replicate", "dp_shard", "tp"]
            .iter()
            .map(|k| r[k].as_u64().unwrap())
            .product();
        assert_eq!(n, 8, "{r}");
    }
    // The table lists the best first and says how many fit.
    let o = titan(&[
        "plan",
        "--config",
        "configs/llama3_8b.toml",
        "--world-size",
        "8",
        "--search",
        "--top",
        "3",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("layouts planned") && out.contains("fit in 80 GB"),
        "{out}"
    );
    let listed = out
        .lines()
        .filter(|l| {
            l.contains(" GiB ")
                && l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.parse::<u32>().is_ok())
        })
        .count();
    assert_eq!(listed, 3, "{out}");
    assert_clean_error(
        &titan(&["plan", "--config", "configs/llama3_8b.toml", "--search"]),
        "--world-size",
    );
}
