//! `titan train` as a job scheduler and a shell see it: a stop signal finishes the step, saves it
//! and exits 75, and the rerun resumes with bitwise the same losses as an uninterrupted run; a
//! second signal exits at once; one run per dump folder, a killed run's lock taken over and its
//! half-written checkpoint folders removed; a closed stdout ends the run quietly. Every spawned
//! process has a deadline and is killed past it, so a test fails instead of hanging.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use titan::train::lock::RunLock;
use titan::train::preempt::StopCause;

mod process_common;
mod train_common;
use process_common::*;

// ---------------------------------------------------------------- stop signals

#[test]
fn stop_signals_save_the_step_and_the_rerun_resumes_bitwise() {
    const STEPS: usize = 40;
    let job = [
        "--training.steps",
        "40",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "1000",
    ];
    let straight = tmp("straight");
    let f = run(&train_args(&straight, &job));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let reference = losses(&straight);
    assert_eq!(reference.len(), STEPS);

    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGUSR1, "SIGUSR1")] {
        let d = tmp(name);
        let mut t = Titan::spawn(&train_args(&d, &job));
        t.wait_for_steps(&d, 3);
        t.signal(sig);
        let f = t.wait();
        assert_no_panic(&f);
        assert_eq!(f.code, Some(EXIT_STOPPED), "{name}: {}", f.stderr);
        let logged = losses(&d);
        let n = logged.last().unwrap().0;
        assert!(
            (3..STEPS as u64).contains(&n),
            "{name}: stopped at step {n}"
        );
        assert!(
            f.stderr.contains(&format!(
                "{name}: stopped after step {n}; checkpoint step-{n} saved in"
            )),
            "{name}: {}",
            f.stderr
        );
        // Only the stop's save: the interval (1000) never came.
        assert_eq!(checkpoint_entries(&d), vec![format!("step-{n}")]);
        assert_eq!(logged[..], reference[..n as usize]);

        let f = run(&train_args(&d, &job));
        assert_eq!(f.code, Some(0), "{name} rerun: {}", f.stderr);
        assert!(
            f.stdout
                .contains(&format!("resumed from checkpoint step {n}")),
            "{}",
            f.stdout
        );
        assert_eq!(
            losses(&d),
            reference,
            "{name}: steps 1..{n}, stop, resume, steps {}..{STEPS} must equal {STEPS} straight steps",
            n + 1
        );
    }
}

#[test]
fn with_checkpointing_off_a_signal_ends_the_run_after_the_step_saving_nothing() {
    let d = tmp("no-ckpt");
    let mut t = Titan::spawn(&train_args(&d, &["--training.steps", "400"]));
    t.wait_for_steps(&d, 2);
    t.signal(libc::SIGINT);
    let f = t.wait();
    assert_no_panic(&f);
    assert_eq!(f.code, Some(EXIT_STOPPED), "{}", f.stderr);
    let n = losses(&d).last().unwrap().0;
    assert!(
        f.stderr.contains(&format!(
            "SIGINT: stopped after step {n}; checkpointing is disabled (checkpoint.enable = \
             false), so nothing was saved"
        )),
        "{}",
        f.stderr
    );
    assert!(checkpoint_entries(&d).is_empty());
}

#[test]
fn a_stop_requested_before_the_first_step_saves_nothing_new() {
    let d = tmp("in-process");
    let job = [
        "--training.device=cpu",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--checkpoint.enable",
        "--checkpoint.interval=2",
    ];
    let with_steps = |n: &'static str| {
        let mut o = job.to_vec();
        o.push(n);
        train_common::debug_trainer(&d, &o).unwrap()
    };
    let mut a = with_steps("--training.steps=2");
    a.fit(true).unwrap();
    assert!(a.stopped.is_none());
    let mut b = with_steps("--training.steps=6");
    assert_eq!(b.maybe_resume().unwrap(), Some(2));
    b.stop.request(StopCause::Signal(libc::SIGTERM));
    b.stop.request(StopCause::OutputClosed); // the first request wins
    assert!(b.fit(true).unwrap().is_empty(), "no step may run");
    let s = b.stopped.as_ref().unwrap();
    assert_eq!((s.cause, s.step), (StopCause::Signal(libc::SIGTERM), 2));
    assert_eq!(s.cause.exit_code() as i32, EXIT_STOPPED);
    assert_eq!(
        s.checkpoint.as_deref(),
        Some(d.join("checkpoint/step-2").as_path())
    );
    assert!(
        s.message
            .contains("no step ran in this process; checkpoint step-2 in"),
        "{}",
        s.message
    );
    assert_eq!(checkpoint_entries(&d), vec!["step-2".to_string()]);
}

#[test]
fn a_second_signal_exits_at_once_without_saving() {
    let d = tmp("twice");
    // Steps of ~0.5 s on two cores (batch 4 x seq 256): the second signal, sent as soon as the
    // first is acknowledged, lands while the step the first one waits for still runs.
    let job = [
        "--training.steps",
        "50",
        "--training.seq_len",
        "256",
        "--training.local_batch_size",
        "4",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "1000",
    ];
    let mut t = Titan::spawn(&train_args(&d, &job));
    t.wait_for_steps(&d, 1);
    t.signal(libc::SIGINT);
    t.wait_for_stderr("SIGINT received");
    t.signal(libc::SIGTERM);
    let f = t.wait();
    assert_no_panic(&f);
    assert_eq!(
        f.code,
        Some(128 + libc::SIGTERM),
        "the second signal must end the run before its stop finished: {}",
        f.stderr
    );
    assert!(
        f.stderr.contains("second stop signal: exiting now"),
        "{}",
        f.stderr
    );
    assert!(
        !checkpoint_entries(&d)
            .iter()
            .any(|e| e.starts_with("step-") && !e.contains(".tmp-")),
        "nothing may be saved: {:?}",
        checkpoint_entries(&d)
    );
}

// ---------------------------------------------------------------- one run per dump folder

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn one_run_per_dump_folder_and_a_killed_runs_lock_is_taken_over() {
    let d = tmp("lock");
    let me = std::process::id();
    {
        // Held by this process: a second lock and a titan run on the folder are refused.
        let held = RunLock::acquire(&d).unwrap();
        assert!(held.took_over.is_none());
        let e = RunLock::acquire(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {me} on host {}", hostname())),
            "{e}"
        );
        let f = run(&train_args(&d, &["--training.steps", "1"]));
        assert_no_panic(&f);
        assert_eq!(f.code, Some(1));
        let errs: Vec<&str> = f
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errs.len(), 1, "{}", f.stderr);
        assert!(
            errs[0].contains("is in use by another titan run")
                && errs[0].contains(&format!("pid {me} on host {}, started 20", hostname())),
            "{}",
            errs[0]
        );
        assert!(
            !d.join("metrics.jsonl").exists(),
            "the refused run wrote metrics"
        );
    }

    // Two titan processes: the second is refused while the first runs.
    let job = [
        "--training.steps",
        "400",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
    ];
    let mut first = Titan::spawn(&train_args(&d, &job));
    // Step 3 is logged after step 2's checkpoint is complete.
    first.wait_for_steps(&d, 3);
    let f = run(&train_args(&d, &job));
    assert_eq!(f.code, Some(1));
    assert!(
        f.stderr.contains(&format!(
            "in use by another titan run (pid {} on host",
            first.pid()
        )),
        "{}",
        f.stderr
    );
    // kill -9 leaves the record; the kernel drops the flock.
    let killed = first.pid();
    first.signal(libc::SIGKILL);
    let f = first.wait();
    assert_eq!(f.code, None, "killed by a signal");
    let record = std::fs::read_to_string(d.join("run.lock")).unwrap();
    assert!(record.contains(&format!("\"pid\":{killed}")), "{record}");
    // What a kill in the middle of a save leaves behind.
    let partial = d.join("checkpoint/step-9999.tmp-4242");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("rank-00000.safetensors"), b"half").unwrap();
    let complete: Vec<String> = checkpoint_entries(&d)
        .into_iter()
        .filter(|e| !e.contains(".tmp-"))
        .collect();
    assert!(!complete.is_empty());

    // Steps 1: the newest checkpoint is past it, so the rerun only starts up and ends.
    let f = run(&train_args(
        &d,
        &["--training.steps", "1", "--checkpoint.enable"],
    ));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    assert!(
        f.stdout.contains(&format!(
            "took over {} from a run that ended without releasing it (pid {killed} on host {}",
            d.join("run.lock").display(),
            hostname()
        )),
        "{}",
        f.stdout
    );
    assert!(
        f.stdout.contains(&format!("removed {}", partial.display())),
        "{}",
        f.stdout
    );
    assert!(!partial.exists());
    let after: Vec<String> = checkpoint_entries(&d);
    assert_eq!(after, complete, "finished checkpoints stay");
    // That run ended normally: the next one finds the lock released, nothing to take over.
    assert_eq!(std::fs::read_to_string(d.join("run.lock")).unwrap(), "");
    let f = run(&train_args(
        &d,
        &["--training.steps", "1", "--checkpoint.enable"],
    ));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    assert!(!f.stdout.contains("took over"), "{}", f.stdout);
}

// ---------------------------------------------------------------- closed stdout

#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    // `titan train | head -2`: the reader leaves during the start-up lines.
    let d = tmp("head2");
    let mut args = train_args(&d, &["--training.steps", "400"]);
    args.retain(|a| a != "--quiet");
    let (t, out) = Titan::spawn_reading_stdout(&args);
    let mut lines = BufReader::new(out).lines();
    for _ in 0..2 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let f = t.wait();
    assert_no_panic(&f);
    assert_eq!(f.code, Some(EXIT_OUTPUT_CLOSED), "{}", f.stderr);
    assert!(!f.stderr.contains("error"), "quiet: {}", f.stderr);

    // The reader leaves during training: that step is finished and checkpointed, as on a signal.
    let d = tmp("head-steps");
    let mut args = train_args(
        &d,
        &[
            "--training.steps",
            "400",
            "--checkpoint.enable",
            "--checkpoint.interval",
            "1000",
        ],
    );
    args.retain(|a| a != "--quiet");
    let (t, out) = Titan::spawn_reading_stdout(&args);
    let mut lines = BufReader::new(out).lines();
    while !lines.next().unwrap().unwrap().starts_with("step ") {}
    drop(lines);
    let f = t.wait();
    assert_no_panic(&f);
    assert_eq!(f.code, Some(EXIT_OUTPUT_CLOSED), "{}", f.stderr);
    let n = losses(&d).last().unwrap().0;
    assert!(
        f.stderr.contains(&format!(
            "stdout closed: stopped after step {n}; checkpoint step-{n} saved"
        )),
        "{}",
        f.stderr
    );
    assert_eq!(checkpoint_entries(&d), vec![format!("step-{n}")]);

    // `titan train 2>&1 | head -2`: stderr goes to the same closed pipe.
    let d = tmp("head-both");
    let mut args = train_args(&d, &["--training.steps", "400"]);
    args.retain(|a| a != "--quiet");
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_titan"))
        .args(&args)
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let watchdog = Watchdog::new(child.id());
    let mut lines = BufReader::new(reader).lines();
    for _ in 0..2 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("titan with a closed stdout and stderr still runs");
        }
        thread::sleep(Duration::from_millis(5));
    };
    drop(watchdog);
    // 101 would be a panic (whose message had nowhere to go).
    assert_eq!(status.code(), Some(EXIT_OUTPUT_CLOSED));
}
