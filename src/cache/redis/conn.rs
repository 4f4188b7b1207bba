//! The connection (one server or a cluster) and every call through it: bounded in time, a
//! failure answered as `CacheError::Unavailable`.

use std::future::Future;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, Value};

use super::CacheError;

use super::*;

/// One Redis server or a cluster, behind the same command interface.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// One server: a script may touch any key. In a cluster a script touches one slot only.
    pub(super) fn is_single(&self) -> bool {
        matches!(self, Conn::Single(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

pub(super) fn unavailable(error: impl std::fmt::Display) -> CacheError {
    CacheError::Unavailable(format!("redis: {error}"))
}

/// A failed call, and whether Redis may have run it all the same.
pub(super) struct Failed {
    pub(super) error: CacheError,
    pub(super) maybe_ran: bool,
}

/// Runs one Redis call, mapping its failure and a hang past [`CALL_TIMEOUT`] to `Unavailable`.
pub(super) async fn attempt<T>(call: impl Future<Output = RedisResult<T>>) -> Result<T, Failed> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failed {
            // A refused connection sent nothing; any other failure may come after the server
            // ran the command (a timeout, a connection dropped before the answer).
            maybe_ran: !error.is_connection_refusal(),
            error: unavailable(error),
        }),
        Err(_) => Err(Failed {
            maybe_ran: true,
            error: unavailable(format_args!(
                "no answer within {} ms",
                CALL_TIMEOUT.as_millis()
            )),
        }),
    }
}

pub(super) async fn timed<T>(call: impl Future<Output = RedisResult<T>>) -> Result<T, CacheError> {
    attempt(call).await.map_err(|failed| failed.error)
}

pub(super) async fn eval_attempt<T: FromRedisValue>(
    conn: &Conn,
    script: &Script,
    keys: &[&str],
    args: &[&str],
) -> Result<T, Failed> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    for arg in args {
        invocation.arg(*arg);
    }
    let mut conn = conn.clone();
    attempt(invocation.invoke_async(&mut conn)).await
}

pub(super) async fn eval<T: FromRedisValue>(
    conn: &Conn,
    script: &Script,
    keys: &[&str],
    args: &[&str],
) -> Result<T, CacheError> {
    eval_attempt(conn, script, keys, args)
        .await
        .map_err(|failed| failed.error)
}

pub(super) async fn query<T: FromRedisValue>(conn: &Conn, cmd: &Cmd) -> Result<T, CacheError> {
    let mut conn = conn.clone();
    timed(cmd.query_async(&mut conn)).await
}

pub(super) fn command(name: &str) -> Cmd {
    ::redis::cmd(name)
}

pub(super) async fn connect_cluster(nodes: &str) -> Result<ClusterConnection, CacheError> {
    // `user:pass@` on the first node applies to every node.
    let (auth, hosts) = match nodes.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), nodes),
    };
    let urls: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| format!("redis://{auth}{host}"))
        .collect();
    if urls.is_empty() {
        return Err(unavailable(format_args!(
            "{CLUSTER_SCHEME} needs at least one host:port"
        )));
    }
    let client = ClusterClientBuilder::new(urls)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(2)
        .build()
        .map_err(unavailable)?;
    timed(client.get_async_connection()).await
}
