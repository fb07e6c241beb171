//! Why a reload was refused. Every variant means the same thing for what
//! runs: nothing changed, on any shard; the running configuration, every
//! socket and every allocation stay as they were.

use std::time::Duration;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read, is empty, does not parse or does not validate.
    #[error("{0}")]
    File(String),
    /// `threads` differs from the running shard count.
    #[error(
        "threads: {running} now, {file} in the file: a reload cannot change it (clients would move to shards that do not know them); restart turnd to apply it"
    )]
    Threads { running: usize, file: usize },
    /// A setting this host cannot serve: a certificate or key that does not
    /// load, a relay address not on this host, a port that cannot be bound.
    #[error("{0}")]
    Host(#[from] ConfigError),
    /// A shard could not take a step of the change (its runtime refused a
    /// new listener socket).
    #[error("shard {shard} cannot serve listener {listener}: {error}; no shard switched")]
    ShardStep { shard: usize, listener: String, error: String },
    /// A shard did not say within `wait` whether it could take the change
    /// (its thread is stuck or stopped).
    #[error("shard {shard} did not answer within {} s (its thread is stuck or stopped); no shard switched", wait.as_secs())]
    ShardSilent { shard: usize, wait: Duration },
}

impl ReloadError {
    /// The step that failed, for the admin API's answer.
    pub fn step(&self) -> &'static str {
        match self {
            ReloadError::File(_) => "read",
            ReloadError::Threads { .. } => "threads",
            ReloadError::Host(_) => "host",
            ReloadError::ShardStep { .. } => "shard prepare",
            ReloadError::ShardSilent { .. } => "shard answer",
        }
    }

    /// The shard concerned, if one is.
    pub fn shard(&self) -> Option<usize> {
        match self {
            ReloadError::ShardStep { shard, .. } | ReloadError::ShardSilent { shard, .. } => Some(*shard),
            _ => None,
        }
    }
}
