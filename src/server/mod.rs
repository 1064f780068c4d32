//! The server: the sharded broker, device listeners and the HTTP API on every shard, and
//! an orderly shutdown.
//!
//! [`Server::start`] takes a [`ServerConfig`], starts the shards, binds the HTTP and
//! device addresses on every shard (SO_REUSEPORT; a port of 0 is picked once and shared),
//! logs `listening for http on …` then `listening for devices on …`, and returns.
//! [`Server::shutdown`] stops accepting, ends every session (unacknowledged
//! notifications stay pending), and stops the shards.

mod limits;
mod listener;
mod migrate;
mod slots;
mod tally;
pub mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future::block_on;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::api::{ApiConfig, ApiContext, ConnectionCounters, Listener};
use crate::broker::BrokerError;
use crate::broker::sharded::{
    Shard, ShardId, ShardPlacement, ShardService, Sharded, ShardedBroker, ShardedBrokerBuilder,
};
use crate::config::ServerConfig;
use crate::logging::target;
use crate::session::SessionConfig;
use crate::store::{DataDir, InMemoryPendingStore, PendingStore};
use listener::{DeviceConfig, DeviceContext};
use tally::Tally;

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// An address in the configuration does not resolve.
    #[error("bad address {addr:?} for {key}")]
    Address {
        /// The configuration key.
        key: &'static str,
        /// The address given.
        addr: String,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS setup failed")]
    Tls(#[from] tls::TlsConfigError),
    /// The shards could not start (often: too little locked memory for io_uring).
    #[error(
        "cannot start the shards (io_uring needs at least 512 KiB of locked memory per \
         process; if the cause that follows is ENOMEM or MemLockLimit, raise it: ulimit -l 8192, \
         systemd LimitMEMLOCK=8M, docker --ulimit memlock=8388608)"
    )]
    Shards(#[source] glommio::GlommioError<()>),
    /// An address could not be bound.
    #[error("cannot listen on {addr} for {what}")]
    Bind {
        /// What the listener is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data folder (`data_dir`) could not be opened or recovered.
    #[error("cannot use the data folder")]
    DataDir(#[from] crate::store::DataDirError),
    /// A shard did not answer while starting.
    #[error("a shard did not answer while starting")]
    Broker(#[from] BrokerError),
    /// The configuration breaks a rule ([`ServerConfig::validate`]).
    #[error("bad configuration")]
    Config(#[from] crate::config::ConfigError),
    /// The stop signals could not be watched ([`Server::run_until_signal`]).
    #[error("cannot watch for SIGINT and SIGTERM")]
    Signals(#[source] std::io::Error),
    /// `addr` and `http_addr` name the same port on overlapping addresses: half the HTTP
    /// requests would reach the device listener.
    #[error("addr ({device}) and http_addr ({http}) must be different ports")]
    SameAddress {
        /// The device listener's address.
        device: SocketAddr,
        /// The HTTP listener's address.
        http: SocketAddr,
    },
    /// Something else listens on the address already: often a second pushbroker, which
    /// the shards' SO_REUSEPORT would otherwise let share the port.
    #[error("{addr} for {what} is in use (is another pushbroker running?)")]
    InUse {
        /// What the listener is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Refuses a device and an HTTP address that would share a port.
fn check_distinct(device: SocketAddr, http: SocketAddr) -> Result<(), ServerError> {
    let overlap =
        device.ip() == http.ip() || device.ip().is_unspecified() || http.ip().is_unspecified();
    if device.port() != 0 && device.port() == http.port() && overlap {
        return Err(ServerError::SameAddress { device, http });
    }
    Ok(())
}

/// Checks that nothing listens on `addr` yet. The shards bind with SO_REUSEPORT, which
/// the kernel lets any process of the same user share; a plain bind fails on a port
/// such sockets hold, so this one tells a second instance apart. It is closed at once
/// (a port 0 is always free).
fn check_free(what: &'static str, addr: SocketAddr) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
            Err(ServerError::InUse { what, addr, source })
        }
        Err(source) => Err(ServerError::Bind { what, addr, source }),
    }
}

fn resolve(key: &'static str, addr: &str) -> Result<SocketAddr, ServerError> {
    // Go's ":port" means every interface.
    let with_host;
    let addr = if addr.starts_with(':') {
        with_host = format!("0.0.0.0{addr}");
        &with_host
    } else {
        addr
    };
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ServerError::Address {
            key,
            addr: addr.to_owned(),
        })
}

/// A running server: started with [`Server::start`], stopped with [`Server::shutdown`].
///
/// # Example
///
/// A server on free ports, asked for its delivery hosts over HTTP, then shut down.
///
/// ```
/// use std::io::{Read, Write};
/// use std::time::Duration;
/// use pushbroker::{Server, ServerConfig};
///
/// let config = ServerConfig {
///     addr: "127.0.0.1:0".into(),
///     http_addr: "127.0.0.1:0".into(),
///     ..ServerConfig::default()
/// };
/// let server = Server::start(&config)?;
/// let mut http = std::net::TcpStream::connect(server.http_addr())?;
/// http.write_all(b"GET /delivery-hosts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
/// let mut answer = String::new();
/// http.read_to_string(&mut answer)?;
/// assert!(answer.starts_with("HTTP/1.1 200"));
/// assert!(answer.contains(&server.device_addr().to_string()));
/// server.shutdown(Duration::from_secs(2));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Server {
    broker: ShardedBroker,
    http_addr: SocketAddr,
    device_addr: SocketAddr,
    /// The server's part of every shard.
    shards: Sharded<ServerShard>,
}

impl Server {
    /// Starts the shards and listeners of `config`.
    ///
    /// # Errors
    /// A [`ServerError`] saying what could not be set up; nothing is left running then.
    pub fn start(config: &ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let http_addr = resolve("http_addr", &config.http_addr)?;
        let device_addr = resolve("addr", &config.addr)?;
        check_distinct(device_addr, http_addr)?;
        check_free("http", http_addr)?;
        check_free("devices", device_addr)?;
        let tls = match (&config.cert_pem_file, &config.key_pem_file) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            _ => None,
        };
        let mut builder = ShardedBrokerBuilder::new(config.shard_count());
        builder = builder
            .config(config)
            .max_notifications_per_app(config.max_notifications_per_app)
            .placement(ShardPlacement::Auto);
        let backlog = config.broadcast_backlog;
        if let Some(url) = &config.redis_url {
            let mut cluster = crate::cluster::ClusterConfig::new(url, backlog);
            if let Some(id) = &config.node_id {
                cluster.node_id = id.clone();
            }
            info!(target: target::SERVER, "node {} of the service on {}", cluster.node_id,
                crate::store::redis::RedisUrl::parse(url).map_or_else(|_| String::new(), |u| u.to_string()));
            builder = builder.cluster(cluster);
        }
        let mut recovered = None;
        builder = match &config.data_dir {
            // Recovery reads the logs here, before any shard runs.
            Some(dir) => {
                let data = DataDir::open(dir, config.shard_count(), config.durability, backlog)?;
                recovered = Some((dir.clone(), data.report().clone()));
                builder.store(move |id| data.store_for(id) as Rc<dyn PendingStore>)
            }
            None => builder.store(move |_| {
                Rc::new(InMemoryPendingStore::new().with_broadcast_backlog(backlog))
                    as Rc<dyn PendingStore>
            }),
        };
        let broker = builder.build();
        broker.start().map_err(ServerError::Shards)?;
        let n = broker.nr_shards();

        let api_config = ApiConfig {
            delivery_hosts: Vec::new(),
            delivery_domain: config.delivery_domain.clone(),
            http_read_timeout: config.http_read_timeout,
            http_write_timeout: config.http_write_timeout,
            statistics_auth: config
                .statistics_auth_user
                .clone()
                .zip(config.statistics_auth_password.clone()),
            max_body: 4096,
        };
        let device_config = DeviceConfig {
            session: SessionConfig {
                ping_interval: config.ping_interval,
                exchange_timeout: config.exchange_timeout,
            },
            tls,
            max_sessions: config.session_limit(),
        };
        let max_http = limits::share(config.max_http_connections, n);
        // Shard 0 binds first: a configured port 0 is picked there, and the other shards
        // join the picked ports (SO_REUSEPORT).
        let shards = Sharded::<ServerShard>::new(broker.sending());
        let (mut http_addr, mut device_addr) = (http_addr, device_addr);
        for i in 0..n {
            let started = block_on(shards.start_on(ShardId(i), {
                let api_config = api_config.clone();
                let device_config = device_config.clone();
                move |shard| {
                    ServerShard::bind(
                        shard,
                        http_addr,
                        device_addr,
                        api_config,
                        device_config,
                        max_http,
                    )
                }
            }));
            let bound = match started {
                Ok(Ok(bound)) => bound,
                Ok(Err(e)) => {
                    broker.stop_blocking();
                    return Err(e);
                }
                Err(e) => {
                    broker.stop_blocking();
                    return Err(e.into());
                }
            };
            (http_addr, device_addr) = bound;
        }
        if config.redis_url.is_some() {
            wait_for_redis(&broker, n);
        }
        // Every shard is bound and can take migrated connections: log, then accept.
        info!(target: target::SERVER, "listening for http on {http_addr}");
        info!(target: target::SERVER, "listening for devices on {device_addr}");
        // After the listening lines, which tools expect first.
        if let Some((dir, report)) = recovered {
            for w in &report.warnings {
                warn!(target: target::SERVER, "{w}");
            }
            info!(target: target::SERVER, "data in {}: {report}", dir.display());
        }
        for i in 0..n {
            if let Err(e) = block_on(shards.invoke_on(ShardId(i), |s| s.begin_serving())) {
                broker.stop_blocking();
                return Err(e.into());
            }
        }
        debug!(target: target::SERVER, shards = n, "server started");
        Ok(Server {
            broker,
            http_addr,
            device_addr,
            shards,
        })
    }

    /// Runs a server on `config` until the process gets SIGINT or SIGTERM, then shuts it
    /// down ([`Server::shutdown`] with `grace`) and returns: what the `pushbroker` binary
    /// does. The signals are watched before anything starts, so none is missed;
    /// `started` is called once the server listens (to print where, say).
    ///
    /// Blocks the calling thread; the shards run on their own threads.
    ///
    /// # Errors
    /// A [`ServerError`] when the server cannot start or the signals cannot be watched.
    ///
    /// # Example
    /// ```no_run
    /// use std::time::Duration;
    /// use pushbroker::{Server, ServerConfig};
    ///
    /// let config = ServerConfig::embedded_default();
    /// Server::run_until_signal(&config, Duration::from_secs(2), |server| {
    ///     println!("devices connect to {}", server.device_addr());
    /// })?;
    /// # Ok::<(), pushbroker::ServerError>(())
    /// ```
    pub fn run_until_signal(
        config: &ServerConfig,
        grace: Duration,
        started: impl FnOnce(&Server),
    ) -> Result<(), ServerError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(ServerError::Signals)?;
        let server = Server::start(config)?;
        started(&server);
        // Blocks until SIGINT or SIGTERM.
        let _ = signals.forever().next();
        server.shutdown(grace);
        signals.handle().close();
        Ok(())
    }

    /// The HTTP API's address (the bound one: a configured port 0 is resolved).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The device listener's address (the bound one).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// The sharded broker.
    pub fn broker(&self) -> &ShardedBroker {
        &self.broker
    }

    /// Shuts down in order, blocking the calling thread (not for use on a shard):
    /// 1. stops accepting on both listeners and lets each HTTP connection finish the
    ///    request it is serving (then close), waiting up to `grace` for them: nothing
    ///    answered is cut off;
    /// 2. ends every session (unacknowledged notifications stay pending), waiting up to
    ///    `grace` again;
    /// 3. stops the shards (bounded too: see [`ShardedBroker::stop_blocking`]).
    ///
    /// Each step runs on every shard at once, and each shard's server part answers when
    /// its step is done (no polling).
    pub fn shutdown(self, grace: Duration) {
        let shards = &self.shards;
        within(
            grace,
            shards.invoke_on_all(move |s| async move { s.stop_accepting(grace).await }),
        );
        within(
            grace,
            shards.invoke_on_all(move |s| async move { s.end_sessions(grace).await }),
        );
        within(grace, shards.stop());
        self.broker.stop_blocking();
    }
}

/// Runs `work` on the calling thread until it is done or `grace` and a second have
/// passed: the shards bound each step by `grace` themselves; this bounds a shard that
/// does not answer at all.
fn within<F: Future>(grace: Duration, work: F) {
    let (cancel, cancelled) = flume::bounded::<()>(1);
    let (fire, deadline) = flume::bounded::<()>(1);
    let limit = grace + Duration::from_secs(1);
    let timer = std::thread::Builder::new()
        .name("shutdown-deadline".into())
        .spawn(move || {
            // Fires at the deadline; ends early once `cancel` is dropped (the work done).
            if let Err(flume::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                let _ = fire.send(());
            }
        });
    let Ok(timer) = timer else {
        // No thread for the deadline: the shards bound the step by `grace` themselves.
        block_on(work);
        return;
    };
    block_on(futures_lite::future::or(
        async {
            work.await;
        },
        async {
            let _ = deadline.recv_async().await;
        },
    ));
    drop(cancel);
    let _ = timer.join();
}

/// The server's part of one shard (a [`ShardService`] in the shard's slot): its HTTP and
/// device listeners, bound, then serving; the API and device contexts; the open HTTP
/// connections; and the two steps of its stop.
pub(crate) struct ServerShard {
    api: Rc<ApiContext>,
    devices: Rc<DeviceContext>,
    /// The listeners, bound and not yet accepting (until [`ServerShard::begin_serving`]).
    bound: std::cell::RefCell<Option<(glommio::net::TcpListener, glommio::net::TcpListener)>>,
    /// HTTP connections this shard may hold.
    max_http: usize,
    /// Closed first: no more accepting; HTTP connections finish what they serve and close.
    accepting: Rc<glommio::sync::Semaphore>,
    /// HTTP connections open on this shard.
    http_open: Rc<Tally>,
}

/// Waits (a few seconds at most) until every shard has loaded the broadcast channel from
/// Redis, so the first devices see the service's levels; a Redis that is down by then is
/// no error (the shards keep trying, and the API answers 503 meanwhile).
fn wait_for_redis(broker: &ShardedBroker, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let ready = (0..n).all(|i| {
            block_on(
                broker
                    .sending()
                    .run_on(ShardId(i), |s| s.cluster().is_some_and(|c| c.is_ready())),
            )
            .unwrap_or(false)
        });
        if ready {
            return;
        }
        if std::time::Instant::now() >= deadline {
            warn!(target: target::SERVER, "redis: not reachable yet; notifies and broadcasts answer 503 until it is");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl ServerShard {
    /// Binds this shard's HTTP and device listeners (not accepting yet); the service and
    /// the addresses bound (with a configured port 0 resolved).
    fn bind(
        shard: &Shard,
        http_addr: SocketAddr,
        device_addr: SocketAddr,
        mut api_config: ApiConfig,
        device_config: DeviceConfig,
        max_http: usize,
    ) -> Result<(ServerShard, (SocketAddr, SocketAddr)), ServerError> {
        let bind = |what, addr| {
            listener::bind(addr)
                .and_then(|l| Ok((l.local_addr().map_err(std::io::Error::from)?, l)))
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        let (http_addr, http) = bind("http", http_addr)?;
        let (device_addr, devices) = bind("devices", device_addr)?;
        api_config.delivery_hosts = vec![device_addr.to_string()];
        if let Some(cluster) = shard.cluster() {
            cluster.advertise(api_config.delivery_hosts.clone());
        }
        // Closed once HTTP is done: sessions end.
        let sessions_end = Rc::new(glommio::sync::Semaphore::new(0));
        let service = ServerShard {
            api: Rc::new(ApiContext::new(shard.clone(), api_config)),
            devices: Rc::new(DeviceContext::new(
                shard.clone(),
                device_config,
                sessions_end,
            )),
            bound: std::cell::RefCell::new(Some((http, devices))),
            max_http,
            accepting: Rc::new(glommio::sync::Semaphore::new(0)),
            http_open: Rc::new(Tally::default()),
        };
        Ok((service, (http_addr, device_addr)))
    }

    /// This shard's device side.
    pub(crate) fn devices(&self) -> Rc<DeviceContext> {
        Rc::clone(&self.devices)
    }

    /// Starts this shard's accept loops: once every shard is bound (so no connection
    /// migrates to a shard that cannot take it, and the listening lines come first).
    fn begin_serving(&self) {
        let Some((http, devices)) = self.bound.borrow_mut().take() else {
            return;
        };
        glommio::spawn_local(serve_http(
            http,
            Rc::clone(&self.api),
            self.max_http,
            Rc::clone(&self.http_open),
            Rc::clone(&self.accepting),
        ))
        .detach();
        glommio::spawn_local(listener::serve_devices(
            devices,
            Rc::clone(&self.devices),
            Rc::clone(&self.accepting),
        ))
        .detach();
    }

    /// Step 1 of the stop: no more accepting; waits up to `grace` for the open HTTP
    /// connections to finish what they serve and close.
    async fn stop_accepting(&self, grace: Duration) {
        self.accepting.close();
        self.bound.borrow_mut().take();
        let _ = glommio::timer::timeout(grace, async {
            self.http_open.zero().await;
            Ok(())
        })
        .await;
    }

    /// Step 2 of the stop: ends every session (unacknowledged notifications stay
    /// pending), waiting up to `grace` for them to close.
    async fn end_sessions(&self, grace: Duration) {
        self.devices.stop();
        self.devices.shutdown.close();
        let _ = glommio::timer::timeout(grace, async {
            self.devices.live.zero().await;
            Ok(())
        })
        .await;
    }
}

impl Drop for ServerShard {
    /// A shard that stops without the server's steps (its services dropped with it) sends
    /// no more slots either.
    fn drop(&mut self) {
        self.devices.stop();
    }
}

impl ShardService for ServerShard {
    /// Both steps, without waiting: whatever is still open is cut off when the shard
    /// stops.
    fn stop(self: Rc<Self>) -> std::pin::Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            self.stop_accepting(Duration::ZERO).await;
            self.end_sessions(Duration::ZERO).await;
        })
    }
}

/// Counts one open HTTP connection while it lives.
struct OpenConnection(Rc<Tally>);

impl OpenConnection {
    fn new(tally: &Rc<Tally>) -> Self {
        tally.up();
        OpenConnection(Rc::clone(tally))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.down();
    }
}

/// Accepts HTTP connections on this shard until shutdown; each connection then finishes
/// what it serves and closes. Past `max` open connections a new one is closed at once.
async fn serve_http(
    listener: glommio::net::TcpListener,
    api: Rc<ApiContext>,
    max: usize,
    open: Rc<Tally>,
    accepting: Rc<glommio::sync::Semaphore>,
) {
    let limit_warning = limits::Throttle::default();
    let accept_warning = limits::Throttle::default();
    let backoff = limits::Backoff::default();
    let shard = api.shard().clone();
    let counters = shard.service_or_default::<ConnectionCounters>();
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            listener::shutdown(&accepting).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) if open.get() >= max => {
                backoff.succeeded();
                counters.count_rejected(Listener::Http);
                if let Some(more) = limit_warning.pass() {
                    warn!(
                        target: target::SERVER,
                        "http connections at the limit ({max} on shard {}); closing new ones \
                         ({more} more since the last warning)",
                        shard.id()
                    );
                }
                drop(stream);
            }
            Some(Ok(stream)) => {
                backoff.succeeded();
                let open = OpenConnection::new(&open);
                let api = Rc::clone(&api);
                let accepting = Rc::clone(&accepting);
                glommio::spawn_local(async move {
                    let stop = async move { listener::shutdown(&accepting).await };
                    crate::api::serve_connection_until(stream, api, stop).await;
                    drop(open);
                })
                .detach();
            }
            Some(Err(e)) => {
                counters.count_accept_error(Listener::Http);
                if let Some(more) = accept_warning.pass() {
                    warn!(
                        target: target::SERVER,
                        "http accept failed: {e} ({more} more since the last warning)"
                    );
                }
                glommio::timer::sleep(backoff.failed()).await;
            }
        }
    }
}

impl crate::broker::BrokerConfig for ServerConfig {
    fn session_queue_size(&self) -> usize {
        self.session_queue_size
    }

    fn broker_queue_size(&self) -> usize {
        self.broker_queue_size
    }
}
