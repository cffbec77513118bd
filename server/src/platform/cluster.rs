//! Several nodes on one shared store (PostgreSQL): this node heartbeats, hears the others'
//! signals (a function changed: forget it and drain its warm sandboxes; tasks queued: wake
//! a worker), checks now and then that it missed none, and ends the running tasks of nodes
//! that stopped heartbeating, as a restart ends a node's own. A node alone (SQLite) does
//! none of this.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};

use super::{blocking, Platform, Result};
use crate::model::now_ms;
use crate::store::{NodeInfo, Signal};

/// How this node takes part.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where its API listens, as the others should reach it.
    pub address: String,
    /// How long a silent node keeps its running tasks.
    pub lease: Duration,
    /// How often it checks that no signal was missed.
    pub check_every: Duration,
}

/// This node's state in the cluster.
#[derive(Debug, Default)]
pub(super) struct Membership {
    node: parking_lot::Mutex<Option<NodeInfo>>,
    /// The catalog stamp as of the last change this node heard of.
    stamp: std::sync::atomic::AtomicI64,
    /// How long a silent node keeps its tasks (ms).
    lease_ms: std::sync::atomic::AtomicI64,
    /// The nodes that have acknowledged each change this node signalled, by token.
    acks: parking_lot::Mutex<HashMap<String, HashSet<String>>>,
    acked: parking_lot::Condvar,
    /// Tokens of changes this node made whose signal it has not heard back yet: it took
    /// them in when it made them (a deploy keeps a sandbox warm, which its own signal must
    /// not drain).
    own: parking_lot::Mutex<std::collections::VecDeque<String>>,
}

/// Own tokens remembered at most (a signal lost on the way leaves one behind).
const OWN_KEPT: usize = 1024;

/// How long a change waits for the other nodes to take it in before its caller is answered
/// anyway (a node that does not ack in time is either dying, and will be reaped, or catches
/// up by its check).
const ACK_WAIT: Duration = Duration::from_secs(2);

/// What a changing caller wants the other nodes to do; [`Platform::tell`] adds the token.
pub(super) enum Change {
    Function(String),
    Secret { tenant: String, name: String },
}

impl Platform {
    /// Joins the cluster when the store is shared: a first heartbeat (before any claim, so
    /// no node takes this one for dead), then the heartbeat, reaper, listener and checker.
    pub async fn start_cluster(&self, config: NodeConfig) -> Result<()> {
        if self.inner.store.cluster().is_none() {
            return Ok(());
        }
        let store = self.inner.store.clone();
        let info = NodeInfo {
            id: store
                .cluster()
                .map(|c| c.node_id().to_string())
                .unwrap_or_default(),
            address: config.address.clone(),
            started_at: now_ms(),
            heartbeat_at: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        *self.inner.membership.node.lock() = Some(info.clone());
        self.inner.membership.lease_ms.store(
            i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
        let (stamp, signals) = blocking(move || -> crate::store::Result<_> {
            let c = store.cluster().expect("checked above");
            c.heartbeat(&info)?;
            Ok((c.catalog_stamp()?, c.listen()?))
        })
        .await??;
        self.inner.membership.stamp.store(stamp, Ordering::SeqCst);
        tracing::info!(node = %self.node_id().unwrap_or_default(), "joined the cluster");
        let this = self.clone();
        tokio::spawn(async move { this.hear(signals).await });
        let this = self.clone();
        tokio::spawn(async move { this.keep_membership(config).await });
        Ok(())
    }

    /// This node's id, when it is one of several.
    pub fn node_id(&self) -> Option<String> {
        self.inner.store.cluster().map(|c| c.node_id().to_string())
    }

    /// Where this node's API listens, once it is bound.
    pub fn set_node_address(&self, address: String) {
        if let Some(node) = self.inner.membership.node.lock().as_mut() {
            node.address = address;
        }
    }

    /// Tells every other node of `change` and waits (up to [`ACK_WAIT`]) until each live
    /// one has taken it in, so that the caller's next call, on any node, sees it. A failure
    /// is only logged: the others' checks find the change within seconds.
    pub(super) async fn tell(&self, change: Change) {
        if self.inner.store.cluster().is_none() {
            return;
        }
        let this = self.clone();
        let _ = blocking(move || this.tell_blocking(change)).await;
    }

    /// [`Platform::tell`], from a blocking thread.
    pub(super) fn tell_blocking(&self, change: Change) {
        let Some(c) = self.inner.store.cluster() else {
            return;
        };
        let me = c.node_id().to_string();
        let lease_ms = self.inner.membership.lease_ms.load(Ordering::SeqCst);
        let waiting_for: HashSet<String> = match c.nodes() {
            Ok(nodes) => nodes
                .into_iter()
                .filter(|n| n.id != me && now_ms() - n.heartbeat_at <= lease_ms)
                .map(|n| n.id)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "the other nodes could not be listed; not waiting for them");
                HashSet::new()
            }
        };
        let token = format!("{:016x}", rand::random::<u64>());
        let signal = match change {
            Change::Function(id) => Signal::Catalog {
                token: token.clone(),
                function: Some(id),
            },
            Change::Secret { tenant, name } => Signal::Secret {
                token: token.clone(),
                tenant,
                name,
            },
        };
        let m = &self.inner.membership;
        m.acks.lock().insert(token.clone(), HashSet::new());
        {
            let mut own = m.own.lock();
            if own.len() >= OWN_KEPT {
                own.pop_front();
            }
            own.push_back(token.clone());
        }
        if let Err(e) = c.signal(&signal) {
            m.acks.lock().remove(&token);
            tracing::warn!(error = %e, "the other nodes could not be signalled; they find the change by their checks");
            return;
        }
        let deadline = std::time::Instant::now() + ACK_WAIT;
        let mut acks = m.acks.lock();
        loop {
            let heard = acks.get(&token).cloned().unwrap_or_default();
            let missing: Vec<&String> = waiting_for.difference(&heard).collect();
            if missing.is_empty() {
                break;
            }
            if m.acked.wait_until(&mut acks, deadline).timed_out() {
                tracing::warn!(nodes = ?missing, "nodes did not acknowledge a change in time; they find it by their checks");
                break;
            }
        }
        acks.remove(&token);
    }

    /// Whether `token` is of a change this node made (forgetting it: it is heard once).
    fn own(&self, token: &str) -> bool {
        let mut own = self.inner.membership.own.lock();
        match own.iter().position(|t| t == token) {
            Some(i) => {
                own.remove(i);
                true
            }
            None => false,
        }
    }

    async fn hear(self, mut signals: tokio::sync::mpsc::UnboundedReceiver<Signal>) {
        while let Some(signal) = signals.recv().await {
            let token = match signal {
                Signal::Catalog { token, .. } | Signal::Secret { token, .. }
                    if self.own(&token) =>
                {
                    self.note_stamp().await;
                    continue;
                }
                Signal::Queued => {
                    self.inner.queued.notify_one();
                    continue;
                }
                Signal::Ack { token, node } => {
                    let m = &self.inner.membership;
                    if let Some(heard) = m.acks.lock().get_mut(&token) {
                        heard.insert(node);
                        m.acked.notify_all();
                    }
                    continue;
                }
                Signal::Catalog { token, function } => {
                    self.inner.catalog.invalidate();
                    if let Some(id) = function {
                        self.drain(&id).await;
                        self.prune_code_later(&id);
                    }
                    token
                }
                Signal::Secret {
                    token,
                    tenant,
                    name,
                } => {
                    if let Err(e) = self.drain_users_of(&tenant, &name).await {
                        tracing::warn!(error = %e, "the users of a changed secret could not be drained");
                    }
                    token
                }
            };
            self.note_stamp().await;
            let (store, node) = (self.inner.store.clone(), self.node_id().unwrap_or_default());
            let sent = blocking(move || {
                store
                    .cluster()
                    .map(|c| c.signal(&Signal::Ack { token, node }))
            })
            .await;
            if let Ok(Some(Err(e))) = sent {
                tracing::warn!(error = %e, "a change could not be acknowledged");
            }
        }
    }

    /// Remembers the catalog's stamp once a change has been taken in.
    async fn note_stamp(&self) {
        let store = self.inner.store.clone();
        if let Ok(Some(Ok(stamp))) =
            blocking(move || store.cluster().map(|c| c.catalog_stamp())).await
        {
            self.inner.membership.stamp.store(stamp, Ordering::SeqCst);
        }
    }

    /// Heartbeats, ends the tasks of silent nodes, and checks for missed changes, until
    /// the platform stops.
    async fn keep_membership(self, config: NodeConfig) {
        let beat = (config.lease / 5).max(Duration::from_millis(100));
        let mut last_reap = std::time::Instant::now();
        let mut last_check = std::time::Instant::now();
        loop {
            tokio::time::sleep(beat).await;
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let Some(info) = self.inner.membership.node.lock().clone() else {
                return;
            };
            let store = self.inner.store.clone();
            let beat_done = blocking(move || store.cluster().map(|c| c.heartbeat(&info))).await;
            if let Ok(Some(Err(e))) = beat_done {
                tracing::warn!(error = %e, "this node's heartbeat was not stored");
            }
            if last_reap.elapsed() >= config.lease / 2 {
                last_reap = std::time::Instant::now();
                self.reap(config.lease).await;
            }
            if last_check.elapsed() >= config.check_every {
                last_check = std::time::Instant::now();
                self.check_catalog().await;
            }
        }
    }

    /// Ends the running tasks of nodes silent for longer than `lease`.
    async fn reap(&self, lease: Duration) {
        let store = self.inner.store.clone();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let reaped = blocking(move || {
            let c = store.cluster()?;
            Some(c.reap(
                lease_ms,
                &|t| super::queue::retries_left(store.as_ref(), t),
                &super::queue::backoff_ms,
            ))
        })
        .await;
        match reaped {
            Ok(Some(Ok(report)))
                if !report.interrupted.is_empty() || !report.requeued.is_empty() =>
            {
                tracing::warn!(
                    interrupted = report.interrupted.len(),
                    requeued = report.requeued.len(),
                    "tasks of a node that stopped heartbeating were ended as interrupted or requeued"
                );
                self.inner.queued.notify_one();
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "the tasks of silent nodes could not be ended")
            }
            _ => {}
        }
    }

    /// A change no signal told of (a connection broke meanwhile): everything held is
    /// forgotten and every warm sandbox drained.
    async fn check_catalog(&self) {
        let store = self.inner.store.clone();
        let Ok(Some(Ok(stamp))) =
            blocking(move || store.cluster().map(|c| c.catalog_stamp())).await
        else {
            return;
        };
        if self.inner.membership.stamp.swap(stamp, Ordering::SeqCst) == stamp {
            return;
        }
        tracing::info!(
            "the catalog changed without a signal reaching this node; forgetting what it held"
        );
        self.inner.catalog.invalidate();
        let store = self.inner.store.clone();
        if let Ok(Ok(functions)) = blocking(move || store.functions(None)).await {
            for f in functions {
                self.drain(&f.id).await;
            }
        }
    }

    /// At a graceful stop: this node leaves, so that what it could not finish is ended by
    /// the others at once instead of after its lease.
    pub(super) async fn leave_cluster(&self) {
        let store = self.inner.store.clone();
        if let Ok(Some(Err(e))) = blocking(move || store.cluster().map(|c| c.leave())).await {
            tracing::warn!(error = %e, "this node's row could not be removed; the others wait out its lease");
        }
    }

    /// The cluster as health reports it: `None` for a node alone.
    pub(super) async fn cluster_health(&self) -> Option<Value> {
        let store = self.inner.store.clone();
        let nodes = blocking(move || store.cluster().map(|c| c.nodes()))
            .await
            .ok()??;
        let me = self.node_id()?;
        let lease_ms = self.inner.membership.lease_ms.load(Ordering::SeqCst);
        let now = now_ms();
        Some(match nodes {
            Ok(nodes) => json!({
                "node": me,
                "nodes": nodes.iter().map(|n| json!({
                    "id": n.id,
                    "address": n.address,
                    "started_at": n.started_at,
                    "heartbeat_at": n.heartbeat_at,
                    "alive": now - n.heartbeat_at <= lease_ms,
                    "version": n.version,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => json!({"node": me, "error": e.to_string()}),
        })
    }
}
