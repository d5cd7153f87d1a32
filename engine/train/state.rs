//! The trainer's state in checkpoints (torchtitan's `components/checkpoint.py` options):
//! what a save writes (everything, or the model alone: `last_save_model_only`, the seed
//! checkpoint) and what a load restores (`exclude_from_loading`: model, optimizer, lr_scheduler,
//! dataloader, train_state; `initial_load_model_only = false` loads a whole titan checkpoint as
//! the starting point).
//!
//! The LR schedule is a function of a step counter. It equals the training step unless a load
//! restored one of the two without the other; `lr_origin` is the training step at which the
//! schedule's counter was zero.

use super::trainer::Trainer;
use crate::backend::Buf;
use crate::checkpoint::{self, CheckpointMeta, LoadedCheckpoint, NamedTensor};
use crate::error::{Error, Result};
use crate::model::resolve;
use crate::params::ParamId;
use crate::progress::Progress;
use crate::tensor::DType;
use std::path::PathBuf;

/// What a save writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveKind {
    /// Weights, AdamW moments, data position, schedule: enough to resume bitwise.
    Full,
    /// Weights only (the last save with `last_save_model_only`, the seed checkpoint).
    ModelOnly,
}

impl Trainer {
    fn param_tensor_names(&self) -> Vec<(String, ParamId)> {
        self.store
            .ids()
            .map(|id| (self.store.name(id).to_string(), id))
            .collect()
    }

    /// The LR schedule's counter at training step `step`.
    pub(super) fn schedule_step(&self, step: u64) -> u64 {
        (step as i64 - self.lr_origin).max(1) as u64
    }

    /// Writes `step-N` of the current step.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        self.save(SaveKind::Full)
    }

    /// Writes `step-N`: the model masters and, for `SaveKind::Full`, the AdamW moments; always the
    /// data position, schedule and config.
    pub fn save(&self, kind: SaveKind) -> Result<PathBuf> {
        let be = self.be.as_ref();
        // (name, global shape, box offset, box shape, f32 data) of this rank's boxes.
        type Box_ = (String, Vec<usize>, Vec<usize>, Vec<usize>, Vec<f32>);
        let mut host: Vec<Box_> = Vec::new();
        let parts = if kind == SaveKind::Full { 3 } else { 1 };
        let bar = Progress::new(
            format!("copying step {} state to host memory", self.step),
            parts * self.param_bytes(),
            true,
        );
        for (name, id) in self.param_tensor_names() {
            let mut bufs = vec![(format!("model.{name}"), self.store.master(id))];
            if kind == SaveKind::Full {
                bufs.push((format!("optim.exp_avg.{name}"), self.store.moment1(id)));
                bufs.push((format!("optim.exp_avg_sq.{name}"), self.store.moment2(id)));
            }
            let (offset, shape) = self.store.local_box(id);
            // Tensor-parallel ranks but the first hold copies of a replicated parameter; a
            // pipeline stage's copy of another stage's parameter (a tied embedding) is saved by
            // that stage.
            let copy = self
                .store
                .tp()
                .is_some_and(|t| t.rank > 0 && t.dim(id).is_none())
                || self.pipeline.as_ref().is_some_and(|p| p.is_copy(id));
            if shape.first() == Some(&0) || copy || !self.writes_model_state() {
                continue;
            }
            for (key, buf) in bufs {
                let data = self.store.read_f32(be, buf)?;
                bar.add(4 * data.len() as u64);
                let global = self.store.shape(id).0.clone();
                host.push((key, global, offset.clone(), shape.clone(), data));
            }
        }
        bar.finish();
        let tensors: Vec<NamedTensor> = host
            .iter()
            .map(|(n, g, o, s, d)| {
                NamedTensor::boxed(n, DType::F32, g, o, s, bytemuck::cast_slice(d))
            })
            .collect();
        let g = self.mesh.as_ref().map(|m| m.dims.degrees);
        let degree = |f: fn(&crate::train::config::Degrees) -> usize| g.as_ref().map_or(1, f);
        let meta = CheckpointMeta {
            config_toml: self.cfg.to_toml_string()?,
            parallel: serde_json::json!({
                "world_size": self.world_size(),
                "dp_shard": degree(|g| g.dp_shard),
                "dp_replicate": degree(|g| g.dp_replicate),
                "tp": degree(|g| g.tp),
                "pp": self.pipeline.as_ref().map_or(1, |p| p.degree()),
                "cp": 1
            }),
            dataloader: self.loader.state(),
            rng: serde_json::json!({}),
            lr_scheduler: serde_json::json!({"step": self.step as i64 - self.lr_origin}),
            extra: resolve::manifest_record(&self.cfg, self.model.args()),
        };
        let keep = self.cfg.checkpoint.keep_latest_k.max(0) as usize;
        let root = self.checkpoint_root();
        let Some(m) = &self.mesh else {
            return checkpoint::save(&root, self.step, &[tensors], &meta, keep);
        };
        // Every rank writes its shard file into one temp folder; rank 0 then builds the
        // manifest from the files and renames the folder into place (atomic for readers).
        let (rank, world) = (self.rank, self.world_size());
        let tmp = checkpoint::tmp_dir(&root, self.step, self.save_tag);
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp); // an earlier crashed save of this run
        }
        m.world.barrier()?;
        let wrote = checkpoint::write_shard(&tmp, self.step, rank, world, &tensors);
        let all = self.all_ok(wrote, "writing the checkpoint shards");
        let committed = match (all, rank) {
            (Ok(()), 0) => {
                checkpoint::commit(&root, self.step, &tmp, world, &meta, keep).map(|_| ())
            }
            (r, _) => r,
        };
        if committed.is_err() && rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp); // nothing half-written stays behind
        }
        self.all_ok(committed, "committing the checkpoint")?;
        Ok(checkpoint::step_dir(&root, self.step))
    }

    /// Replicas (dp_replicate > 0) hold copies of replica 0's state: only replica 0 writes it.
    fn writes_model_state(&self) -> bool {
        self.mesh.as_ref().is_none_or(|m| {
            m.dims.coords(self.rank)[1] == 0 // ORDER: pp, dp_replicate, ...
        })
    }

    /// Uploads checkpoint tensor `key` into `buf` (parameter `id`'s weights or one of its
    /// moments) after checking that it is f32 of that parameter's shape; errors name the folder
    /// and the tensor.
    pub(super) fn upload_param_state(
        &self,
        ck: &LoadedCheckpoint,
        key: &str,
        id: ParamId,
        buf: Buf,
        bar: &Progress,
    ) -> Result<()> {
        let (offset, shape) = self.store.local_box(id);
        let bytes = ck.read_f32_box_of(key, self.store.shape(id), &offset, &shape)?;
        self.be.upload(buf, &bytes)?;
        bar.add(bytes.len() as u64);
        Ok(())
    }

    /// Bytes of the f32 parameters (one of masters, exp_avg, exp_avg_sq).
    fn param_bytes(&self) -> u64 {
        let ids = self.store.ids();
        ids.map(|id| 4 * self.store.shape(id).numel() as u64).sum()
    }

    /// Progress of loading `parts` f32 copies of the parameters from `ck`.
    fn load_progress(&self, ck: &LoadedCheckpoint, parts: u64) -> Progress {
        let label = format!("loading {}", ck.dir.display());
        Progress::new(label, parts * self.param_bytes(), true)
    }

    /// The checkpoint's model weights into the f32 masters, then the compute copy from them.
    pub(super) fn load_weights(&self, ck: &LoadedCheckpoint) -> Result<()> {
        let bar = self.load_progress(ck, 1);
        self.load_weights_counted(ck, &bar)?;
        bar.finish();
        Ok(())
    }

    fn load_weights_counted(&self, ck: &LoadedCheckpoint, bar: &Progress) -> Result<()> {
        for (name, id) in self.param_tensor_names() {
            let key = format!("model.{name}");
            self.upload_param_state(ck, &key, id, self.store.master(id), bar)?;
        }
        self.store.sync_compute(self.be.as_ref())
    }

    /// Restores `step-N` (or the newest) from the checkpoint folder, less the parts named in
    /// `checkpoint.exclude_from_loading`. Errors name the folder and tensor.
    pub fn load_checkpoint(&mut self, step: Option<u64>) -> Result<u64> {
        let ck = checkpoint::load(&self.checkpoint_root(), step)?;
        self.load_state(&ck)?;
        Ok(self.step)
    }

    /// Restores a loaded checkpoint: weights, moments, data position, step, schedule, each unless
    /// excluded. A weights-only checkpoint past step 0 cannot restore an optimizer.
    pub(super) fn load_state(&mut self, ck: &LoadedCheckpoint) -> Result<()> {
        let excluded = |part: &str| {
            self.cfg
                .checkpoint
                .exclude_from_loading
                .iter()
                .any(|e| e == part)
        };
        let (model, optimizer) = (!excluded("model"), !excluded("optimizer"));
        let (dataloader, train_state) = (!excluded("dataloader"), !excluded("train_state"));
        let lr_scheduler = !excluded("lr_scheduler");
        let has_moments = ck.tensor_names().any(|n| n.starts_with("optim."));
        if optimizer && !has_moments && ck.step() > 0 {
            return Err(Error::Checkpoint(format!(
                "{}: holds model weights only (saved with checkpoint.last_save_model_only), so \
                 training cannot resume from it; start a new run from it with \
                 --checkpoint.initial_load_path, or add \"optimizer\" to \
                 checkpoint.exclude_from_loading",
                ck.dir.display()
            )));
        }
        let moments = optimizer && has_moments;
        let bar = self.load_progress(ck, model as u64 + 2 * moments as u64);
        if model {
            self.load_weights_counted(ck, &bar)?;
        }
        if moments {
            for (name, id) in self.param_tensor_names() {
                for (key, buf) in [
                    (format!("optim.exp_avg.{name}"), self.store.moment1(id)),
                    (format!("optim.exp_avg_sq.{name}"), self.store.moment2(id)),
                ] {
                    self.upload_param_state(ck, &key, id, buf, &bar)?;
                }
            }
        }
        bar.finish();
        // A converted checkpoint (`titan convert`) has no data position: start at the beginning.
        if dataloader && !ck.manifest.dataloader.is_null() {
            self.loader.restore(&ck.manifest.dataloader)?;
        }
        if train_state {
            self.step = ck.step();
        }
        let saved_schedule = ck.manifest.lr_scheduler["step"]
            .as_i64()
            .unwrap_or(ck.step() as i64);
        self.lr_origin = if lr_scheduler {
            self.step as i64 - saved_schedule
        } else {
            self.step as i64
        };
        Ok(())
    }

    /// Loads the newest checkpoint (or checkpoint.load_step) when checkpointing is enabled and one
    /// exists. Returns the step resumed from. Otherwise loads `checkpoint.initial_load_path`, if
    /// set (see train/hf.rs), and returns None.
    pub fn maybe_resume(&mut self) -> Result<Option<u64>> {
        let resumed = self.resume_if_any()?;
        if resumed.is_none() {
            self.load_initial()?;
        }
        Ok(resumed)
    }

    fn resume_if_any(&mut self) -> Result<Option<u64>> {
        if !self.cfg.checkpoint.enable {
            return Ok(None);
        }
        let root = self.checkpoint_root();
        let load_step = self.cfg.checkpoint.load_step;
        if load_step > 0 {
            return self.load_checkpoint(Some(load_step as u64)).map(Some);
        }
        match checkpoint::latest_step(&root)? {
            Some(s) => self.load_checkpoint(Some(s)).map(Some),
            None => Ok(None),
        }
    }
}
