//! `titan plan`'s step-time estimate through the real binary: the machine flags change it, the
//! table prints the assumptions and the model's limits, bad flags are one clear error.

mod cli_common;

use cli_common::{assert_clean_error, text, titan};

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
        "no pipeline stages",
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
    // Without pp: tp 1, 2, 4, 8 times the dp splits of 8, 4, 2, 1 ranks (4 + 3 + 2 + 1
    // layouts); with pp 2, 4, 8 (the 8B has 32 layers), DDP or FSDP of what is left (tp 1:
    // 2 + 2 + 1, tp 2: 2 + 1, tp 4: 1): 19, those pipelines refuse included.
    assert_eq!(
        rows.len() + v["refused"].as_array().unwrap().len(),
        19,
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
        let n: u64 = ["pp", "dp_replicate", "dp_shard", "tp"]
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

#[test]
fn plan_estimates_pipeline_schedules_with_their_bubbles() {
    // Llama 3 8B on 4 pipeline ranks, 8 microbatches: the simulated schedules order as the
    // papers do (interleaving shrinks the bubble, zero-bubble more), and the step is the
    // schedule's makespan, longer than rank 0's compute.
    let est = |schedule: &str| -> (f64, f64, f64) {
        let o = titan(&[
            "plan",
            "--config",
            "configs/llama3_8b.toml",
            "--world-size",
            "4",
            "--json",
            "--parallelism.pipeline_parallel_degree",
            "4",
            "--parallelism.data_parallel_shard_degree",
            "1",
            "--training.local_batch_size",
            "8",
            "--parallelism.pipeline_parallel_schedule",
            schedule,
        ]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let e = &v["estimate"];
        let note = e["notes"][0].as_str().unwrap();
        let bubble: f64 = note
            .split("bubble ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("{note}"));
        let c = &e["cost"];
        (
            bubble,
            c["step_s"].as_f64().unwrap(),
            c["compute_s"].as_f64().unwrap(),
        )
    };
    let (b1, s1, c1) = est("1F1B");
    let (bi, si, _) = est("Interleaved1F1B");
    let (bz, sz, _) = est("InterleavedZeroBubble");
    // 1F1B's bubble is at least (p - 1) / (m + p - 1) = 3 / 11 (more with unequal stages).
    assert!((27.0..40.0).contains(&b1), "1F1B bubble {b1} %");
    assert!(bz < bi && bi < b1, "bubbles {b1} {bi} {bz}");
    assert!(
        sz < si && si < s1 && s1 > c1,
        "steps {s1} {si} {sz}, compute {c1}"
    );
}
