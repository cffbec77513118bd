//! Connections to the server: a bounded pool, each connection keeping the statements it has
//! prepared (a statement costs one round trip instead of two after its first use) and
//! pipelining what needs no answer in between: a transaction's `BEGIN` leaves with its first
//! statement, and [`Tx::pipeline`] and [`Tx::commit_after`] send several statements (and the
//! `COMMIT`) at once, one round trip for them all. Each connection is driven by a runtime of
//! its own while a call blocks on it, on the store's threads.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures_util::future::{join, Either};
use parking_lot::{Condvar, Mutex};
use postgres::types::ToSql;
use postgres::{NoTls, Row, Statement};
use tokio::runtime::Runtime;

use super::tls::Connector;

use crate::store::{Result, StoreError};

/// Query parameters.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A statement and the parameters it owns, made ahead to be sent in a pipeline.
pub(super) struct Queued<'a> {
    pub sql: String,
    pub params: Vec<Box<dyn ToSql + Sync + 'a>>,
}

/// What the server answered one request.
type Answer = std::result::Result<Vec<Row>, postgres::Error>;

/// A request, sent when the future is first polled; resolves to its answer.
type Request<'a, A = Answer> = Pin<Box<dyn Future<Output = A> + 'a>>;

/// One connection, the runtime that drives it, and the statements prepared on it.
pub(super) struct Conn {
    /// Taken when the connection is dropped (see `Drop`).
    client: Option<tokio_postgres::Client>,
    runtime: Runtime,
    /// The task reading and writing the socket; it ends once the client is dropped.
    driver: Option<tokio::task::JoinHandle<()>>,
    prepared: HashMap<String, Statement>,
}

/// Polls `requests` in order until all have resolved, then the one `tail` makes after
/// their first polls. The first poll of a request sends it (or fails it unsent, if its
/// parameters do not fit the statement), so they leave together and in order, and the
/// server answers them in that order; `tail` is told whether one failed unsent (a `COMMIT`
/// must not follow a transaction missing a statement).
async fn in_order<'c, T, E>(
    mut requests: Vec<Request<'c, std::result::Result<T, E>>>,
    tail: impl FnOnce(bool) -> Option<Request<'c, std::result::Result<T, E>>>,
) -> Vec<std::result::Result<T, E>> {
    let mut answers: Vec<Option<std::result::Result<T, E>>> =
        requests.iter().map(|_| None).collect();
    let mut tail = Some(tail);
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (request, answer) in requests.iter_mut().zip(answers.iter_mut()) {
            if answer.is_none() {
                match request.as_mut().poll(cx) {
                    Poll::Ready(a) => *answer = Some(a),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if let Some(make) = tail.take() {
            let unsent = answers.iter().any(|a| matches!(a, Some(Err(_))));
            if let Some(mut last) = make(unsent) {
                match last.as_mut().poll(cx) {
                    Poll::Ready(a) => answers.push(Some(a)),
                    Poll::Pending => {
                        waiting = true;
                        answers.push(None);
                    }
                }
                requests.push(last);
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    answers
        .into_iter()
        .map(|a| a.expect("every request answered"))
        .collect()
}

/// Reads and writes the connection's socket until the client is dropped or it breaks.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "a database connection ended");
    }
}

impl Conn {
    /// Connects to `config`'s server, through `tls` where it is given.
    fn open(config: &tokio_postgres::Config, tls: Option<&Connector>) -> Result<Conn> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Unavailable(format!("a runtime for a database connection: {e}"))
            })?;
        let (client, driver) = match tls {
            Some(tls) => {
                let (client, connection) = runtime.block_on(config.connect(tls.clone()))?;
                (client, runtime.spawn(drive(connection)))
            }
            None => {
                let (client, connection) = runtime.block_on(config.connect(NoTls))?;
                (client, runtime.spawn(drive(connection)))
            }
        };
        Ok(Conn {
            client: Some(client),
            runtime,
            driver: Some(driver),
            prepared: HashMap::new(),
        })
    }

    fn client(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("open until dropped")
    }

    /// `sql` prepared on this connection (once: later uses find it here).
    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.runtime.block_on(self.client().prepare(sql))?;
        self.prepared.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Sends `lead` (if any: statements without parameters, such as `BEGIN`) and the request
    /// `call` makes of the client, at once, and waits for both; the lead's error first.
    fn call<'c, T, F>(&'c self, lead: Option<&'c str>, call: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, postgres::Error>> + 'c,
    {
        let lead = match lead {
            Some(sql) => Either::Left(self.client().batch_execute(sql)),
            None => Either::Right(std::future::ready(Ok(()))),
        };
        let (lead, answer) = self.runtime.block_on(join(lead, call));
        lead?;
        Ok(answer?)
    }

    /// Sends `lead`, `steps` and, if `commit`, a `COMMIT` (a `ROLLBACK` should a step fail
    /// unsent) at once, and waits for every answer: the rows of each step, or the first
    /// error in the order sent.
    fn flight(
        &mut self,
        lead: Option<&str>,
        steps: &[Queued<'_>],
        commit: bool,
    ) -> Result<Vec<Vec<Row>>> {
        let statements = steps
            .iter()
            .map(|q| self.statement(&q.sql))
            .collect::<Result<Vec<_>>>()?;
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = steps
            .iter()
            .map(|q| {
                q.params
                    .iter()
                    .map(|p| &**p as &(dyn ToSql + Sync))
                    .collect()
            })
            .collect();
        let client = self.client();
        let simple = |sql: &str| -> Request<'_> {
            let sql = sql.to_string();
            Box::pin(async move { client.batch_execute(&sql).await.map(|()| Vec::new()) })
        };
        let mut requests: Vec<Request<'_>> = Vec::with_capacity(steps.len() + 2);
        requests.extend(lead.map(simple));
        for (params, statement) in params.iter().zip(&statements) {
            requests.push(Box::pin(client.query(statement, params)));
        }
        let tail =
            |unsent: bool| commit.then(|| simple(if unsent { "ROLLBACK" } else { "COMMIT" }));
        let mut answers = self.runtime.block_on(in_order(requests, tail)).into_iter();
        if lead.is_some() {
            answers.next().expect("the lead's answer")?;
        }
        let rows = answers
            .by_ref()
            .take(steps.len())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if let Some(tail) = answers.next() {
            tail?;
        }
        Ok(rows)
    }

    /// Runs `sql` after `lead`; returns how many rows it changed.
    fn execute_after(&mut self, lead: Option<&str>, sql: &str, p: Params<'_>) -> Result<u64> {
        let s = self.statement(sql)?;
        self.call(lead, self.client().execute(&s, p))
    }

    /// The rows of `sql`, after `lead`.
    fn query_after(&mut self, lead: Option<&str>, sql: &str, p: Params<'_>) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        self.call(lead, self.client().query(&s, p))
    }

    /// The row of `sql` if any (more than one is an error), after `lead`.
    fn query_opt_after(
        &mut self,
        lead: Option<&str>,
        sql: &str,
        p: Params<'_>,
    ) -> Result<Option<Row>> {
        let s = self.statement(sql)?;
        self.call(lead, self.client().query_opt(&s, p))
    }

    /// The one row of `sql`, after `lead`.
    fn query_one_after(&mut self, lead: Option<&str>, sql: &str, p: Params<'_>) -> Result<Row> {
        let s = self.statement(sql)?;
        self.call(lead, self.client().query_one(&s, p))
    }

    /// Statements sent as they are (no parameters, several allowed), after `lead`.
    fn batch_after(&mut self, lead: Option<&str>, sql: &str) -> Result<()> {
        self.call(lead, self.client().batch_execute(sql))
    }

    /// Runs `sql`; returns how many rows it changed.
    pub fn execute(&mut self, sql: &str, p: Params<'_>) -> Result<u64> {
        self.execute_after(None, sql, p)
    }

    /// The rows of `sql`.
    pub fn query(&mut self, sql: &str, p: Params<'_>) -> Result<Vec<Row>> {
        self.query_after(None, sql, p)
    }

    /// The row of `sql`, if any (more than one is an error).
    pub fn query_opt(&mut self, sql: &str, p: Params<'_>) -> Result<Option<Row>> {
        self.query_opt_after(None, sql, p)
    }

    /// The one row of `sql`.
    pub fn query_one(&mut self, sql: &str, p: Params<'_>) -> Result<Row> {
        self.query_one_after(None, sql, p)
    }

    /// Statements sent as they are (no parameters, several allowed).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        self.batch_after(None, sql)
    }

    /// A transaction on this connection; its `BEGIN` leaves with its first statement.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        Ok(Tx {
            conn: self,
            begun: false,
            open: true,
        })
    }

    fn is_closed(&self) -> bool {
        self.client().is_closed()
    }

    /// Whether the connection is still open, once the driver has read what came while it
    /// was idle (an end of the socket, for one): a turn of its runtime, no round trip.
    fn alive(&mut self) -> bool {
        self.runtime.block_on(async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        });
        !self.is_closed()
    }
}

impl Drop for Conn {
    /// Says goodbye to the server (the driver sends `Terminate` once the client is gone),
    /// except on an async worker thread, where nothing may block: there the socket is just
    /// closed.
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(driver) = self.driver.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = self
                    .runtime
                    .block_on(async { tokio::time::timeout(Duration::from_secs(1), driver).await });
            }
        }
    }
}

/// A transaction: committed by [`Tx::commit`] or [`Tx::commit_after`], rolled back if
/// dropped.
pub(super) struct Tx<'a> {
    conn: &'a mut Conn,
    /// `BEGIN` was sent.
    begun: bool,
    /// Neither committed nor rolled back.
    open: bool,
}

impl Tx<'_> {
    /// `BEGIN` if it was not sent yet: it leaves with the next statement.
    fn lead(&mut self) -> Option<&'static str> {
        (!std::mem::replace(&mut self.begun, true)).then_some("BEGIN")
    }

    /// Runs `sql`; returns how many rows it changed.
    pub fn execute(&mut self, sql: &str, p: Params<'_>) -> Result<u64> {
        let lead = self.lead();
        self.conn.execute_after(lead, sql, p)
    }

    /// The rows of `sql`.
    pub fn query(&mut self, sql: &str, p: Params<'_>) -> Result<Vec<Row>> {
        let lead = self.lead();
        self.conn.query_after(lead, sql, p)
    }

    /// The row of `sql`, if any (more than one is an error).
    pub fn query_opt(&mut self, sql: &str, p: Params<'_>) -> Result<Option<Row>> {
        let lead = self.lead();
        self.conn.query_opt_after(lead, sql, p)
    }

    /// The one row of `sql`.
    pub fn query_one(&mut self, sql: &str, p: Params<'_>) -> Result<Row> {
        let lead = self.lead();
        self.conn.query_one_after(lead, sql, p)
    }

    /// Statements sent as they are.
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        let lead = self.lead();
        self.conn.batch_after(lead, sql)
    }

    /// Runs `steps` at once, in order: the rows of each, or the first error (which aborts
    /// the transaction: the steps after it change nothing, and nothing is committed).
    pub fn pipeline(&mut self, steps: &[Queued<'_>]) -> Result<Vec<Vec<Row>>> {
        let lead = self.lead();
        self.conn.flight(lead, steps, false)
    }

    /// Runs `steps` and commits, at once: the rows of each step, or the first error (the
    /// transaction is then rolled back: nothing of it is stored).
    pub fn commit_after(mut self, steps: &[Queued<'_>]) -> Result<Vec<Vec<Row>>> {
        let lead = self.lead();
        // A step that fails aborts the transaction, and the server takes the COMMIT sent
        // behind it as a ROLLBACK: nothing is left to roll back.
        self.open = false;
        self.conn.flight(lead, steps, true)
    }

    pub fn commit(mut self) -> Result<()> {
        self.open = false;
        if self.begun {
            self.conn.batch("COMMIT")?;
        }
        Ok(())
    }
}

impl Drop for Tx<'_> {
    /// Rolls back what was sent and not committed.
    fn drop(&mut self) {
        if self.open && self.begun && !self.conn.is_closed() {
            if let Err(e) = self.conn.batch("ROLLBACK") {
                tracing::debug!(error = %e, "rolling back a transaction");
            }
        }
    }
}

/// A bounded pool of connections to one database.
pub(super) struct Pool {
    config: tokio_postgres::Config,
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
    pub fn new(config: tokio_postgres::Config, tls: Option<Connector>, max: usize) -> Pool {
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

    /// A new connection.
    fn connect(&self) -> Result<Conn> {
        Conn::open(&self.config, self.tls.as_ref())
    }

    /// A connection of its own, outside the pool, whose notifications are read as they come
    /// (for listening).
    pub fn listener(&self) -> Result<postgres::Client> {
        let config = postgres::Config::from(self.config.clone());
        Ok(match &self.tls {
            Some(tls) => config.connect(tls.clone())?,
            None => config.connect(NoTls)?,
        })
    }

    /// An idle connection, or a new one while fewer than `max` are open; waits for one to be
    /// given back otherwise.
    pub fn get(&self) -> Result<Lent<'_>> {
        let mut idle = self.idle.lock();
        loop {
            if let Some(mut conn) = idle.conns.pop() {
                drop(idle);
                if conn.alive() {
                    return Ok(Lent {
                        pool: self,
                        conn: Some(conn),
                    });
                }
                // Closed while idle (the server restarted, something between dropped it):
                // closed here instead of failing its next call.
                drop(conn);
                idle = self.idle.lock();
                idle.open -= 1;
                continue;
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
        if conn.is_closed() {
            idle.open -= 1;
        } else {
            idle.conns.push(conn);
        }
        drop(idle);
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A request that notes when it is sent (its first poll) in `sent`, then answers `Ok(n)`
    /// at its next poll; or, `unsent`, fails at its first poll without being sent.
    fn request<'a>(
        n: u32,
        sent: &'a RefCell<Vec<u32>>,
        unsent: bool,
    ) -> Request<'a, std::result::Result<u32, u32>> {
        let mut polled = false;
        Box::pin(std::future::poll_fn(move |cx| {
            if unsent {
                return Poll::Ready(Err(n));
            }
            if polled {
                return Poll::Ready(Ok(n));
            }
            polled = true;
            sent.borrow_mut().push(n);
            cx.waker().wake_by_ref();
            Poll::Pending
        }))
    }

    #[tokio::test]
    async fn requests_leave_in_order_before_the_tail_and_all_are_answered() {
        let sent = RefCell::new(Vec::new());
        let told = RefCell::new(None);
        let answers = in_order(
            vec![request(1, &sent, false), request(2, &sent, false)],
            |unsent| {
                *told.borrow_mut() = Some(unsent);
                Some(request(9, &sent, false))
            },
        )
        .await;
        assert_eq!(*sent.borrow(), [1, 2, 9], "sent in order, the tail last");
        assert_eq!(*told.borrow(), Some(false));
        assert_eq!(answers, [Ok(1), Ok(2), Ok(9)]);
    }

    #[tokio::test]
    async fn the_tail_hears_of_a_request_that_failed_unsent() {
        let sent = RefCell::new(Vec::new());
        let told = RefCell::new(None);
        let answers = in_order(
            vec![
                request(1, &sent, false),
                request(2, &sent, true),
                request(3, &sent, false),
            ],
            |unsent| {
                *told.borrow_mut() = Some(unsent);
                None
            },
        )
        .await;
        assert_eq!(
            *told.borrow(),
            Some(true),
            "a COMMIT would become a ROLLBACK"
        );
        assert_eq!(*sent.borrow(), [1, 3]);
        assert_eq!(answers, [Ok(1), Err(2), Ok(3)]);
    }
}
