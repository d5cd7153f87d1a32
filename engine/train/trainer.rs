//! The training loop: model + store + plan + data + optimizer + metrics + checkpoints.
//!
//! A step: zero grads; for each micro-batch build a tape at the planned offsets, run the loss and
//! backward (gradients accumulate in the flat f32 grad region); global grad norm and clip
//! coefficient on device; one fused AdamW over the flat state. The only host syncs per step are
//! the loss and grad-norm reads used for logging and the NaN check (before the update, so a
//! diverged step never touches the weights).

use super::config::JobConfig;
use super::device::{device_name, select_rank_backend};
use super::dist::{parallel_dims, reduce_dtype};
use super::lr::LrSchedule;
pub use super::memory::{compute_dtype, trace_plan, MemoryPlan};
use super::pipeline::{Layout, Pipeline};
use super::preempt::{StopFlag, Stopped};
use super::state::SaveKind;
use super::validate::{ValMetrics, ValRun, Validator};
use crate::backend::{AdamW, AdamWBufs, Backend, Buf, DeviceMem};
use crate::data::{build_loader, DataConfig, DataLoader};
use crate::dist::mesh::Dim;
use crate::dist::{Communicator, HostComm, Mesh, ReduceOp};
use crate::error::{Error, Result};
use crate::metrics::{self, MetricsWriter, Peak, StepMetrics, GIB};
use crate::model::{resolve, Model, ModelSpec, Registry};
use crate::parallel::fsdp::{FsdpLayout, Reshard};
use crate::parallel::tp::{local_specs, TensorParallel};
use crate::params::{ParamStore, Sharding};
use crate::planner::Plan;
use crate::tape::profile::timed;
use crate::tape::{Placement, Tape};
use crate::tensor::DType;
use crate::tensorboard::TensorBoard;
use std::path::PathBuf;
use std::time::Instant;

pub struct Trainer {
    pub cfg: JobConfig,
    pub be: Box<dyn Backend>,
    /// The model's registry entry: everything model-specific goes through it.
    pub spec: &'static ModelSpec,
    pub model: Box<dyn Model>,
    pub store: ParamStore,
    pub plan: Plan,
    pub memory: MemoryPlan,
    arena: Box<dyn DeviceMem>,
    pub(super) scalars: Buf,
    _scalar_mem: Box<dyn DeviceMem>,
    pub loader: DataLoader,
    pub lr: LrSchedule,
    pub step: u64,
    pub accum: usize,
    pub peak: Peak,
    pub flops_per_token: f64,
    pub device: String,
    /// Held-out loss every `validation.freq` steps, when `validation.enable`.
    pub validator: Option<Validator>,
    pub validation_history: Vec<ValMetrics>,
    /// The training step at which the LR schedule's counter was zero (see state.rs).
    pub(super) lr_origin: i64,
    dump: PathBuf,
    /// Polled once per step by `fit`; `titan train` sets it from the stop signals.
    pub stop: StopFlag,
    /// Set when `fit` ended early on a stop request.
    pub stopped: Option<Stopped>,
    /// The device mesh of a multi-rank run (None: one rank, no communicator).
    pub mesh: Option<Mesh>,
    /// This rank in the world (0 for one rank); rank 0 writes metrics.
    pub rank: usize,
    /// Whether `fit` prints this rank's step lines (rank 0's by default; `--log-ranks`).
    pub logs: bool,
    /// Devices the MFU peak covers: every rank (a GPU each; on the CPU, the measured peak is
    /// one rank's pool of cores / ranks threads).
    pub peak_devices: usize,
    /// Scratch for host-value collectives (token counts, losses, stop requests).
    pub(super) comm_scalars: Buf,
    /// Names this run's checkpoint temp folders the same on every rank (rank 0's pid).
    pub(super) save_tag: u64,
    /// Seconds spent in collectives by the last step (all-gathers, reduce-scatters, all-reduces).
    pub last_comm_s: f64,
    /// pp > 1 (or `pipeline_on_one_rank`): this rank's stages, schedule and pp group
    /// (train/pipeline/).
    pub pipeline: Option<Pipeline>,
}

/// Results of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepResult {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Tokens of the global batch (every data-parallel rank's).
    pub tokens: usize,
}

impl Trainer {
    /// The trainer of `cfg` for the model `cfg.model.name` names in `reg`.
    pub fn new(cfg: JobConfig, reg: &Registry) -> Result<Trainer> {
        Self::with_options(cfg, reg, false)
    }

    /// `flavor_vocab`: keep the flavor's vocabulary instead of the tokenizer's (benchmarks run a
    /// real 128k-vocab output layer on built-in data, whose ids are all below it).
    pub fn with_options(cfg: JobConfig, reg: &Registry, flavor_vocab: bool) -> Result<Trainer> {
        Self::distributed(cfg, reg, flavor_vocab, None)
    }

    /// The trainer of one rank of a multi-rank run: `world` is its world communicator (None for
    /// one rank). Every rank calls this collectively with the same config.
    pub fn distributed(
        mut cfg: JobConfig,
        reg: &Registry,
        flavor_vocab: bool,
        world: Option<Box<dyn Communicator>>,
    ) -> Result<Trainer> {
        cfg.validate()?;
        let spec = reg.find(&cfg.model.name)?;
        cfg.model.name = spec.name.to_string();
        // Model problems (unknown flavor, seq_len beyond the model) first: they are cheap to find.
        resolve::run_args(spec, &cfg, None)?;
        let reshard = Reshard::parse(&cfg.parallelism.fsdp_reshard_after_forward)?;
        let reduce_dtype = reduce_dtype(&cfg)?;
        let world_size = world.as_ref().map_or(1, |w| w.size());
        let dims = parallel_dims(&cfg, world_size)?;
        let g = dims.degrees;
        if cfg.checkpoint.last_save_in_hf && (g.dp_shard > 1 || g.tp > 1) {
            return Err(Error::Config(
                "checkpoint.last_save_in_hf with data_parallel_shard_degree or \
                 tensor_parallel_degree > 1: the Hugging Face export reads whole weights, which \
                 FSDP and TP ranks do not hold; export the last checkpoint with `titan convert` \
                 instead"
                    .into(),
            ));
        }
        let init_timeout =
            std::time::Duration::from_secs(cfg.comm.init_timeout_seconds.max(1) as u64);
        // The pipeline's transfers go through a communicator even with every stage here.
        let world = match world {
            None if cfg.parallelism.pipeline_on_one_rank => HostComm::local_comms(1).pop(),
            w => w,
        };
        if let Some(w) = &world {
            w.set_timeout(init_timeout);
        }
        let (be, world) = select_rank_backend(&cfg.training.device, world, init_timeout)?;
        let device = device_name(be.as_ref());
        let mesh = match world {
            Some(w) => Some(Mesh::new(dims, w)?),
            None => None,
        };
        let rank = mesh.as_ref().map_or(0, |m| m.world.rank());
        let dp = dims.dp();
        let accum = cfg.gradient_accumulation_steps(dp)?;
        let seed = cfg.training.seed.unwrap_or(0).max(0) as u64;
        // torchtitan's default hf_assets_path points into its own repository; when that folder is
        // absent the byte-level tokenizer is used. Any other path must exist.
        let assets = non_empty(&cfg.model.hf_assets_path)
            .filter(|p| *p != TORCHTITAN_DEFAULT_ASSETS || std::path::Path::new(p).exists());
        let tokenizer = cfg
            .model
            .tokenizer_path
            .as_deref()
            .and_then(non_empty)
            .or(assets)
            .map(PathBuf::from);
        let dcfg = DataConfig {
            dataset: cfg.training.dataset.clone(),
            dataset_path: cfg
                .training
                .dataset_path
                .as_deref()
                .and_then(non_empty)
                .map(PathBuf::from),
            tokenizer: tokenizer.clone(),
            seq_len: cfg.training.seq_len as usize,
            batch: cfg.training.local_batch_size as usize,
            seed,
            dp_rank: dims.dp_rank(rank),
            dp_world: dp,
            token_dtype: None,
            vocab_size: None,
            progress: rank == 0,
        };
        let loader = build_loader(&dcfg)?;
        let vocab = if flavor_vocab {
            None
        } else {
            loader.vocab_size()
        };
        let dtype = compute_dtype(&cfg, be.name())?;
        // One architecture for the traced plan and the real model.
        let args = resolve::run_args(spec, &cfg, vocab)?;
        let tp_rank = dims.coords(rank)[4];
        let mut layout = match g.pp > 1 || cfg.parallelism.pipeline_on_one_rank {
            true => Some(Layout::new(spec, &cfg, args.as_ref(), &dims, rank)?),
            false => None,
        };
        let (plan, validation_plan, mut memory) = match layout.as_mut() {
            Some(l) => l.trace_plan(spec, &cfg, args.as_ref(), dtype)?,
            None => trace_plan(spec, &cfg, args.as_ref(), dtype, tp_rank)?,
        };
        let (model, builder) = match &layout {
            Some(l) => l.build(spec, args.as_ref(), &cfg)?,
            None => spec.build_for(args.as_ref(), &cfg)?,
        };
        let tp = match &mesh {
            Some(m) if g.tp > 1 => Some(TensorParallel::new(
                m.world.split(&dims.group(rank, &[Dim::Tp]))?,
                builder.tp_dims(),
                cfg.parallelism.enable_sequence_parallel,
                !cfg.parallelism.disable_loss_parallel,
            )),
            _ => None,
        };
        let local_specs = local_specs(&builder.params, &builder.tp_dims(), g.tp, tp_rank);
        let sharding = match &mesh {
            Some(m) if g.dp_shard > 1 => Some(Sharding {
                layout: FsdpLayout::new(
                    &local_specs,
                    &builder.fsdp_units,
                    g.dp_shard,
                    m.dp_shard.rank(),
                    reshard,
                    // Pipeline microbatches accumulate too (train/pipeline/step.rs).
                    accum > 1 || layout.is_some(),
                )?,
                comm: m.world.split(&dims.group(rank, &[Dim::DpShard]))?,
                reduce_dtype,
            }),
            _ => None,
        };
        let store = ParamStore::materialize_sharded(builder, be.as_ref(), dtype, sharding, tp)?;
        memory.state = store.state_bytes();
        // Every rank draws the same initial weights and keeps its shard of them.
        model.init_weights(&store, be.as_ref(), seed)?;
        let pipeline = match (layout, &mesh) {
            (Some(l), Some(m)) => Some(l.connect(spec, args.as_ref(), m, &store, dtype)?),
            _ => None,
        };
        let arena = be.alloc(plan.peak.max(256))?;
        let validator = match validation_plan {
            Some(vp) => Some(Validator::new(
                &cfg,
                model.args(),
                vp,
                tokenizer,
                be.as_ref(),
                arena.bytes(),
                (dims.dp_rank(rank), dp),
            )?),
            None => None,
        };
        let scalar_mem = be.alloc(256)?;
        let scalars = Buf::new(scalar_mem.ptr(), 2, DType::F32);
        let comm_scalars = Buf::new(scalar_mem.ptr() + 128, 16, DType::F32);
        let lr = LrSchedule::from_config(&cfg)?;
        let peak = match metrics::device_peak_flops(&device) {
            Some(f) => Peak {
                flops: f,
                source: format!("{device} bf16 dense peak (datasheet)"),
            },
            // Only rank 0 reports MFU. CPU ranks share the machine, each computing in a pool of
            // cores / ranks threads: rank 0 measures its pool while the others wait, and the
            // run's peak is that once per rank (`peak_devices`).
            None => {
                let world = mesh.as_ref().map(|m| m.world.as_ref());
                world.map_or(Ok(()), |w| w.barrier())?;
                let p = match rank {
                    0 => metrics::measure_gemm_peak(be.as_ref()),
                    _ => Ok(Peak {
                        flops: f64::NAN,
                        source: "measured on rank 0".into(),
                    }),
                };
                world.map_or(Ok(()), |w| w.barrier())?;
                p?
            }
        };
        let peak_devices = world_size;
        let (_, flops_per_token) = model
            .args()
            .nparams_and_flops(cfg.training.seq_len as usize);
        let dump = PathBuf::from(&cfg.job.dump_folder);
        Ok(Trainer {
            cfg,
            be,
            spec,
            model,
            store,
            plan,
            memory,
            arena,
            scalars,
            _scalar_mem: scalar_mem,
            loader,
            lr,
            step: 0,
            accum,
            peak,
            flops_per_token,
            device,
            validator,
            validation_history: Vec::new(),
            lr_origin: 0,
            dump,
            stop: StopFlag::new(),
            stopped: None,
            mesh,
            rank,
            logs: rank == 0,
            peak_devices,
            comm_scalars,
            save_tag: 0,
            last_comm_s: 0.0,
            pipeline,
        })
        .and_then(Trainer::agree_at_start)
    }

    pub fn checkpoint_root(&self) -> PathBuf {
        self.dump.join(&self.cfg.checkpoint.folder)
    }

    /// One optimizer step over `accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepResult> {
        if self.pipeline.is_some() {
            return self.pipeline_step();
        }
        let step = self.step + 1;
        let be = self.be.as_ref();
        let mut batches = Vec::with_capacity(self.accum);
        for _ in 0..self.accum {
            batches.push(self.loader.next_batch()?);
        }
        let local_valid: usize = batches
            .iter()
            .map(|b| b.labels.iter().filter(|&&l| l >= 0).count())
            .sum();
        let comm0 = Instant::now();
        // The loss is the mean over the global batch's tokens: every rank scales by their count.
        let valid = self.global_count(local_valid)?;
        let mut comm_s = comm0.elapsed().as_secs_f64();
        let grad_scale = 1.0 / valid.max(1) as f32;
        timed(
            be,
            || "optimizer zero_grads".into(),
            || self.store.zero_grads(be),
        )?;
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for (i, batch) in batches.iter().enumerate() {
            if let Some(f) = self.store.fsdp() {
                // Gradient accumulation reduces once, on the step's last micro-batch.
                f.set_sync(i + 1 == batches.len());
            }
            let placement = Placement::Planned {
                base: self.arena.ptr(),
                plan: &self.plan,
            };
            let mut tape = Tape::new(be, &self.store, placement);
            let inputs = tape.input_i32(&batch.inputs, [batch.batch, batch.seq])?;
            let labels = tape.input_i32(&batch.labels, [batch.batch * batch.seq])?;
            let loss =
                self.spec
                    .loss_of(self.model.as_ref(), &mut tape, inputs, labels, grad_scale)?;
            tape.backward(loss)?;
            loss_sum += tape.to_vec_f32(loss)?[0] as f64;
            tokens += batch.batch * batch.seq;
        }
        let t = Instant::now();
        if let Some(f) = self.store.fsdp() {
            f.comm().wait()?; // NCCL: the reduce-scatters finished (or a peer is named lost)
        }
        self.reduce_tp_partials()?;
        self.replicate_grads()?;
        let mut sums = [loss_sum as f32];
        self.all_reduce_dp(&mut sums, ReduceOp::Sum)?;
        let loss = sums[0] as f64 / valid.max(1) as f64;
        let tokens = tokens * self.mesh.as_ref().map_or(1, |m| m.dims.dp());
        comm_s += t.elapsed().as_secs_f64();
        let (r, norm_s) = self.clip_and_update(step, loss, tokens)?;
        self.last_comm_s = comm_s
            + norm_s
            + self
                .store
                .fsdp()
                .map_or(0.0, |f| f.stats().time.as_secs_f64());
        Ok(r)
    }

    /// The end of every step (plain or pipelined): the global gradient norm and the clip
    /// coefficient, the NaN check before any weight changes, one fused AdamW; `step` becomes
    /// the trainer's. Returns the result and the seconds the norm's all-reduce took.
    pub(super) fn clip_and_update(
        &mut self,
        step: u64,
        loss: f64,
        tokens: usize,
    ) -> Result<(StepResult, f64)> {
        let be = self.be.as_ref();
        let norm_sq = self.scalars.slice(0, 1);
        let coef = self.scalars.slice(1, 1);
        let t = Instant::now();
        timed(
            be,
            || "optimizer grad_norm".into(),
            || self.grad_norm_sq(norm_sq),
        )?;
        let norm_s = t.elapsed().as_secs_f64();
        let max_norm = if self.cfg.training.max_norm > 0.0 {
            self.cfg.training.max_norm as f32
        } else {
            f32::INFINITY
        };
        be.clip_coef(norm_sq, max_norm, coef)?;
        let mut host = [0f32; 1];
        be.download(norm_sq, bytemuck::cast_slice_mut(&mut host))?;
        let grad_norm = (host[0] as f64).sqrt();
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "step {step}: loss {loss}, grad_norm {grad_norm}; the weights were not updated (last good checkpoint kept)"
            )));
        }
        let lr = self.lr.lr_at(self.schedule_step(step));
        let o = &self.cfg.optimizer;
        let hp = AdamW {
            lr,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            step,
        };
        if let Some(f) = self.store.fsdp() {
            f.drain()?; // no gather may still read the shards AdamW rewrites
        }
        let (m, v) = self.store.flat_moments();
        timed(
            be,
            || "optimizer adamw".into(),
            || {
                let bufs = AdamWBufs {
                    param: self.store.flat_master(),
                    grad: self.store.flat_grad(),
                    m,
                    v,
                    compute: self.store.flat_compute(),
                    grad_scale: coef,
                };
                be.adamw(&bufs, &hp)
            },
        )?;
        self.store.shards_updated();
        self.step = step;
        let r = StepResult {
            loss,
            grad_norm,
            lr: lr as f64,
            tokens,
        };
        Ok((r, norm_s))
    }

    /// Trains to `training.steps`, logging every `metrics.log_freq` steps and checkpointing
    /// on `checkpoint.interval`. Returns the logged history. A stop request (`self.stop`) ends it
    /// early, after a step and its checkpoint (see preempt.rs), and sets `self.stopped`.
    pub fn fit(&mut self, quiet: bool) -> Result<Vec<StepMetrics>> {
        let steps = self.cfg.training.steps.max(0) as u64;
        let log_freq = self.cfg.metrics.log_freq.max(1) as u64;
        let lead = self.rank == 0;
        let quiet = quiet || !self.logs;
        let mut writer = if lead {
            MetricsWriter::create(&self.dump)?
        } else {
            MetricsWriter::history_only(&self.dump)
        };
        let mut tb = TensorBoard::open(&self.cfg, self.rank, 0)?;
        let planned = (self.memory.total()) as f64 / GIB;
        let mut started = Instant::now();
        let first_step = self.step;
        let mut window_tokens = 0usize;
        let mut window_start = Instant::now();
        let mut window_steps = 0u64;
        let mut saved = None;
        while self.step < steps {
            if let Some(cause) = self.agreed_stop()? {
                self.stopped = Some(self.stop_run(cause, first_step, saved)?);
                break;
            }
            let r = self.train_step()?;
            if self.step == first_step + 1 {
                self.set_comm_timeout(self.cfg.comm.train_timeout_seconds);
            }
            window_tokens += r.tokens;
            window_steps += 1;
            let done = self.step;
            if done.is_multiple_of(log_freq) || done == steps || done == first_step + 1 {
                self.be.synchronize()?;
                let dt = window_start.elapsed().as_secs_f64();
                let tps = window_tokens as f64 / dt;
                let tflops = tps * self.flops_per_token / 1e12;
                let per_step = started.elapsed().as_secs_f64() / (done - first_step) as f64;
                let m = StepMetrics {
                    step: done,
                    loss: r.loss,
                    grad_norm: r.grad_norm,
                    lr: r.lr,
                    tokens_per_s: tps,
                    tflops,
                    mfu_pct: 100.0 * tflops * 1e12 / (self.peak.flops * self.peak_devices as f64),
                    step_time_s: dt / window_steps as f64,
                    memory_planned_gib: planned,
                    memory_actual_gib: self.actual_memory() as f64 / GIB,
                    eta_s: per_step * (steps - done) as f64,
                };
                if !quiet {
                    self.say(format_args!("{}", m.log_line()))?;
                }
                writer.write(&m)?;
                tb.log_step(&m)?;
                window_tokens = 0;
                window_steps = 0;
                window_start = Instant::now();
            }
            let due = self.validator.as_ref().is_some_and(|v| v.should_run(done));
            // Taken out for the run, so that it can all-reduce through `self`; put back below.
            if let Some(mut v) = due.then(|| self.validator.take()).flatten() {
                let reduce = |vals: &mut [f32]| self.all_reduce_dp(vals, ReduceOp::Sum);
                let on = ValRun {
                    spec: self.spec,
                    model: self.model.as_ref(),
                    store: &self.store,
                    be: self.be.as_ref(),
                    train_arena: self.arena.ptr(),
                    all_reduce: &reduce,
                };
                let m = match &self.pipeline {
                    Some(_) => self.validate_pipelined(&mut v, done),
                    None => v.run(done, &on),
                };
                self.validator = Some(v);
                let m = m?;
                if !quiet {
                    self.say(format_args!("{}", m.log_line()))?;
                }
                writer.write_json(&m)?;
                tb.log_validation(&m)?;
                self.validation_history.push(m);
                // Throughput and ETA count training steps only.
                let spent = std::time::Duration::from_secs_f64(m.validation_time_s);
                window_start += spent;
                started += spent;
            }
            let c = &self.cfg.checkpoint;
            let last = done == steps;
            let due = last
                || done.is_multiple_of(c.interval.max(1) as u64)
                || (c.enable_first_step_checkpoint && done == 1);
            if c.enable && !c.load_only && due {
                self.save(if last && c.last_save_model_only {
                    SaveKind::ModelOnly
                } else {
                    SaveKind::Full
                })?;
                saved = Some(done);
            }
            if c.last_save_in_hf && !c.load_only && last && lead {
                let dir = self.export_hf()?;
                if !quiet {
                    self.say(format_args!(
                        "titan: Hugging Face checkpoint of step {done} in {}",
                        dir.display()
                    ))?;
                }
            }
        }
        Ok(writer.history)
    }

    /// Bytes this trainer holds on its backend: the flat state, constants and the arena.
    pub fn actual_memory(&self) -> usize {
        let validation = self.validator.as_ref().map_or(0, Validator::own_bytes);
        let pipeline = self
            .pipeline
            .as_ref()
            .map_or(0, |p| p.peak_activations.get() + p.validation_arena_bytes());
        self.store.state_bytes().total() + self.arena.bytes() + validation + pipeline + 256
    }
}

const TORCHTITAN_DEFAULT_ASSETS: &str = "./tests/assets/tokenizer";

fn non_empty(s: &str) -> Option<&str> {
    (!s.trim().is_empty()).then_some(s)
}
