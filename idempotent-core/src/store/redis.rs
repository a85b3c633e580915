//! A Redis store (feature `redis`), on the `redis` crate. It needs Redis
//! 7.0 or later (or Valkey).
//!
//! Each record is one Redis string under its own key,
//! `<prefix><hex SHA-256 of scope and key>`, and every operation is one
//! round trip that touches only that key, atomic on the server, and
//! unchanged on Redis Cluster (pass a cluster connection to
//! [`RedisStore::builder`]). A claim is a plain `SET NX GET`, which sets a
//! free key or returns the record that holds it; only taking over a lapsed
//! lease needs a second round trip. Completing, renewing and releasing are
//! Lua scripts, since each must first check that the caller still holds
//! the lease.
//!
//! # Encoding
//!
//! A completed record is [`Completed::encode`]'s compact binary layout. An
//! in-flight record shares its first 41 bytes' shape, so the scripts find
//! the deadline at the same offset in both:
//!
//! | bytes  | completed                    | in flight              |
//! |--------|------------------------------|------------------------|
//! | 0      | codec version (`1`)          | `0x80`                 |
//! | 1..33  | fingerprint                  | fingerprint            |
//! | 33..41 | expires at (Unix ms, BE)     | lease deadline (Unix ms, BE) |
//! | 41..   | status, headers, body        | lease token (16 bytes) |
//!
//! # Time
//!
//! Deadlines are checked inside the scripts against a `now` the store reads
//! from its [`Clock`], never against the server's clock. Redis expiry
//! (`PX`) only bounds memory: it is set a minute past the deadline, so
//! application servers and Redis may disagree by up to a minute without a
//! record vanishing early. Application servers must agree with each other
//! more closely: one whose clock runs ahead of a claim's holder by two
//! thirds of its lease (less when renewals come late) takes the running
//! claim over. [`RedisStore::connect`] warns when this host's clock is
//! seconds off the server's, and so does a claim that takes over a lapsed
//! lease, by the store's clock then.
//!
//! # Memory
//!
//! Redis must not evict these keys: use `maxmemory-policy noeviction` (the
//! default) or a Redis that never fills up. Under an evicting policy a full
//! Redis drops keys, in-flight claims among them (`volatile-ttl` drops them
//! first, since theirs is the nearest expiry), and a retry then runs the
//! handler beside the request still running. Under `noeviction` a full
//! Redis refuses writes instead, as in an outage: new claims get 503. The
//! requests already running still renew their leases and store their
//! responses: the fenced scripts are flagged `allow-oom`, since a response
//! refused there would leave its request to run again once memory frees.
//! [`RedisStore::connect`] logs a warning when the server has a memory
//! limit and an evicting policy, and so does a completion or renewal that
//! finds its claim gone, if the policy was changed since.
//!
//! # Persistence
//!
//! Records must outlive a Redis restart: use `appendonly yes`. A Redis
//! that keeps nothing on disk forgets every claim and record when it
//! restarts; retries of requests that ran then run again, and so do those
//! of requests still running, beside them. Snapshots alone (`save`) lose
//! what changed since the last one. [`RedisStore::connect`] logs a warning
//! when the server keeps nothing on disk, and a completion that finds its
//! claim gone (rather than held by another request) logs one with the key.
//!
//! # Failover
//!
//! Redis keeps the connections to a primary it demotes to a replica open,
//! and refuses each of their writes (`READONLY`). The first write a
//! replica refuses has a store on a `ConnectionManager` close its
//! connection and send the write once more on a new one, which an
//! address that follows the primary (a DNS name, a virtual IP, a proxy)
//! leads to the new primary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ServerErrorKind};
use tokio_util::task::TaskTracker;

use super::{EXPIRY_GRACE, Explained, Store, StoreError};
use crate::clock::{Clock, SharedClock, SystemClock, millis};
use crate::digest::push_hex;
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse};

/// The key prefix when none is configured.
const DEFAULT_PREFIX: &str = "idempotent:";
/// First byte of an in-flight value; never a codec version.
const IN_FLIGHT_TAG: u8 = 0x80;
const IN_FLIGHT_LEN: usize = 1 + 32 + 8 + 16;
/// The largest argument Redis accepts by default (`proto-max-bulk-len`),
/// and the largest value the store sends.
const MAX_VALUE_BYTES: usize = 512 * 1024 * 1024;
/// The longest deadline Redis's expiry is computed for: a century, the
/// longest lease or TTL an endpoint takes. Redis rejects expiries that
/// overflow its clock; a century and [`EXPIRY_GRACE`] is far within it.
const MAX_PX: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Shared Lua helpers. Offsets are 1-based: the deadline is bytes 34..=41,
/// an in-flight token bytes 42..=57. A value too short to hold a deadline
/// (corrupt) reads as expired, as `Completed::encoded_expires_at` reads it,
/// so that it is taken over rather than failing every claim of its key.
const LUA_PRELUDE: &str = r"
local function millis(value, from)
    local ms = 0
    for i = from, from + 7 do ms = ms * 256 + string.byte(value, i) end
    return ms
end
local function deadline(value)
    if #value < 41 then return 0 end
    return millis(value, 34)
end
local function holds(value, token)
    return value and string.byte(value, 1) == 128 and string.sub(value, 42, 57) == token
end
";

/// The first line of a fenced script (renew, complete, release): Redis
/// runs it even at its `maxmemory` under `noeviction`, where it refuses a
/// plain script's first write. A full Redis would otherwise refuse to
/// store the response of a request that already ran, or to renew its
/// lease, and a retry once records expired and memory freed would run it
/// a second time. Claims take no flag: a full Redis refuses them, so
/// nothing new starts (503).
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// ARGV: now, in-flight value, PX. Returns the live record, or nil after
/// claiming.
static CLAIM: LazyLock<StoreScript> = LazyLock::new(|| {
    lua(r"
local held = redis.call('GET', KEYS[1])
if held and deadline(held) > tonumber(ARGV[1]) then return held end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return false
")
});

/// ARGV: token, new deadline (8 bytes), PX. Returns [`HELD`] if held. A
/// renewal that arrives after a later one (sent first, held up on the way)
/// leaves the later deadline. Either way Redis keeps the key for at least PX
/// more: a deadline that does not move (the application's clock stepped
/// back) must not leave the key to Redis's expiry while its holder runs.
static RENEW: LazyLock<StoreScript> = LazyLock::new(|| {
    fenced_script(
        r"
local held = redis.call('GET', KEYS[1])
if not held then return -1 end
if not holds(held, ARGV[1]) then return 0 end
if millis(ARGV[2], 1) <= deadline(held) then
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
    end
    return 1
end
redis.call('SET', KEYS[1], string.sub(held, 1, 33) .. ARGV[2] .. string.sub(held, 42), 'PX', ARGV[3])
return 1
",
    )
});

/// ARGV: token, encoded completed record (fingerprint left blank), PX. The
/// holder's fingerprint is spliced in from the in-flight value. Returns
/// [`HELD`] if held.
static COMPLETE: LazyLock<StoreScript> = LazyLock::new(|| {
    fenced_script(
        r"
local held = redis.call('GET', KEYS[1])
if not held then return -1 end
if not holds(held, ARGV[1]) then return 0 end
local record = string.sub(ARGV[2], 1, 1) .. string.sub(held, 2, 33) .. string.sub(ARGV[2], 34)
redis.call('SET', KEYS[1], record, 'PX', ARGV[3])
return 1
",
    )
});

/// ARGV: token. Returns [`HELD`] if held.
static RELEASE: LazyLock<StoreScript> = LazyLock::new(|| fenced_script(RELEASE_BODY));
const RELEASE_BODY: &str = r"
local held = redis.call('GET', KEYS[1])
if not held then return -1 end
if not holds(held, ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// What a fenced script (renew, complete, release) answers when the
/// caller's token holds the key; `0` when another value holds it (another
/// request's claim or record), [`GONE`] when nothing does.
const HELD: i64 = 1;
/// What a fenced script answers when the key holds nothing at all.
const GONE: i64 = -1;

/// A script of `body`, refused by a full Redis.
fn lua(body: &str) -> StoreScript {
    StoreScript::new(format!("{LUA_PRELUDE}{body}"))
}

/// A fenced script of `body`, which a full Redis runs ([`ALLOW_OOM`]).
fn fenced_script(body: &str) -> StoreScript {
    StoreScript::new(format!("{ALLOW_OOM}{LUA_PRELUDE}{body}"))
}

/// One of the store's Lua scripts, run on one key: by its hash
/// (`EVALSHA`), and by its text (`EVAL`, which also caches it) when Redis
/// does not have it, after a restart, a failover or a `SCRIPT FLUSH`. The
/// `redis` crate's own fallback loads the script and runs it by its hash
/// again, which a flush between the two fails once more.
struct StoreScript {
    hashed: Script,
    source: String,
}

impl StoreScript {
    fn new(source: String) -> Self {
        Self {
            hashed: Script::new(&source),
            source,
        }
    }

    /// Runs the script on `redis_key` with `args` (`ARGV`).
    async fn run<T: redis::FromRedisValue>(
        &self,
        connection: &mut impl ConnectionLike,
        redis_key: &str,
        args: &[&[u8]],
    ) -> redis::RedisResult<T> {
        let by_hash = on_key("EVALSHA", self.hashed.get_hash(), redis_key, args);
        match by_hash.query_async(connection).await {
            Err(error) if error.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                let by_text = on_key("EVAL", &self.source, redis_key, args);
                by_text.query_async(connection).await
            }
            answer => answer,
        }
    }
}

/// `EVAL` or `EVALSHA` (`command`) of `script` on the one key `redis_key`.
fn on_key(command: &str, script: &str, redis_key: &str, args: &[&[u8]]) -> redis::Cmd {
    let mut command = redis::cmd(command);
    command.arg(script).arg(1).arg(redis_key);
    for arg in args {
        command.arg(*arg);
    }
    command
}

/// A [`Store`] on Redis. `C` is the connection: a [`ConnectionManager`]
/// (which reconnects by itself) by default, or any async connection such as
/// a Redis Cluster connection.
///
/// ```no_run
/// use idempotent_core::{Idempotency, store::RedisStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let idempotency = Idempotency::new(store);
/// # let _ = idempotency;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    connection: C,
    clock: SharedClock,
    prefix: Arc<str>,
    /// Releases of claims whose answer nobody read, and checks of the
    /// eviction policy, for [`Store::settle`].
    background: TaskTracker,
    /// How many times the store reconnected after a replica refused a
    /// write (see [`RedisStore::reconnect_after_read_only`]).
    read_only_reconnects: Arc<AtomicU64>,
    /// Held while the store reconnects after a replica refused a write.
    reconnecting: Arc<tokio::sync::Mutex<()>>,
    /// The background check of the eviction policy, one at a time.
    checking_eviction: OneAtATime,
    /// The background check of the clocks, one at a time.
    checking_clock: OneAtATime,
    /// The largest value Redis takes (see [`bulk_limit`]).
    max_value_bytes: usize,
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`] on an existing connection.
#[must_use]
pub struct RedisStoreBuilder<C> {
    connection: C,
    clock: SharedClock,
    prefix: String,
}

impl<C> std::fmt::Debug for RedisStoreBuilder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<C> RedisStoreBuilder<C> {
    /// Prepended to every key (default `idempotent:`). On Redis Cluster,
    /// keep `{` and `}` out of it, or every record hashes to one slot.
    /// Applications sharing a Redis need prefixes of their own: on one
    /// prefix they share every key of a scope, so a key one of them used
    /// answers the other's request with 422 (another endpoint's
    /// fingerprint), or with the first one's response for the same
    /// endpoint and payload (a staging and a production deployment).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The clock that decides leases and expiry (default: the system
    /// clock). Every instance sharing a Redis should use the same time:
    /// each reads deadlines by its own clock, never Redis's, so an
    /// instance whose clock is ahead of the one holding a running claim
    /// by two thirds of its lease (the margin a renewal on time leaves:
    /// 40 s of the default 60 s; less when renewals come late) sees the
    /// lease lapsed, takes the claim over, and runs the request a second
    /// time. Records also expire that much sooner on it.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> RedisStore<C> {
        RedisStore {
            connection: self.connection,
            clock: self.clock,
            prefix: self.prefix.into(),
            background: TaskTracker::new(),
            read_only_reconnects: Arc::new(AtomicU64::new(0)),
            reconnecting: Arc::new(tokio::sync::Mutex::new(())),
            checking_eviction: OneAtATime::default(),
            checking_clock: OneAtATime::default(),
            max_value_bytes: MAX_VALUE_BYTES,
        }
    }
}

impl RedisStore {
    /// Connects a [`ConnectionManager`] to `url`.
    ///
    /// The manager reconnects in the background after the server goes
    /// away; until it is back, operations fail (and requests get 503)
    /// instead of waiting. A single attempt to connect or answer is cut
    /// after one second. A warning is logged if the server may evict the
    /// store's keys: a full Redis that evicts may drop an in-flight claim,
    /// and a retry of its request then runs beside it. Another if it keeps
    /// nothing on disk: a restart forgets every record. Another if this
    /// host's clock is more than two seconds off the server's: instances
    /// read leases by their own clocks, and one far enough ahead of
    /// another takes over its running requests. It reads the server's
    /// `proto-max-bulk-len` and `client-query-buffer-limit`: a response
    /// whose record would be longer than either takes is stored without
    /// its body, as one past `max_body_bytes` is, since Redis would refuse
    /// it and close the connection.
    ///
    /// # Errors
    /// The URL is invalid (or asks for TLS, which the `redis` crate was
    /// built without), the server cannot be reached now or refuses the
    /// connection (a password missing or wrong, a database index out of
    /// range), or it cannot hold the store's records: a node of a cluster
    /// (build the store on a cluster connection with
    /// [`RedisStore::builder`]), a Sentinel. The error names the server and
    /// what to change. A server that gives a version older than Redis 7.0
    /// is warned of; its claims fail, saying so. So is a replica; its
    /// claims fail as an outage, which ends once the store's address leads
    /// to a primary.
    ///
    /// It also refuses a server that will not run the store's Lua scripts,
    /// which every completion, renewal and release is: a user whose ACL
    /// allows `SET` and `GET` but not the scripting commands, or a server
    /// without Lua scripting, would take claims and then store no response,
    /// so a retry after the lease lapsed ran the handler again. `connect`
    /// runs `EVAL` and `EVALSHA` once on an empty script, and refuses only
    /// on a clear answer: `NOPERM`, or an unknown command. Any other
    /// answer is left to the first operation, which names it. It then
    /// loads the scripts (`SCRIPT LOAD`), which spares the first `EVALSHA`
    /// of each its `NOSCRIPT` round trip; a server that refuses that (an
    /// ACL without `script|load`, a proxy, the command renamed) is not
    /// refused: whenever Redis lacks a script (then, or after a restart, a
    /// failover or a `SCRIPT FLUSH`), the store sends its text with `EVAL`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(url_error)?;
        let server = server_address(client.get_connection_info().addr());
        let unreachable = |error| connect_error(error, &server);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unreachable)?;
        // The manager connects without sending a command: a server that
        // wants a password would otherwise refuse every request instead.
        redis::cmd("PING")
            .query_async::<()>(&mut manager)
            .await
            .map_err(unreachable)?;
        // One `INFO` serves every check of the server's setup; a server
        // that refuses it (renamed on some managed services) is not checked.
        let info: Option<String> = redis::cmd("INFO").query_async(&mut manager).await.ok();
        if let Some(info) = &info {
            refuse_unsupported(info, &server)?;
        }
        load_scripts(&mut manager, &server).await?;
        if let Some(info) = &info {
            warn_if_evicting(info, &server);
            warn_if_not_persisted(&mut manager, info, &server).await;
        }
        warn_if_clock_differs(&mut manager, &server).await;
        let max_value_bytes = bulk_limit(&mut manager).await;
        let mut store = Self::builder(manager).build();
        store.max_value_bytes = max_value_bytes;
        Ok(store)
    }
}

/// Where `addr` connects, as the errors and warnings of
/// [`RedisStore::connect`] name it: `host:port`, an IPv6 host in brackets
/// (the `redis` crate writes `::1:6379`, whose port no one can tell), or
/// a socket's path.
fn server_address(addr: &redis::ConnectionAddr) -> String {
    match addr {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => super::host_and_port(host, *port),
        other => other.to_string(),
    }
}

/// What [`RedisStore::connect`] takes.
const URL_EXPECTED: &str =
    "give a URL such as `redis://:password@host:6379/0` (`rediss://` for TLS)";

/// What a `rediss://` URL needs when the `redis` crate was built without
/// TLS: no other URL helps, only a feature of that crate, which Cargo
/// turns on for this store too once the application asks for it.
const NO_TLS: &str = "the `redis` crate was built without TLS: enable its `tokio-native-tls-comp` feature (or `tokio-rustls-comp`, with a rustls crypto provider) in the application's Cargo.toml, `redis = { version = \"1\", features = [\"tokio-native-tls-comp\"] }`";

/// Why [`RedisStore::connect`] could not read `url`, and what to change.
fn url_error(error: redis::RedisError) -> StoreError {
    let hint = if error.to_string().contains("TLS") {
        NO_TLS
    } else {
        URL_EXPECTED
    };
    Explained::misconfigured(error, hint)
}

/// What to build the store on when Redis runs as a cluster: a connection
/// to one node cannot follow a key to the node that serves it.
const USE_A_CLUSTER_CONNECTION: &str = "build the store with `RedisStore::builder` on a cluster connection, which follows each key to its node (the `redis` crate's `cluster-async` feature: `ClusterClient::new(urls)?.get_async_connection().await?`)";

/// The oldest Redis the store runs on: `SET` takes `NX` with `GET` from 7.0.
const OLDEST_MAJOR_VERSION: u64 = 7;

/// What a claim on a Redis older than 7.0 fails with.
const TOO_OLD: &str = "the store needs Redis 7.0 or later (or Valkey): the claim's `SET` takes `NX` with `GET`, which older servers refuse as a syntax error; upgrade the server";

/// Refuses a server the store cannot run on, before any request meets it:
/// a cluster node, which answers `MOVED` for each key another node
/// serves, or a Sentinel, which knows no `SET`. Warns of a server that
/// says it is older than Redis 7.0: every claim's `SET NX GET` then fails
/// (and says why), but a server compatible with Redis may give an older
/// version than the commands it takes. Warns of a replica too: connected
/// during a failover, the store serves once its address leads to the new
/// primary (see [`RedisStore::reconnect_after_read_only`]), but one
/// pointed at a replica for good answers every request 503, and a
/// writable one loses the store's records. `info`: the server's `INFO`.
fn refuse_unsupported(info: &str, server: &str) -> Result<(), StoreError> {
    if let Some(version) = too_old(info) {
        tracing::warn!(server, redis_version = version, "{TOO_OLD}");
    }
    if info_field(info, "role") == Some("slave") {
        let primary = primary_of(info);
        tracing::warn!(server, primary, "{REPLICA}");
    }
    let refusal = match info_field(info, "redis_mode") {
        Some("cluster") => format!(
            "the Redis at {server} is a node of a cluster, and `RedisStore::connect` reaches only that node: {USE_A_CLUSTER_CONNECTION}"
        ),
        Some("sentinel") => format!(
            "the server at {server} is a Redis Sentinel, which watches Redis servers and keeps no data: give the address of the primary it watches (or a name or proxy that follows the primary through failovers)"
        ),
        _ => return Ok(()),
    };
    Err(StoreError::misconfigured(refusal))
}

/// What a store connected to a replica does, told at connect.
const REPLICA: &str = "this Redis is a replica (of `primary`), which refuses the store's writes: requests get 503 until the store's address leads to a primary, as it does once a failover is through; if it does not, give the store the primary's address (or a name or proxy that follows the primary through failovers). A replica made writable (`replica-read-only no`) takes the writes and drops them when it syncs again";

/// `<host>:<port>`, the primary a replica's `INFO` names, or nothing.
fn primary_of(info: &str) -> String {
    let host = info_field(info, "master_host");
    let port = info_field(info, "master_port");
    host.zip(port)
        .map_or_else(String::new, |(host, port)| format!("{host}:{port}"))
}

/// The server's version in `INFO`'s answer, if it is older than
/// the store needs. Valkey gives the Redis version it is compatible with.
fn too_old(info: &str) -> Option<&str> {
    let version = info_field(info, "redis_version")?;
    let major: u64 = version.split('.').next()?.parse().ok()?;
    (major < OLDEST_MAJOR_VERSION).then_some(version)
}

/// Runs `EVAL` and `EVALSHA` once on the server behind `connection`,
/// refusing a server that clearly will not run the store's scripts (see
/// [`RedisStore::connect`]), then loads the scripts. An outage is told as
/// at connect.
async fn load_scripts(
    connection: &mut impl ConnectionLike,
    server: &str,
) -> Result<(), StoreError> {
    // `EVAL` first: it caches the empty script, which `EVALSHA` then
    // finds. A `NOSCRIPT` answer still shows `EVALSHA` allowed. The
    // release of an unanswered claim sends `EVAL`; the others `EVALSHA`.
    let eval = on_key_less("EVAL", EMPTY_SCRIPT)
        .query_async(connection)
        .await;
    refuse_scriptless(eval, server)?;
    let hash = Script::new(EMPTY_SCRIPT).get_hash().to_owned();
    let evalsha = on_key_less("EVALSHA", &hash).query_async(connection).await;
    refuse_scriptless(evalsha, server)?;
    for script in [&*CLAIM, &*RENEW, &*COMPLETE, &*RELEASE] {
        let loaded = script.hashed.load_async(connection).await.map(drop);
        match loaded {
            // The store runs without it: each script is then sent by its
            // text (`EVAL`) the first time Redis lacks it, once per script.
            Err(error) if scripts_refused_fix(&error, server).is_some() => {
                tracing::debug!(%error, server, "{SCRIPT_LOAD_REFUSED}");
                return Ok(());
            }
            loaded => refuse_scriptless(loaded, server)?,
        }
    }
    Ok(())
}

/// Why a server that refuses `SCRIPT LOAD` (an ACL without it, a proxy
/// that refuses it, the command renamed) is not refused.
const SCRIPT_LOAD_REFUSED: &str = "Redis refused `SCRIPT LOAD`; the store sends each script by its text (`EVAL`) the first time Redis lacks it instead";

/// `EVAL` or `EVALSHA` (`command`) of `script` on no key.
fn on_key_less(command: &str, script: &str) -> redis::Cmd {
    let mut command = redis::cmd(command);
    command.arg(script).arg(0);
    command
}

/// A scripting command's `answer` at connect: the store's refusal if the
/// server will not run scripts, the connection's error if it did not
/// answer, and nothing for any other answer, left to the first operation.
fn refuse_scriptless(
    answer: Result<(), redis::RedisError>,
    server: &str,
) -> Result<(), StoreError> {
    let Err(error) = answer else { return Ok(()) };
    if let Some(fix) = scripts_refused_fix(&error, server) {
        return Err(Explained::misconfigured(error, fix));
    }
    if error.is_io_error() || error.is_timeout() {
        return Err(connect_error(error, server));
    }
    Ok(())
}

/// A script that touches nothing, run at connect to see that the server
/// runs scripts for the store's user.
const EMPTY_SCRIPT: &str = "return 0";

/// What to grant, or to give the store instead, when `server` refused a
/// scripting command for good: `NOPERM` (the user's ACL), or a command or
/// subcommand it does not know (no Lua scripting, or renamed). `None` for
/// anything else.
fn scripts_refused_fix(error: &redis::RedisError, server: &str) -> Option<String> {
    let unknown = error.detail().is_some_and(|detail| {
        let detail = detail.to_ascii_lowercase();
        detail.starts_with("unknown command") || detail.starts_with("unknown subcommand")
    });
    let why = SCRIPTS_REFUSED_WHY;
    match error.code()? {
        "NOPERM" => Some(format!(
            "the Redis user the store connects to {server} as may not run the store's Lua scripts, {why}: allow `EVALSHA` and `EVAL` in its ACL (`+evalsha +eval`, or the category `+@scripting`), with the commands the scripts call (`{ACL_LINE}`)"
        )),
        "ERR" if unknown => Some(format!(
            "the server at {server} does not run the store's Lua scripts (`EVALSHA` and `EVAL`, under those names), {why}: give the store a Redis 7.0 or later (or Valkey) with scripting, its `EVALSHA` and `EVAL` commands not renamed"
        )),
        _ => None,
    }
}

/// What a server that cannot run the store's scripts would do to requests.
const SCRIPTS_REFUSED_WHY: &str = "which every completion, renewal and release is: claims would succeed and no response would be stored, so a retry after the lease lapsed would run the handler again";

/// What a server that wants a password answers without one.
const NO_PASSWORD: &str =
    "the Redis server requires a password: put it in the URL, `redis://:password@host:port`";

/// The first connection's failure, with the server it was for and what
/// to check.
fn connect_error(error: redis::RedisError, server: &str) -> StoreError {
    let told = |fix: &str| format!("connecting to Redis at {server}: {fix}");
    if let Some(fix) = refusal_fix(&error, "the store's keys") {
        return Explained::misconfigured(error, told(&fix));
    }
    if let Some(why) = passing_refusal(&error) {
        return Explained::store_error(error, told(why));
    }
    if error.to_string().contains("DB index is out of range") {
        let fix = "the server has fewer databases (its `databases` setting): name one in range in the URL";
        return Explained::misconfigured(error, told(fix));
    }
    let fix = if error.is_io_error() || error.is_timeout() {
        "check that Redis runs and listens there"
    } else {
        "check the URL and the server"
    };
    Explained::store_error(error, told(fix))
}

/// An operation's failure on `redis_key`, with the fix when the store is
/// set up wrongly (those fail every time, retried or not) or Redis
/// refuses it for a while (a replica, full, unable to save).
fn operation_error(error: redis::RedisError, redis_key: &str) -> StoreError {
    if error.code() == Some("WRONGTYPE") {
        let fix = format!(
            "the key `{redis_key}` holds a value this store did not write (a hash, list or set...): another application uses the store's key prefix; give the store a prefix of its own with `RedisStoreBuilder::prefix(...)`, or delete that key"
        );
        return Explained::misconfigured(error, fix);
    }
    if let Some(why) = passing_refusal(&error) {
        return Explained::store_error(error, why);
    }
    if let Some(fix) = unsupported_server_fix(&error) {
        return Explained::misconfigured(error, fix);
    }
    if over_bulk_limit(&error) {
        return Explained::misconfigured(error, OVER_BULK_LIMIT);
    }
    match refusal_fix(&error, &format!("`{redis_key}`")) {
        Some(fix) => Explained::misconfigured(error, fix),
        None => StoreError::backend(error),
    }
}

/// What to change when Redis refuses the store's commands for good,
/// whatever the key: a password, or an ACL that does not reach `keys`.
/// `None` for anything else.
fn refusal_fix(error: &redis::RedisError, keys: &str) -> Option<String> {
    let fix = match error.code() {
        Some("NOAUTH") => NO_PASSWORD.to_owned(),
        _ if error.kind() == redis::ErrorKind::AuthenticationFailed => {
            "check the user name and password in the URL".to_owned()
        }
        _ if error.code() == Some("NOPERM") || refused_in_script(error) => format!(
            "the Redis user the store connects as may not run this command on {keys}: its ACL must allow the commands the store and its scripts run on the keys of the store's prefix (`{ACL_LINE}`)"
        ),
        _ => return None,
    };
    Some(fix)
}

/// What to change when the server cannot run the store at all, as a
/// store built on a connection of the application's own finds out at its
/// first claim: a cluster node reached without a cluster connection
/// (`MOVED`, or `ASK` while slots move), or a Redis older than 7.0 (a
/// syntax error: the claim's `SET NX GET` is the only command of the
/// store with options). `None` for anything else.
fn unsupported_server_fix(error: &redis::RedisError) -> Option<String> {
    let syntax_error = error
        .detail()
        .is_some_and(|detail| detail.starts_with("syntax error"));
    match error.code()? {
        "MOVED" | "ASK" => Some(format!(
            "Redis runs as a cluster, and the store's connection reaches one node: {USE_A_CLUSTER_CONNECTION}"
        )),
        "ERR" if syntax_error => Some(TOO_OLD.to_owned()),
        _ => None,
    }
}

/// Whether Redis refused an argument longer than its `proto-max-bulk-len`
/// (a completed record's, the only long one), closing the connection.
fn over_bulk_limit(error: &redis::RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.starts_with("Protocol error: invalid bulk length"))
}

/// What to change when Redis refused a record as too long: a store built
/// by [`RedisStore::connect`] keeps records within the server's limit,
/// one built on a connection of the application's own does not know it.
const OVER_BULK_LIMIT: &str = "a response's record is longer than Redis takes in one argument (`proto-max-bulk-len`, 512 MiB by default), and Redis closed the connection: raise `proto-max-bulk-len` above the largest response body kept (`max_body_bytes`), lower `max_body_bytes`, or build the store with `RedisStore::connect`, which reads the limit and stores such records without their bodies";

/// Whether Redis refused a command one of the store's scripts called, for
/// the user's ACL: it answers that with a plain `ERR`, not `NOPERM`, in
/// words that changed: Redis 7.0 says the user executing the script can't
/// run it, Redis 7.2 and later (and Valkey) say `ACL failure in script`.
/// Missed, the refusal read as an outage, retried in vain, its fix unnamed.
fn refused_in_script(error: &redis::RedisError) -> bool {
    let told = error.to_string();
    told.contains("user executing the script can't run this command")
        || told.contains("ACL failure in script")
}

/// The ACL a Redis user needs for the store: the commands it sends
/// (`EVALSHA`, and `EVAL` when Redis has not seen a script yet, `SET`
/// and `GET` for short paths, `PING` and `SCRIPT LOAD` at connect, the
/// latter only to spare a round trip) and those its scripts call, which
/// Redis checks against the same user.
const ACL_LINE: &str =
    "ACL SETUSER <user> ~<prefix>* +get +set +del +pttl +pexpire +eval +evalsha +script|load +ping";

/// What Redis means when it refuses the store's commands for a while, as
/// an outage that ends without anyone changing the store's setup: a
/// replica (during a failover, the old primary comes back as one, and a
/// connection to its address is refused writes until it is pointed at
/// the new primary), a full Redis (records expire), a snapshot that could
/// not be saved (Redis takes writes again once a save succeeds).
/// `None` for anything else.
fn passing_refusal(error: &redis::RedisError) -> Option<&'static str> {
    match error.code()? {
        "READONLY" => Some(READ_ONLY_REPLICA),
        "OOM" => Some(FULL),
        "MISCONF" => Some(CANNOT_SAVE),
        _ => None,
    }
}

/// Whether `error` is Redis refusing every write for a while, whatever
/// the key, while it still answers reads: full (`OOM`, under
/// `noeviction`), or unable to save its snapshot (`MISCONF`). A replica's
/// refusal (`READONLY`) is not one: the store reconnects, and a replica's
/// reads may lag the primary's writes.
fn refuses_every_write(error: &redis::RedisError) -> bool {
    matches!(error.code(), Some("OOM" | "MISCONF"))
}

/// What a replica says to a write.
const READ_ONLY_REPLICA: &str = "Redis answers as a read-only replica (on a `ConnectionManager`, again after the store reconnected): during a failover this passes once the store's address leads to the new primary (a name or proxy that follows it); if it lasts, the store is connected to a replica: give it the primary's address. A store built on another kind of connection stays on the replica until it is rebuilt: build it on a `ConnectionManager`";

/// What a Redis that cannot save its snapshot says to writes and `PING`.
const CANNOT_SAVE: &str = "Redis refuses writes (and PING) because it cannot save its snapshot (`stop-writes-on-bgsave-error`), until a save succeeds: see why in Redis's log (a full disk, a directory it may not write), and fix that";

/// What a Redis at its `maxmemory` under `noeviction` says to a write.
const FULL: &str = "Redis is at its `maxmemory` and refuses writes (`maxmemory-policy noeviction`): new claims fail until records expire (requests already running still store their responses); raise `maxmemory`, or give the store a Redis of its own";

/// What an evicting Redis does to the store, told when it connects.
const EVICTING: &str = "this Redis evicts keys when it is full, in-flight claims among them: a retry of a request still running would then run it again; set maxmemory-policy to noeviction";

/// Warns when the server whose `INFO` is `info` may evict the store's
/// keys: it has a memory limit and a policy other than `noeviction`.
/// Nothing else shows it until a full Redis drops a claim and a handler
/// runs twice. With the `server`, as the other checks at connect name it:
/// a service may use other Redis servers, whose settings are not this one's.
fn warn_if_evicting(info: &str, server: &str) {
    if let Some(policy) = evicting_policy(info) {
        tracing::warn!(server, maxmemory_policy = policy, "{EVICTING}");
    }
}

/// The eviction policy in `INFO`'s answer, if Redis evicts by it:
/// `maxmemory` is set and the policy is not `noeviction`.
fn evicting_policy(info: &str) -> Option<&str> {
    let limited = info_field(info, "maxmemory")
        .and_then(|limit| limit.parse::<u64>().ok())
        .is_some_and(|limit| limit > 0);
    let policy = info_field(info, "maxmemory_policy")?;
    (limited && policy != "noeviction").then_some(policy)
}

/// The servers' texts in `answer`, an answer to `INFO`: one server's, or
/// on a cluster connection, which asks every primary, each node's under
/// its address. Read as one text, a cluster's answer read as none, and
/// nodes that evict were never told of.
fn info_answers(answer: redis::Value) -> Vec<String> {
    let nodes = match answer {
        redis::Value::Map(nodes) => nodes.into_iter().map(|(_, info)| info).collect(),
        answer => vec![answer],
    };
    let texts = nodes.into_iter().map(redis::from_redis_value::<String>);
    texts.filter_map(Result::ok).collect()
}

/// The value of `name` in an `INFO` answer.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// What a Redis that keeps nothing on disk does to the store, told when
/// it connects.
const NOT_PERSISTED: &str = "this Redis keeps nothing on disk (`appendonly no`, no `save` points): a restart forgets every record, and retries of requests that ran, or are running, run again; set `appendonly yes`";

/// Warns when the server behind `connection`, whose `INFO` is `info`,
/// keeps nothing on disk: no append-only file and no snapshots. Nothing
/// else shows it until Redis restarts, every claim and record is gone,
/// and the handlers of retried requests run a second time (the in-flight
/// ones' completions log it, too late). A server that refuses `CONFIG
/// GET` (managed services, which keep their own copies) is not checked.
async fn warn_if_not_persisted(connection: &mut impl ConnectionLike, info: &str, server: &str) {
    if !appends_nothing(info) {
        return;
    }
    let config: Result<std::collections::HashMap<String, String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(connection)
        .await;
    let snapshots = config.ok().and_then(|mut config| config.remove("save"));
    if snapshots.is_some_and(|points| points.trim().is_empty()) {
        tracing::warn!(server, "{NOT_PERSISTED}");
    }
}

/// How far this host's clock may be from the Redis server's before
/// [`RedisStore::connect`] warns: far above a round trip, and below the
/// two thirds of even a three-second lease at which instances take each
/// other's running claims over.
const CLOCK_TOLERANCE_MS: u64 = 2_000;

/// What instances whose clocks disagree do to the store, told at connect
/// and when an instance takes a running claim over.
const CLOCK_DIFFERS: &str = "this host's clock differs from the Redis server's: the store reads leases and expiry by each instance's own clock, never Redis's, so an instance whose clock runs ahead of another's by two thirds of a lease takes the other's running requests over and runs them a second time; keep every instance's clock in sync (NTP)";

/// Warns when this host's clock and the server's disagree by more than
/// [`CLOCK_TOLERANCE_MS`]. Nothing else shows instances whose clocks are
/// apart until one takes over a running request: each instance compared
/// with the one Redis they share, those far apart are told. A server that
/// refuses `TIME` is not checked.
async fn warn_if_clock_differs(connection: &mut impl ConnectionLike, server: &str) {
    if let Some(difference_ms) = differs_from_the_server(connection, &SystemClock).await {
        tracing::warn!(server, difference_ms, "{CLOCK_DIFFERS}");
    }
}

/// How far `clock` is from the clock of the server behind `connection`,
/// if farther than [`CLOCK_TOLERANCE_MS`] (see [`clock_difference`]).
/// `None` too when the server refuses `TIME`.
async fn differs_from_the_server(
    connection: &mut impl ConnectionLike,
    clock: &dyn Clock,
) -> Option<i64> {
    let sent = clock.now_millis();
    let time: Result<(u64, u64), _> = redis::cmd("TIME").query_async(connection).await;
    let received = clock.now_millis();
    let (seconds, micros) = time.ok()?;
    let redis_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
    clock_difference(redis_ms, sent, received)
}

/// How far `redis_ms`, the server's time, lies outside the window from
/// `sent` to `received` in which this host asked for it (positive when
/// Redis is ahead), if farther than [`CLOCK_TOLERANCE_MS`].
fn clock_difference(redis_ms: u64, sent: u64, received: u64) -> Option<i64> {
    let apart = |later: u64, earlier: u64| i64::try_from(later.saturating_sub(earlier));
    let difference = if redis_ms > received {
        apart(redis_ms, received).unwrap_or(i64::MAX)
    } else {
        -apart(sent, redis_ms).unwrap_or(i64::MAX)
    };
    (difference.unsigned_abs() > CLOCK_TOLERANCE_MS).then_some(difference)
}

/// The largest value the server behind `connection` takes in one
/// argument: its `proto-max-bulk-len`, which an operator may have lowered
/// from its default, [`MAX_VALUE_BYTES`] (never more), and what its
/// `client-query-buffer-limit` leaves room for. Redis answers an argument
/// longer than the first with a protocol error and closes the connection;
/// one that outgrows the query buffer has the connection closed without
/// an answer. Either way every other command on it fails: a completion
/// past it would fail at every attempt, and each would cut the connection
/// again, until the lease lapsed and a retry ran the handler again. Kept
/// within it, the record is stored without its body, as past
/// `max_body_bytes`. A server that refuses `CONFIG GET` is taken to have
/// the defaults.
async fn bulk_limit(connection: &mut impl ConnectionLike) -> usize {
    let bulk = config_size(connection, BULK_LIMIT).await;
    let buffered = config_size(connection, QUERY_BUFFER_LIMIT).await;
    let buffered = buffered.map(|limit| limit.saturating_sub(ARGUMENT_END));
    [bulk, buffered]
        .into_iter()
        .flatten()
        .fold(MAX_VALUE_BYTES, usize::min)
}

/// The size setting `name` of the server behind `connection`, in bytes;
/// `None` if it refuses `CONFIG GET`. Each is asked apart, so that a
/// server that refuses one still tells the other.
async fn config_size(connection: &mut impl ConnectionLike, name: &str) -> Option<usize> {
    let config: Result<std::collections::HashMap<String, usize>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(connection)
        .await;
    config.ok()?.remove(name)
}

/// Redis's setting for the longest argument it takes.
const BULK_LIMIT: &str = "proto-max-bulk-len";

/// Redis's setting for the most a client's query buffer holds, which a
/// long argument fills alone (1 GiB by default, 1 MiB at least).
const QUERY_BUFFER_LIMIT: &str = "client-query-buffer-limit";

/// The bytes a long argument takes in the query buffer past its value:
/// the `\r\n` that ends it, read with it.
const ARGUMENT_END: usize = 2;

/// Whether `INFO`'s answer says the append-only file is off.
fn appends_nothing(info: &str) -> bool {
    info_field(info, "aof_enabled") == Some("0")
}

impl<C> RedisStore<C> {
    /// Starts building a store on `connection`, a connection of the `redis`
    /// crate this crate re-exports as [`idempotent_core::redis`](crate::redis)
    /// (a `ConnectionManager`, or a cluster connection).
    pub fn builder(connection: C) -> RedisStoreBuilder<C> {
        RedisStoreBuilder {
            connection,
            clock: Arc::new(SystemClock),
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key holding `key`'s record.
    #[must_use]
    pub fn redis_key(&self, key: &RecordKey) -> String {
        let mut redis_key = String::with_capacity(self.prefix.len() + 64);
        redis_key.push_str(&self.prefix);
        push_hex(&mut redis_key, &key.digest());
        redis_key
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A claim of `key` with `token` whose `SET` Redis refused with
    /// `refusal`, as it refuses every write for a while, before it looks
    /// at the key ([`refuses_every_write`]): a retry of a request already
    /// stored would get 503 rather than its replay, and one still running
    /// 503 rather than 409. A plain read answers those, and finds this
    /// claim's own lease if a first send of its `SET` was applied (see
    /// [`found_by`]); a key with no live record is refused as before, and
    /// nothing runs.
    async fn claim_when_writes_refused(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        refusal: redis::RedisError,
    ) -> Result<Claim, StoreError> {
        match self.get(key).await {
            Ok(Some(record)) => Ok(found_by(record, token)),
            Err(corrupt @ StoreError::Codec(_)) => Err(corrupt),
            Ok(None) | Err(_) => Err(operation_error(refusal, &self.redis_key(key))),
        }
    }

    /// Runs a fenced script on `redis_key` with `args`: [`HELD`],
    /// [`GONE`] or `0` (held by another).
    async fn fenced(
        &self,
        script: &StoreScript,
        redis_key: &str,
        args: &[&[u8]],
    ) -> Result<i64, StoreError> {
        let script = Write::Script(script, redis_key, args);
        self.write(script)
            .await
            .map_err(|error| operation_error(error, redis_key))
    }

    /// Sends `write`, and sends it once more when a replica refused it
    /// (`READONLY`) and [`reconnect_after_read_only`](Self::reconnect_after_read_only)
    /// says to: the refusal applied nothing, so the write runs once either
    /// way.
    async fn write<T: redis::FromRedisValue>(&self, write: Write<'_>) -> redis::RedisResult<T> {
        let mut connection = self.connection.clone();
        let reconnects = self.read_only_reconnects();
        let answer = write.send(&mut connection).await;
        if refused_by_a_replica(&answer) && self.reconnect_after_read_only(reconnects).await {
            return write.send(&mut connection).await;
        }
        answer
    }

    /// Warns, with `key`, if Redis evicts keys now: `key`'s claim was
    /// found gone, and `connect` checked the policy only once, so one set
    /// since (`CONFIG SET maxmemory-policy allkeys-lru`) went unwarned.
    /// Only then, and never on a request's way: `INFO` runs on a task of
    /// its own ([`Store::settle`] waits for it), which the completion's or
    /// renewal's answer does not wait for; one at a time, so that a wave
    /// of evictions or takeovers adds one round trip, not one per request.
    fn warn_if_evicting_now(&self, key: &RecordKey) {
        self.check_in_background(EVICTION_CHECK, &self.checking_eviction, |mut connection| {
            let log_id = key.log_id().to_string();
            async move {
                let mut info = redis::cmd("INFO");
                info.arg("memory");
                let answer: redis::RedisResult<redis::Value> =
                    info.query_async(&mut connection).await;
                let answers = answer.map(info_answers).unwrap_or_default();
                if let Some(policy) = answers.iter().find_map(|info| evicting_policy(info)) {
                    tracing::warn!(key = log_id, maxmemory_policy = policy, "{EVICTING}");
                }
            }
        });
    }

    /// Warns, with `key`, if the store's clock is now seconds off the
    /// server's: it is taking over `key`'s running claim, whose lease
    /// lapsed by this clock, and `connect` compared the clocks only once.
    /// A clock that drifted or stepped ahead since takes over requests
    /// still running, which then run twice. Only then, and never on a
    /// request's way, as [`warn_if_evicting_now`](Self::warn_if_evicting_now).
    fn warn_if_clock_differs_now(&self, key: &RecordKey) {
        self.check_in_background(CLOCK_CHECK, &self.checking_clock, |mut connection| {
            let (clock, log_id) = (self.clock.clone(), key.log_id().to_string());
            async move {
                let differs = differs_from_the_server(&mut connection, &*clock).await;
                if let Some(difference_ms) = differs {
                    tracing::warn!(key = log_id, difference_ms, "{CLOCK_DIFFERS}");
                }
            }
        });
    }

    /// Runs the check `make` returns, on a connection of its own, on a
    /// task of the store's ([`Store::settle`] waits for it) that no
    /// request waits for; unless a check of its kind (`turn`) still runs,
    /// or no runtime is there to run it.
    ///
    /// A check gets [`CHECK_LIMIT`] to finish: one whose command is never
    /// answered (a stalled server, on a connection with no response
    /// timeout of its own, as a cluster connection has by default) would
    /// otherwise hold its turn for good, so that no later check of its
    /// kind ever started, and keep [`Store::settle`] waiting. Past the
    /// limit it is given up with a warning naming it (`what`), and the
    /// next check of its kind may start.
    fn check_in_background<F>(
        &self,
        what: &'static str,
        turn: &OneAtATime,
        make: impl FnOnce(C) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(running) = turn.start() else {
            return;
        };
        let check = make(self.connection.clone());
        let check = async move {
            let _running = running;
            if tokio::time::timeout(CHECK_LIMIT, check).await.is_err() {
                let limit_ms = millis(CHECK_LIMIT);
                tracing::warn!(check = what, limit_ms, "{CHECK_UNFINISHED}");
            }
        };
        self.background.spawn_on(check, &runtime);
    }

    /// How many times the store reconnected after a replica refused a
    /// write, read before sending one.
    fn read_only_reconnects(&self) -> u64 {
        self.read_only_reconnects.load(Ordering::Relaxed)
    }

    /// After a failover, the store's connection may still lead to the old
    /// primary, now a replica that refuses every write (`READONLY`): the
    /// `ConnectionManager` reconnects only when a connection breaks, and
    /// Redis keeps a demoted primary's clients connected. Reached through
    /// a name or proxy that moved to the new primary, a new connection
    /// goes there. So the store closes the connection (`QUIT`), has the
    /// manager reconnect (the `PING` after it fails, which starts that),
    /// and answers whether to send the refused command once more: a
    /// replica's refusal applied nothing, so that it runs once either way.
    /// Only the first of the commands refused by one connection closes
    /// it (`seen`: [`read_only_reconnects`](Self::read_only_reconnects)
    /// before sending): the others' `QUIT` would close the new one. They
    /// wait for it to be through (`reconnecting`), and the count moves on
    /// only then: sent at once, their commands would meet the old
    /// connection (refused again) or follow its `QUIT` (cut off), and one
    /// sent meanwhile, refused by the old connection, would close the new
    /// one. A connection other than a `ConnectionManager` cannot
    /// reconnect; it is left as it is, and so is a store whose address
    /// leads to a replica still (503, [`READ_ONLY_REPLICA`]).
    async fn reconnect_after_read_only(&self, seen: u64) -> bool {
        let connection: &dyn std::any::Any = &self.connection;
        let Some(manager) = connection.downcast_ref::<ConnectionManager>() else {
            return false;
        };
        let _reconnecting = self.reconnecting.lock().await;
        if self.read_only_reconnects() == seen {
            let mut manager = manager.clone();
            tracing::debug!("Redis answered as a read-only replica; reconnecting");
            let _: redis::RedisResult<()> = redis::cmd("QUIT").query_async(&mut manager).await;
            let _: redis::RedisResult<()> = redis::cmd("PING").query_async(&mut manager).await;
            self.read_only_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

/// How long a background check of the server may take (see
/// [`RedisStore::check_in_background`]). The store has no timeout of its
/// own to take it from: the engine's store timeout is not passed to it,
/// and a store built on a connection of the application's own has that
/// connection's, or none. So it is the engine's default store timeout: a
/// server that takes longer to answer one `INFO` or `TIME` is one the
/// requests meanwhile see as down, and a check bounded by it ends well
/// within the time [`Idempotency::drain`](crate::Idempotency::drain)
/// gives the store's background work, which it would otherwise use up.
const CHECK_LIMIT: Duration = crate::IdempotencyBuilder::DEFAULT_STORE_TIMEOUT;

/// The warning of a background check that ran out of [`CHECK_LIMIT`].
const CHECK_UNFINISHED: &str = "Redis did not answer a background check of its setup in time (`check`, within `limit_ms`), so it could not finish: the check is given up, and the next claim that calls for it checks again";

/// The background check of the eviction policy, as its warning names it.
const EVICTION_CHECK: &str = "eviction policy";

/// The background check of the clocks, as its warning names it.
const CLOCK_CHECK: &str = "clock";

/// A background check that runs one at a time: while one runs, another
/// of its kind is not started (the first tells what the others would).
#[derive(Clone, Default)]
struct OneAtATime(Arc<AtomicBool>);

impl OneAtATime {
    /// The check's turn, held until dropped; `None` while another runs.
    fn start(&self) -> Option<Running> {
        let busy = self.0.swap(true, Ordering::Acquire);
        (!busy).then(|| Running(Arc::clone(&self.0)))
    }
}

/// A started [`OneAtATime`] check; dropped, it lets the next one start.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A write the store sends to Redis, which a replica may refuse (see
/// [`RedisStore::write`]).
enum Write<'a> {
    /// A plain command: a claim's `SET NX GET`.
    Command(&'a redis::Cmd),
    /// One of the store's scripts, on a key, with its arguments (`ARGV`).
    Script(&'a StoreScript, &'a str, &'a [&'a [u8]]),
}

impl Write<'_> {
    /// Sends the write on `connection`.
    async fn send<T: redis::FromRedisValue>(
        &self,
        connection: &mut impl ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Command(command) => command.query_async(connection).await,
            Self::Script(script, redis_key, args) => script.run(connection, redis_key, args).await,
        }
    }
}

/// Whether a command's `answer` is a replica's refusal of a write.
fn refused_by_a_replica<T>(answer: &redis::RedisResult<T>) -> bool {
    answer
        .as_ref()
        .is_err_and(|error| error.code() == Some("READONLY"))
}

/// A fenced script's answer as the caller sees it: only [`HELD`] is a
/// success.
fn held(answer: i64) -> Result<(), StoreError> {
    if answer == HELD {
        Ok(())
    } else {
        Err(StoreError::LeaseLost)
    }
}

/// Why a completion found its key empty: Redis dropped the claim, or let
/// it expire long after its lease lapsed, or another request took the
/// lapsed lease over and then released it (its handler failed). A
/// takeover still held leaves the other request's value, which is not
/// logged here. Retries of the request run the handler again, and no
/// other error says so: the engine reports a lost lease, which reads as a
/// takeover alone.
const GONE_AT_COMPLETION: &str = "the claim's record is gone from Redis: another request took the lapsed lease over and released it, or Redis dropped it (a restart without persistence, a flush, an eviction, a failover to a replica that had not received it, or its expiry over a minute after the lease lapsed); the response was not stored and a retry runs the handler again: if the lease had not lapsed, give Redis persistence (`appendonly yes`) and `maxmemory-policy noeviction`";

/// What a failed release of an [`Unanswered`] claim leaves behind.
const UNRELEASED: &str =
    "could not release a claim whose answer nobody read; it frees when its lease lapses";

/// A claim sent to Redis whose answer its caller never read: cut short by
/// the engine's store timeout or by the connection's, it may still be
/// applied, and would hold the key under a lease nobody has until it
/// lapses. Dropped before its answer was read, it releases the claim; the
/// release follows it on the same connection, so Redis runs it after.
struct Unanswered<'a, C: ConnectionLike + Clone + Send + Sync + 'static> {
    store: &'a RedisStore<C>,
    key: &'a RecordKey,
    redis_key: &'a str,
    token: LeaseToken,
    armed: bool,
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Unanswered<'_, C> {
    /// The claim's failure. An error the server answered with (a key of
    /// another type, no password) is an answer: nothing was applied, and
    /// there is no claim to release.
    fn refused(&mut self, error: redis::RedisError) -> StoreError {
        if error.code().is_some() {
            self.armed = false;
        }
        operation_error(error, self.redis_key)
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Drop for Unanswered<'_, C> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let log_id = self.key.log_id().to_string();
        let mut connection = self.store.connection.clone();
        let token = self.token.to_bytes();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // `EVAL` with the script's text, not `EVALSHA`: if Redis has
            // lost its script cache (a restart), the fallback that loads
            // the script would come after the client stopped waiting,
            // behind the stall that cut the claim short.
            let command = on_key("EVAL", &RELEASE.source, self.redis_key, &[&token]);
            let release = async move {
                let released: Result<i64, _> = command.query_async(&mut connection).await;
                if let Err(error) = released {
                    tracing::warn!(%error, key = log_id, "{UNRELEASED}");
                }
            };
            self.store.background.spawn_on(release, &runtime);
        }
    }
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.now();
        let token = LeaseToken::random();
        let held = InFlight {
            fingerprint,
            lease_token: token,
            lease_expires_at: now.saturating_add(millis(lease)),
        };
        let redis_key = self.redis_key(key);
        let value = encode_in_flight(&held);
        let expiry = px(lease);
        let mut unanswered = Unanswered {
            store: self,
            key,
            redis_key: &redis_key,
            token,
            armed: true,
        };
        // A free key is claimed by one plain command, no script: `SET NX
        // GET` sets the value only if the key is absent, and otherwise
        // returns what holds it.
        let mut set = redis::cmd("SET");
        set.arg(&redis_key).arg(value.as_ref()).arg("NX").arg("GET");
        set.arg("PX").arg(expiry);
        let found = match self.write::<Option<Vec<u8>>>(Write::Command(&set)).await {
            Err(error) if refuses_every_write(&error) => {
                unanswered.armed = false;
                return self.claim_when_writes_refused(key, token, error).await;
            }
            found => found.map_err(|error| unanswered.refused(error))?,
        };
        unanswered.armed = false;
        let Some(found) = found else {
            return Ok(Claim::Acquired(token));
        };
        // The deadline is read in place (both layouts keep it at the same
        // offset): an expired value this build cannot decode, another
        // version's or a corrupt one, is taken over instead of refusing
        // every claim of its key until Redis drops it.
        if Completed::encoded_expires_at(&found) > now {
            return Ok(found_by(decode(Bytes::from(found))?, token));
        }
        // A lapsed lease, or a record past its TTL that Redis keeps for the
        // clock-skew grace: the script re-checks and takes it over atomically.
        if found.first() == Some(&IN_FLIGHT_TAG) {
            self.warn_if_clock_differs_now(key);
        }
        unanswered.armed = true;
        let args = [now.to_string(), expiry.to_string()];
        let args = [args[0].as_bytes(), value.as_ref(), args[1].as_bytes()];
        let found: Option<Vec<u8>> = self
            .write(Write::Script(&CLAIM, &redis_key, &args))
            .await
            .map_err(|error| unanswered.refused(error))?;
        unanswered.armed = false;
        match found {
            None => Ok(Claim::Acquired(token)),
            Some(found) => Ok(found_by(decode(Bytes::from(found))?, token)),
        }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let deadline = self.now().saturating_add(millis(lease));
        let redis_key = self.redis_key(key);
        let (token, deadline) = (token.to_bytes(), deadline.to_be_bytes());
        let expiry = px(lease).to_string();
        let args = [token.as_slice(), deadline.as_slice(), expiry.as_bytes()];
        let answer = self.fenced(&RENEW, &redis_key, &args).await?;
        if answer == GONE {
            self.warn_if_evicting_now(key);
        }
        held(answer)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // The script copies the holder's fingerprint over this blank one.
        let mut record = Completed {
            fingerprint: Fingerprint::from_bytes([0; 32]),
            response,
            expires_at: self.now().saturating_add(millis(ttl)),
        };
        record.fit(self.max_value_bytes);
        let redis_key = self.redis_key(key);
        let (token, encoded) = (token.to_bytes(), record.encode());
        let expiry = px(ttl).to_string();
        let args = [token.as_slice(), encoded.as_ref(), expiry.as_bytes()];
        let answer = self.fenced(&COMPLETE, &redis_key, &args).await?;
        if answer == GONE {
            tracing::warn!(key = %key.log_id(), "{GONE_AT_COMPLETION}");
            self.warn_if_evicting_now(key);
        }
        held(answer)
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let redis_key = self.redis_key(key);
        let token = token.to_bytes();
        held(
            self.fenced(&RELEASE, &redis_key, &[token.as_slice()])
                .await?,
        )
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let found: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut connection)
            .await
            .map_err(|error| operation_error(error, &redis_key))?;
        let Some(found) = found else {
            return Ok(None);
        };
        // An expired value is gone, whether or not this build can decode it.
        if Completed::encoded_expires_at(&found) <= self.now() {
            return Ok(None);
        }
        let record = decode(Bytes::from(found))?;
        Ok((record.deadline() > self.now()).then_some(record))
    }

    async fn settle(&self) {
        super::settle(&self.background).await;
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(self.clock.clone())
    }
}

/// What a claim with `token` answers when it finds `record` live. A
/// command can reach Redis twice: the Redis Cluster client sends it again
/// after the connection dropped or the reply timed out, though the first
/// may have been applied. The second then finds the lease the first took,
/// under this claim's own token: the key is this claim's, not another
/// request's in flight, which would keep it from running until the lease
/// lapsed.
fn found_by(record: Record, token: LeaseToken) -> Claim {
    match record {
        Record::InFlight(held) if held.lease_token == token => Claim::Acquired(token),
        record => record.into(),
    }
}

/// Redis expiry for a record whose deadline is `duration` away: the
/// grace is added after the cap, so that a record of the longest TTL (a
/// century, `"36500d"`) keeps it too rather than expiring in Redis at its
/// very deadline, before it on a host whose clock is behind Redis's.
fn px(duration: Duration) -> u64 {
    millis(duration)
        .min(MAX_PX)
        .saturating_add(millis(EXPIRY_GRACE))
}

fn encode_in_flight(held: &InFlight) -> Bytes {
    let mut out = BytesMut::with_capacity(IN_FLIGHT_LEN);
    out.put_u8(IN_FLIGHT_TAG);
    out.put_slice(held.fingerprint.as_bytes());
    out.put_u64(held.lease_expires_at);
    out.put_slice(&held.lease_token.to_bytes());
    out.freeze()
}

/// The record `value` holds. One this build cannot read is told as
/// [`UNREADABLE`], which says where it is and what to do, rather than by
/// what the decoder stumbled on: a value of another application under the
/// store's prefix fails every claim of its key alike (500), for good if
/// nothing expires it, and "unknown record version" names neither.
fn decode(value: Bytes) -> Result<Record, StoreError> {
    read(value).ok_or_else(|| StoreError::corrupt(UNREADABLE))
}

/// What a value the store cannot read at a record's Redis key means, and
/// what to do about it.
const UNREADABLE: &str = "the value at the record's Redis key is not a record this build of the store reads: another application writes under the store's key prefix (give the store a prefix of its own with `RedisStoreBuilder::prefix(...)`), a later release of this crate wrote it, or it was damaged; the key is the store's prefix followed by the digest that the log's `key` begins (`redis-cli --scan --pattern '<prefix><key>*'`), and deleting it lets its idempotency key run again";

/// The record `value` encodes, if it encodes one ([`decode`]).
fn read(value: Bytes) -> Option<Record> {
    if value.first() != Some(&IN_FLIGHT_TAG) {
        return Some(Record::Completed(Arc::new(Completed::decode(value).ok()?)));
    }
    if value.len() != IN_FLIGHT_LEN {
        return None;
    }
    let array = |range: std::ops::Range<usize>| value[range].to_vec();
    let fingerprint: [u8; 32] = array(1..33).try_into().ok()?;
    let deadline: [u8; 8] = array(33..41).try_into().ok()?;
    let token: [u8; 16] = array(41..57).try_into().ok()?;
    Some(Record::InFlight(InFlight {
        fingerprint: Fingerprint::from_bytes(fingerprint),
        lease_expires_at: u64::from_be_bytes(deadline),
        lease_token: LeaseToken::from_bytes(token),
    }))
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use proptest::prelude::*;

    use super::*;

    /// A wave of claims found gone, or of takeovers, starts one check of
    /// the server at a time: the others would tell the same.
    #[test]
    fn a_background_check_runs_one_at_a_time() {
        let checks = OneAtATime::default();
        let first = checks.start();
        assert!(first.is_some());
        assert!(checks.start().is_none(), "a second check while one runs");
        drop(first);
        assert!(checks.start().is_some(), "the next check once it ended");
    }

    /// A connection whose commands are never answered: a check sent on it
    /// runs until the test ends.
    #[derive(Clone)]
    struct Unanswering;

    impl ConnectionLike for Unanswering {
        fn req_packed_command<'a>(
            &'a mut self,
            _: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, redis::Value> {
            Box::pin(std::future::pending())
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
            Box::pin(std::future::pending())
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// The store's own checks go one at a time, each kind apart: a wave of
    /// claims found gone and of takeovers, while the first checks still
    /// wait for the server, starts one task of each kind.
    #[tokio::test]
    async fn a_wave_of_claims_found_gone_and_takeovers_starts_one_check_of_each() {
        let store = RedisStore::builder(Unanswering).build();
        for name in ["a", "b", "c"] {
            let key = record_key(name);
            store.warn_if_evicting_now(&key);
            store.warn_if_clock_differs_now(&key);
        }
        assert_eq!(store.background.len(), 2, "one check per request");
    }

    /// A check the server never answers held its turn for good, and no
    /// later check of its kind started. Each is given up after
    /// [`CHECK_LIMIT`]; the next one starts. Time is paused: the runtime
    /// moves it on while every task waits.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_check_is_given_up_and_the_next_one_of_its_kind_starts() {
        let store = RedisStore::builder(Unanswering).build();
        let key = record_key("a");
        store.warn_if_evicting_now(&key);
        store.warn_if_clock_differs_now(&key);
        let given_up = tokio::time::timeout(10 * CHECK_LIMIT, store.settle()).await;
        assert!(
            given_up.is_ok(),
            "the unanswered checks were never given up"
        );
        store.warn_if_evicting_now(&key);
        store.warn_if_clock_differs_now(&key);
        assert_eq!(store.background.len(), 2, "one new check of each kind");
    }

    fn record_key(name: &str) -> RecordKey {
        RecordKey::new(
            crate::scope::ScopeDigest::global(),
            crate::key::IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    }

    /// The scripts read the deadline at bytes 33..41 of either kind of
    /// value and splice the fingerprint at 1..33: pin the codec to that.
    #[test]
    fn completed_encoding_keeps_fingerprint_and_deadline_where_the_scripts_look() {
        let record = Completed {
            fingerprint: Fingerprint::from_bytes([9; 32]),
            response: StoredResponse {
                status: StatusCode::OK,
                headers: Vec::new(),
                body: Some(Bytes::from_static(b"x")),
            },
            expires_at: 0x0102_0304_0506_0708,
        };
        let encoded = record.encode();
        assert_ne!(encoded[0], IN_FLIGHT_TAG);
        assert_eq!(&encoded[1..33], &[9; 32]);
        assert_eq!(&encoded[33..41], &0x0102_0304_0506_0708_u64.to_be_bytes());
    }

    #[test]
    fn only_a_memory_limit_with_an_evicting_policy_evicts() {
        let info = |limit: &str, policy: &str| {
            format!(
                "# Memory\r\nused_memory:1\r\nmaxmemory:{limit}\r\nmaxmemory_human:1M\r\nmaxmemory_policy:{policy}\r\n"
            )
        };
        assert_eq!(
            evicting_policy(&info("1048576", "allkeys-lru")),
            Some("allkeys-lru")
        );
        assert_eq!(
            evicting_policy(&info("1048576", "volatile-ttl")),
            Some("volatile-ttl")
        );
        assert_eq!(evicting_policy(&info("1048576", "noeviction")), None);
        assert_eq!(evicting_policy(&info("0", "allkeys-lru")), None);
        assert_eq!(evicting_policy(""), None);
    }

    #[test]
    fn only_an_append_only_file_turned_off_appends_nothing() {
        let info =
            |enabled: &str| format!("# Persistence\r\nloading:0\r\naof_enabled:{enabled}\r\n");
        assert!(appends_nothing(&info("0")));
        assert!(!appends_nothing(&info("1")));
        assert!(!appends_nothing(""));
    }

    /// Instances read leases by their own clocks: one more than two
    /// seconds off Redis's, either way, is told; a slow round trip alone
    /// is not.
    #[test]
    fn only_a_clock_seconds_off_the_servers_differs() {
        let asked = 1_700_000_000_000;
        assert_eq!(clock_difference(asked + 500, asked, asked + 900), None);
        assert_eq!(clock_difference(asked + 2_900, asked, asked + 900), None);
        assert_eq!(clock_difference(asked - 2_000, asked, asked + 900), None);
        assert_eq!(
            clock_difference(asked + 3_000, asked, asked + 900),
            Some(2_100)
        );
        assert_eq!(
            clock_difference(asked - 45_000, asked, asked + 900),
            Some(-45_000)
        );
        assert_eq!(clock_difference(0, u64::MAX, u64::MAX), Some(-i64::MAX));
    }

    #[test]
    fn only_a_server_older_than_redis_7_is_too_old() {
        let info = |version: &str| {
            format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")
        };
        assert_eq!(too_old(&info("6.2.14")), Some("6.2.14"));
        assert_eq!(too_old(&info("5.0.7")), Some("5.0.7"));
        assert_eq!(too_old(&info("7.0.0")), None);
        assert_eq!(too_old(&info("7.2.4")), None);
        assert_eq!(too_old(&info("255.255.255")), None);
        assert_eq!(too_old(""), None);
    }

    /// A store built on a connection of the application's own meets an
    /// old Redis or a cluster node at its first claim: the error says what
    /// to change, and fails alike until someone does.
    #[test]
    fn an_old_redis_or_a_cluster_node_is_told_at_the_first_claim() {
        let server_error = |kind, detail: &str| {
            redis::RedisError::from((
                redis::ErrorKind::Server(kind),
                "An error was signalled by the server",
                detail.to_owned(),
            ))
        };
        let syntax = server_error(redis::ServerErrorKind::ResponseError, "syntax error");
        let error = operation_error(syntax, "k");
        assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
        assert!(
            error.to_string().contains("needs Redis 7.0 or later"),
            "{error}"
        );

        let moved = server_error(redis::ServerErrorKind::Moved, "3999 127.0.0.1:6381");
        let error = operation_error(moved, "k");
        assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
        assert!(error.to_string().contains("cluster connection"), "{error}");

        let other = server_error(redis::ServerErrorKind::ResponseError, "something else");
        assert!(matches!(
            operation_error(other, "k"),
            StoreError::Backend(_)
        ));
    }

    /// A command a script calls, refused by the user's ACL, in the words
    /// of each server: Redis 7.0 (`The user executing the script can't
    /// ...`), and Redis 7.2 or later and Valkey (`ACL failure in script:
    /// ...`). Each fails every attempt alike until the ACL is changed, so
    /// each is told as a setup to fix, with the ACL the store needs, not
    /// as an outage retried in vain.
    #[test]
    fn a_command_a_script_calls_refused_by_the_acl_is_told_with_the_acl_to_grant() {
        let refusals = [
            "The user executing the script can't run this command or subcommand script: 104a, on @user_script:6.",
            "ACL failure in script: User app has no permissions to run the 'del' command script: 8a2f, on @user_script:6.",
        ];
        for detail in refusals {
            let refused = redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "An error was signalled by the server",
                detail.to_owned(),
            ));
            let error = operation_error(refused, "k");
            assert!(
                matches!(error, StoreError::Misconfigured(_)),
                "{detail}: {error:?}"
            );
            assert!(error.to_string().contains(ACL_LINE), "{error}");
        }
    }

    /// A record longer than a lowered `proto-max-bulk-len`, sent by a
    /// store on a connection of the application's own: Redis refuses it
    /// and closes the connection, at every attempt. Told as an outage,
    /// each attempt the engine made cut every other request's commands.
    #[test]
    fn a_record_over_the_bulk_limit_is_told_with_the_setting_to_change() {
        let over = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "An error was signalled by the server",
            "Protocol error: invalid bulk length".to_owned(),
        ));
        let error = operation_error(over, "k");
        assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
        assert!(error.to_string().contains("proto-max-bulk-len"), "{error}");
    }

    #[test]
    fn in_flight_values_round_trip() {
        let held = InFlight {
            fingerprint: Fingerprint::from_bytes([3; 32]),
            lease_token: LeaseToken::random(),
            lease_expires_at: 1_700_000_000_123,
        };
        let encoded = encode_in_flight(&held);
        assert_eq!(
            Completed::encoded_expires_at(&encoded),
            held.lease_expires_at
        );
        let decoded = decode(encoded).expect("decodes");
        assert_eq!(decoded, Record::InFlight(held));
    }

    #[test]
    fn a_truncated_in_flight_value_is_an_error() {
        let held = InFlight {
            fingerprint: Fingerprint::from_bytes([3; 32]),
            lease_token: LeaseToken::random(),
            lease_expires_at: 1,
        };
        let encoded = encode_in_flight(&held);
        assert!(decode(encoded.slice(..40)).is_err());
    }

    /// Random values, half of them tagged in flight, some of those the
    /// right length.
    fn any_value() -> impl Strategy<Value = Vec<u8>> {
        let tail = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            prop::collection::vec(any::<u8>(), IN_FLIGHT_LEN - 1),
        ];
        (any::<bool>(), tail).prop_map(|(tagged, tail)| {
            let tag = tagged.then_some(IN_FLIGHT_TAG);
            tag.into_iter().chain(tail).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_value_decodes_to_a_record_or_an_error(value in any_value()) {
            let in_flight = value.first() == Some(&IN_FLIGHT_TAG) && value.len() == IN_FLIGHT_LEN;
            match decode(Bytes::from(value)) {
                Ok(Record::InFlight(_)) => prop_assert!(in_flight),
                Ok(Record::Completed(_)) | Err(StoreError::Codec(_)) => prop_assert!(!in_flight),
                Err(error) => prop_assert!(false, "not a codec error: {error}"),
            }
        }
    }
}
