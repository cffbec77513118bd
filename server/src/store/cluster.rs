//! What several nodes sharing one store ask of it ([`crate::cluster`]): each node's row and
//! heartbeat, the running tasks of nodes that stopped heartbeating, and messages between the
//! nodes (a change to the catalog, a task queued). Only a store that several processes can
//! share implements it; on SQLite a node is alone.

use super::{Recovery, Result};
use crate::model::Task;

/// A node as the others see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// Stable across its restarts (`--node-id`).
    pub id: String,
    /// Where its API listens, as given to it.
    pub address: String,
    /// When this run of it started (Unix ms).
    pub started_at: i64,
    /// Its last heartbeat (Unix ms).
    pub heartbeat_at: i64,
    /// Its cloudfunc version.
    pub version: String,
}

/// A message from one node to the others. A change carries a token, which each node that
/// has taken the change in sends back in an [`Signal::Ack`]: the node that made the change
/// replies to its caller once every live node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A function (or, with no id, anything) changed: forget what is held of it and drain
    /// its warm sandboxes.
    Catalog {
        token: String,
        function: Option<String>,
    },
    /// A tenant's secret was set or deleted: the functions naming it are drained.
    Secret {
        token: String,
        tenant: String,
        name: String,
    },
    /// `node` has taken in the change of `token`.
    Ack { token: String, node: String },
    /// Tasks were queued: an idle worker may claim them.
    Queued,
}

/// Between a secret's tenant and its name (a tenant may hold any other character).
const UNIT: char = '\u{1f}';

impl Signal {
    /// As sent: `catalog:<token>:<id>`, `secret:<token>:<tenant>\x1f<name>`,
    /// `ack:<token>:<node>` or `queued` (tokens hold no `:`).
    pub fn encode(&self) -> String {
        match self {
            Signal::Catalog { token, function } => {
                format!("catalog:{token}:{}", function.as_deref().unwrap_or(""))
            }
            Signal::Secret {
                token,
                tenant,
                name,
            } => format!("secret:{token}:{tenant}{UNIT}{name}"),
            Signal::Ack { token, node } => format!("ack:{token}:{node}"),
            Signal::Queued => "queued".into(),
        }
    }

    pub fn decode(text: &str) -> Option<Signal> {
        if text == "queued" {
            return Some(Signal::Queued);
        }
        let (kind, rest) = text.split_once(':')?;
        let (token, rest) = rest.split_once(':')?;
        let token = token.to_string();
        match kind {
            "catalog" => Some(Signal::Catalog {
                token,
                function: (!rest.is_empty()).then(|| rest.to_string()),
            }),
            "secret" => rest.split_once(UNIT).map(|(t, n)| Signal::Secret {
                token,
                tenant: t.to_string(),
                name: n.to_string(),
            }),
            "ack" => Some(Signal::Ack {
                token,
                node: rest.to_string(),
            }),
            _ => None,
        }
    }
}

/// A store that several nodes share.
pub trait ClusterStore: Send + Sync {
    /// This node's id, which its claims carry.
    fn node_id(&self) -> &str;
    /// Stores this node's row with a fresh heartbeat.
    fn heartbeat(&self, node: &NodeInfo) -> Result<()>;
    /// Every node, by id.
    fn nodes(&self) -> Result<Vec<NodeInfo>>;
    /// At a graceful stop: this node's row goes (its tasks were finished or left to the
    /// next start).
    fn leave(&self) -> Result<()>;
    /// Ends the running tasks of other nodes whose last heartbeat is older than `lease_ms`,
    /// as a restart ends a node's own: requeued where `retries_left` says so, else failed
    /// `interrupted`. A node silent for a day is no longer listed.
    fn reap(
        &self,
        lease_ms: i64,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery>;
    /// What the catalog was made of, as a number that changes with it: checked now and
    /// then, so that a signal lost on the way leaves nothing stale for long.
    fn catalog_stamp(&self) -> Result<i64>;
    /// Sends `signal` to every node listening (this one too).
    fn signal(&self, signal: &Signal) -> Result<()>;
    /// The signals from now on, until the store is dropped; a broken connection is made
    /// again (the signals meanwhile are lost: the stamp covers them).
    fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Signal>>;
}

#[cfg(test)]
mod tests {
    use super::Signal;

    #[test]
    fn signals_read_back_as_sent() {
        for s in [
            Signal::Catalog {
                token: "t1".into(),
                function: None,
            },
            Signal::Catalog {
                token: "t2".into(),
                function: Some("fn_1".into()),
            },
            Signal::Secret {
                token: "t3".into(),
                tenant: "a:b/c".into(),
                name: "TOKEN".into(),
            },
            Signal::Ack {
                token: "t4".into(),
                node: "host:8080".into(),
            },
            Signal::Queued,
        ] {
            assert_eq!(Signal::decode(&s.encode()), Some(s));
        }
        assert_eq!(Signal::decode("nonsense"), None);
    }
}
