//! Connections to the server: a bounded pool, each connection keeping the statements it has
//! prepared, so a statement costs one round trip instead of two after its first use.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement};

use super::tls::Connector;

use crate::store::{Result, StoreError};

/// Query parameters.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One connection and its prepared statements.
pub(super) struct Conn {
    client: Client,
    prepared: Prepared,
}

/// Statements prepared on one connection, by their text.
#[derive(Default)]
struct Prepared(HashMap<String, Statement>);

impl Prepared {
    fn get(&mut self, client: &mut impl GenericClient, sql: &str) -> Result<Statement> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(sql)?;
        self.0.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

/// The four ways a statement is run, with its prepared form, on a client or a transaction.
macro_rules! runs {
    ($client:ident) => {
        /// Runs `sql`; returns how many rows it changed.
        pub fn execute(&mut self, sql: &str, p: Params<'_>) -> Result<u64> {
            let s = self.prepared.get(&mut self.$client, sql)?;
            Ok(self.$client.execute(&s, p)?)
        }

        /// The rows of `sql`.
        pub fn query(&mut self, sql: &str, p: Params<'_>) -> Result<Vec<Row>> {
            let s = self.prepared.get(&mut self.$client, sql)?;
            Ok(self.$client.query(&s, p)?)
        }

        /// The row of `sql`, if any (more than one is an error).
        pub fn query_opt(&mut self, sql: &str, p: Params<'_>) -> Result<Option<Row>> {
            let s = self.prepared.get(&mut self.$client, sql)?;
            Ok(self.$client.query_opt(&s, p)?)
        }

        /// The one row of `sql`.
        pub fn query_one(&mut self, sql: &str, p: Params<'_>) -> Result<Row> {
            let s = self.prepared.get(&mut self.$client, sql)?;
            Ok(self.$client.query_one(&s, p)?)
        }
    };
}

impl Conn {
    runs!(client);

    /// Statements sent as they are (no parameters, several allowed).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.client.batch_execute(sql)?)
    }

    /// The client, for its notifications.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// A transaction on this connection.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        Ok(Tx {
            tx: self.client.transaction()?,
            prepared: &mut self.prepared,
        })
    }
}

/// A transaction: committed by [`Tx::commit`], rolled back if dropped.
pub(super) struct Tx<'a> {
    tx: postgres::Transaction<'a>,
    prepared: &'a mut Prepared,
}

impl Tx<'_> {
    runs!(tx);

    /// Statements sent as they are.
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.tx.batch_execute(sql)?)
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }
}

/// A bounded pool of connections to one database.
pub(super) struct Pool {
    config: postgres::Config,
    /// TLS for every connection, where the address asks for it.
    tls: Option<Connector>,
    idle: Mutex<Idle>,
    freed: Condvar,
    max: usize,
}

struct Idle {
    conns: Vec<Conn>,
    /// Connections open now, idle or lent.
    open: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("max", &self.max).finish()
    }
}

/// How long a caller waits for a connection when all `max` are lent.
const WAIT: Duration = Duration::from_secs(10);

impl Pool {
    /// Up to `max` connections to `config`'s server, through `tls` where it is given.
    pub fn new(config: postgres::Config, tls: Option<Connector>, max: usize) -> Pool {
        Pool {
            config,
            tls,
            idle: Mutex::new(Idle {
                conns: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    /// A new connection, outside the pool (for listening).
    pub fn connect(&self) -> Result<Conn> {
        Ok(Conn {
            client: match &self.tls {
                Some(tls) => self.config.connect(tls.clone())?,
                None => self.config.connect(NoTls)?,
            },
            prepared: Prepared::default(),
        })
    }

    /// An idle connection, or a new one while fewer than `max` are open; waits for one to be
    /// given back otherwise.
    pub fn get(&self) -> Result<Lent<'_>> {
        let mut idle = self.idle.lock();
        loop {
            if let Some(conn) = idle.conns.pop() {
                return Ok(Lent {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if idle.open < self.max {
                idle.open += 1;
                drop(idle);
                return match self.connect() {
                    Ok(conn) => Ok(Lent {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.idle.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            if self.freed.wait_for(&mut idle, WAIT).timed_out() {
                return Err(StoreError::Transient(
                    format!(
                        "all {} connections to PostgreSQL stayed in use for {WAIT:?}",
                        self.max
                    )
                    .into(),
                ));
            }
        }
    }
}

impl Drop for Pool {
    /// Closing a connection blocks on its own runtime, which panics on an async worker
    /// thread (where a store is dropped on an error path of the server's start): there, the
    /// idle connections are closed on a thread of their own.
    fn drop(&mut self) {
        let conns = std::mem::take(&mut self.idle.get_mut().conns);
        if !conns.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::Builder::new()
                .name("cloudfunc-pg-close".into())
                .spawn(move || drop(conns));
        }
    }
}

/// A connection lent by the pool, given back when dropped (closed instead if it broke).
pub(super) struct Lent<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl std::ops::Deref for Lent<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let mut idle = self.pool.idle.lock();
        if conn.client.is_closed() {
            idle.open -= 1;
        } else {
            idle.conns.push(conn);
        }
        drop(idle);
        self.pool.freed.notify_one();
    }
}
