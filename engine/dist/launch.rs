//! Where this process sits in a multi-node run: one process per node holding `--nproc-per-node`
//! ranks (titan's launch), or one process per rank started by torchrun or `srun` (RANK,
//! WORLD_SIZE, LOCAL_RANK set). Flags win over the environment; under SLURM the node count, node
//! rank and master come from SLURM_NNODES, SLURM_NODEID and the first host of
//! SLURM_JOB_NODELIST (compressed lists such as `gpu[01-04,07]` included).

use crate::error::{Error, Result};

/// torchrun's launcher flags as given on the command line (None = not given).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchArgs {
    pub nproc_per_node: Option<usize>,
    pub nnodes: Option<usize>,
    pub node_rank: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

/// The resolved layout of this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub world: usize,
    pub nnodes: usize,
    pub node: usize,
    /// The global ranks this process runs (one thread each), ascending.
    pub ranks: Vec<usize>,
    /// Local index of each of `ranks` on its node (the GPU it drives).
    pub local_ranks: Vec<usize>,
    pub master_addr: String,
    pub master_port: u16,
}

/// SLURM's custom port when none is given (torchrun's default too).
pub const DEFAULT_PORT: u16 = 29500;

fn bad(m: String) -> Error {
    Error::Config(format!("launch: {m}"))
}

fn parse_env<T: std::str::FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    k: &str,
) -> Result<Option<T>> {
    match env(k) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("environment variable {k}={v:?} is not a number"))),
    }
}

/// The first host of a SLURM node list: `gpu[01-04,07],cpu1` -> `gpu01`; `node7` -> `node7`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let head_end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..head_end];
    if list[head_end..].starts_with('[') {
        let inner_end = list[head_end..]
            .find(']')
            .ok_or_else(|| bad(format!("SLURM_JOB_NODELIST {list:?} has an unclosed '['")))?;
        let inner = &list[head_end + 1..head_end + inner_end];
        let first = inner.split(',').next().unwrap_or("");
        let lo = first.split('-').next().unwrap_or("").trim();
        if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad(format!(
                "SLURM_JOB_NODELIST {list:?}: cannot read the range {inner:?}"
            )));
        }
        return Ok(format!("{prefix}{lo}"));
    }
    if prefix.is_empty() {
        return Err(bad(format!("SLURM_JOB_NODELIST {list:?} names no host")));
    }
    Ok(prefix.to_string())
}

impl Launch {
    /// Resolves the launch from the flags and the environment (`env` reads a variable).
    pub fn resolve(a: &LaunchArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
        let port = match a.master_port {
            Some(p) => p,
            None => parse_env(env, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT),
        };
        // One process per rank (torchrun / srun --ntasks-per-node=GPUs): RANK and WORLD_SIZE.
        let per_rank =
            a.nproc_per_node.is_none() && env("RANK").is_some() && env("WORLD_SIZE").is_some();
        if per_rank {
            let rank: usize = parse_env(env, "RANK")?.unwrap_or(0);
            let world: usize = parse_env(env, "WORLD_SIZE")?.unwrap_or(1);
            let local: usize = parse_env(env, "LOCAL_RANK")?.unwrap_or(0);
            let local_world: usize = parse_env(env, "LOCAL_WORLD_SIZE")?.unwrap_or(1).max(1);
            if rank >= world {
                return Err(bad(format!("RANK {rank} is not below WORLD_SIZE {world}")));
            }
            let master = a
                .master_addr
                .clone()
                .or_else(|| env("MASTER_ADDR"))
                .unwrap_or_else(|| "127.0.0.1".into());
            return Ok(Launch {
                world,
                nnodes: world.div_ceil(local_world),
                node: parse_env(env, "GROUP_RANK")?.unwrap_or(rank / local_world),
                ranks: vec![rank],
                local_ranks: vec![local],
                master_addr: master,
                master_port: port,
            });
        }
        let slurm = env("SLURM_JOB_ID").is_some() || env("SLURM_NNODES").is_some();
        let nproc = a.nproc_per_node.unwrap_or(1);
        if nproc == 0 {
            return Err(bad("--nproc-per-node must be at least 1".into()));
        }
        let nnodes = match a.nnodes {
            Some(n) => n,
            None if slurm => parse_env(env, "SLURM_NNODES")?.unwrap_or(1),
            None => 1,
        };
        let node = match a.node_rank {
            Some(n) => n,
            None if slurm => parse_env(env, "SLURM_NODEID")?.unwrap_or(0),
            None => 0,
        };
        if nnodes == 0 || node >= nnodes {
            return Err(bad(format!(
                "node rank {node} is not below the node count {nnodes}"
            )));
        }
        let master = match &a.master_addr {
            Some(m) => m.clone(),
            None => match env("MASTER_ADDR") {
                Some(m) => m,
                None if slurm && nnodes > 1 => first_host(&env("SLURM_JOB_NODELIST").ok_or_else(
                    || bad("under SLURM with several nodes, SLURM_JOB_NODELIST (or --master-addr) is needed".into()),
                )?)?,
                None if nnodes > 1 => {
                    return Err(bad(format!(
                        "{nnodes} nodes need --master-addr (the host of node rank 0)"
                    )))
                }
                None => "127.0.0.1".into(),
            },
        };
        let ranks: Vec<usize> = (node * nproc..(node + 1) * nproc).collect();
        Ok(Launch {
            world: nnodes * nproc,
            nnodes,
            node,
            local_ranks: (0..nproc).collect(),
            ranks,
            master_addr: master,
            master_port: port,
        })
    }

    /// Whether every rank of the world runs in this process (threads; no sockets needed).
    pub fn single_process(&self) -> bool {
        self.ranks.len() == self.world
    }
}

/// Runs `f` once per input (a rank's communicator, or what it connects with), each on its own
/// thread (ranks as threads of this process), and returns the ranks' results in order. A rank
/// that panics is an error naming it; a rank that fails drops its communicator, which the others
/// see as a lost peer, not a hang. Each rank computes in its own rayon pool of cores / ranks
/// threads, as one process per device would: CPU ranks do not steal each other's kernel work.
pub fn run_rank_threads<I: Send, T: Send>(
    inputs: Vec<I>,
    f: &(dyn Fn(I) -> Result<T> + Sync),
) -> Vec<Result<T>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_rank = (cores / inputs.len().max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let run = move || -> Result<T> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(per_rank)
                        .stack_size(16 << 20)
                        .thread_name(move |i| format!("rank-{r}-{i}"))
                        .build()
                        .map_err(|e| Error::Comm(format!("rank {r}: thread pool: {e}")))?;
                    pool.install(|| f(c))
                };
                std::thread::Builder::new()
                    .name(format!("rank-{r}"))
                    .stack_size(16 << 20)
                    .spawn_scoped(s, run)
                    .map_err(|e| Error::Comm(format!("rank {r}: cannot start its thread: {e}")))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h?.join()
                    .unwrap_or_else(|_| Err(Error::Comm(format!("rank {r} panicked"))))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn nodelists() {
        assert_eq!(first_host("gpu[01-04,07]").unwrap(), "gpu01");
        assert_eq!(first_host("node[3,5-6],login1").unwrap(), "node3");
        assert_eq!(first_host("a100-7,a100-9").unwrap(), "a100-7");
        assert_eq!(first_host("solo").unwrap(), "solo");
        assert!(first_host("gpu[01-04").is_err());
        assert!(first_host("").is_err());
    }

    #[test]
    fn one_node_many_ranks_and_flags_over_env() {
        let a = LaunchArgs {
            nproc_per_node: Some(4),
            ..LaunchArgs::default()
        };
        let l = Launch::resolve(&a, &env(&[])).unwrap();
        assert_eq!(
            (l.world, l.ranks.clone(), l.single_process()),
            (4, vec![0, 1, 2, 3], true)
        );
        let a = LaunchArgs {
            nproc_per_node: Some(2),
            nnodes: Some(3),
            node_rank: Some(2),
            master_addr: Some("10.0.0.1".into()),
            master_port: Some(4000),
        };
        let l = Launch::resolve(&a, &env(&[("MASTER_PORT", "1"), ("SLURM_NNODES", "9")])).unwrap();
        assert_eq!((l.world, l.node, l.ranks.clone()), (6, 2, vec![4, 5]));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("10.0.0.1", 4000));
        let a = LaunchArgs {
            nnodes: Some(2),
            ..LaunchArgs::default()
        };
        let e = Launch::resolve(&a, &env(&[])).unwrap_err().to_string();
        assert!(e.contains("--master-addr"), "{e}");
    }

    #[test]
    fn slurm_and_torchrun() {
        let a = LaunchArgs {
            nproc_per_node: Some(8),
            ..LaunchArgs::default()
        };
        let s = env(&[
            ("SLURM_JOB_ID", "77"),
            ("SLURM_NNODES", "4"),
            ("SLURM_NODEID", "3"),
            ("SLURM_JOB_NODELIST", "gpu[01-04]"),
        ]);
        let l = Launch::resolve(&a, &s).unwrap();
        assert_eq!(
            (l.world, l.node, l.ranks[0], l.master_addr.as_str()),
            (32, 3, 24, "gpu01")
        );
        assert_eq!(l.master_port, DEFAULT_PORT);
        let t = env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "host0"),
            ("MASTER_PORT", "29511"),
        ]);
        let l = Launch::resolve(&LaunchArgs::default(), &t).unwrap();
        assert_eq!(
            (l.world, l.node, l.ranks.clone(), l.local_ranks.clone()),
            (8, 1, vec![5], vec![1])
        );
        assert_eq!((l.master_addr.as_str(), l.master_port), ("host0", 29511));
        let e = Launch::resolve(
            &LaunchArgs::default(),
            &env(&[("RANK", "x"), ("WORLD_SIZE", "2")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
    }
}
