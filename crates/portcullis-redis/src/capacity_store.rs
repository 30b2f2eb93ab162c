//! The capacity store of [`RedisStorage`]: the stored capacity of each endpoint, and
//! [`get_or_probe`](RedisStorage::get_or_probe), which runs the capacity search (the
//! "probe") in at most one process at a time and shares its result.

use crate::error::StorageError;
use crate::scripts::{self, Keys};
use crate::storage::RedisStorage;
use std::future::Future;
use std::time::Duration;

/// The probe lock's TTL; the owner extends it every third of it while probing.
pub(crate) const PROBE_LOCK_TTL: Duration = Duration::from_secs(5);

impl RedisStorage {
    /// The capacity stored in Redis for `endpoint`, if any (a stored 0 means "unknown" and
    /// reads as `None`).
    pub async fn stored_capacity(&self, endpoint: &str) -> Result<Option<usize>, StorageError> {
        let keys = Keys::new(&self.process.config.key_prefix, endpoint);
        self.process
            .redis
            .query::<Option<usize>>(redis::cmd("GET").arg(&keys.capacity))
            .await
            .map(|c| c.filter(|&c| c > 0))
    }

    /// Stores `capacity` for `endpoint` and tells every process (their sources apply it).
    pub async fn store_capacity(
        &self,
        endpoint: &str,
        capacity: usize,
    ) -> Result<(), StorageError> {
        let keys = Keys::new(&self.process.config.key_prefix, endpoint);
        self.process
            .redis
            .invoke::<i64>(
                scripts::SET_CAPACITY_SCRIPT
                    .key(&keys.capacity)
                    .arg(capacity)
                    .arg(&keys.channel),
            )
            .await
            .map(drop)
    }

    /// The capacity of `endpoint`, probed at most once across all processes.
    ///
    /// * A stored capacity is reused as is (unless `force_reprobe`).
    /// * Otherwise the first process takes a short lock (`SET NX PX`, extended while it
    ///   probes), runs `probe`, stores the result and tells every process; the others wait
    ///   for the lock to go and reuse the stored result. If the prober dies, its lock expires
    ///   and a waiter takes over.
    /// * `force_reprobe: true` probes again even when a capacity is stored, unless another
    ///   process is probing right now (then its fresh result is reused).
    pub async fn get_or_probe<F, Fut, E>(
        &self,
        endpoint: &str,
        force_reprobe: bool,
        probe: F,
    ) -> Result<usize, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, E>>,
        E: Into<portcullis_core::BoxError>,
    {
        let keys = Keys::new(&self.process.config.key_prefix, endpoint);
        let mut force = force_reprobe;
        let mut probe = Some(probe);
        loop {
            if !force {
                if let Some(c) = self.stored_capacity(endpoint).await? {
                    return Ok(c);
                }
            }
            if self.lock_probe(&keys).await? {
                let probe = probe.take().expect("the probe runs at most once");
                let result = self.probe_holding_lock(&keys, probe).await;
                let stored = match result {
                    Ok(c) => self.store_capacity(endpoint, c).await.map(|()| c),
                    Err(e) => Err(StorageError::Probe(e.into())),
                };
                self.unlock_probe(&keys).await;
                return stored;
            }
            // Someone else is probing: wait for the lock to go, then reuse the result.
            force = false;
            self.wait_for_probe(&keys).await?;
        }
    }

    /// Takes the probe lock of an endpoint (`SET NX PX`); `false` when another process
    /// holds it.
    async fn lock_probe(&self, keys: &Keys) -> Result<bool, StorageError> {
        let won: Option<String> = self
            .process
            .redis
            .query(
                redis::cmd("SET")
                    .arg(&keys.probe_lock)
                    .arg(&self.process.instance)
                    .arg("NX")
                    .arg("PX")
                    .arg(PROBE_LOCK_TTL.as_millis() as u64),
            )
            .await?;
        Ok(won.is_some())
    }

    /// Runs `probe`, extending the probe lock every third of its TTL meanwhile.
    async fn probe_holding_lock<F, Fut, E>(&self, keys: &Keys, probe: F) -> Result<usize, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<usize, E>>,
    {
        let run = probe();
        tokio::pin!(run);
        let mut tick = tokio::time::interval(PROBE_LOCK_TTL / 3);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut run => return r,
                _ = tick.tick() => {
                    let mut extend = scripts::EXTEND_SCRIPT.key(&keys.probe_lock);
                    extend
                        .arg(&self.process.instance)
                        .arg(PROBE_LOCK_TTL.as_millis() as u64);
                    let _ = self.process.redis.invoke::<i64>(&extend).await;
                }
            }
        }
    }

    /// Gives the probe lock back (if this process still holds it).
    async fn unlock_probe(&self, keys: &Keys) {
        let mut unlock = scripts::UNLOCK_SCRIPT.key(&keys.probe_lock);
        unlock.arg(&self.process.instance);
        let _ = self.process.redis.invoke::<i64>(&unlock).await;
    }

    /// Waits until no process holds the probe lock, checking every 50 ms.
    async fn wait_for_probe(&self, keys: &Keys) -> Result<(), StorageError> {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let held: bool = self
                .process
                .redis
                .query(redis::cmd("EXISTS").arg(&keys.probe_lock))
                .await?;
            if !held {
                return Ok(());
            }
        }
    }
}
