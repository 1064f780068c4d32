//! The server under load: started by pushload (`--server`) or already running
//! (`--devices`/`--api`), perhaps as several nodes sharing one store: then sessions are
//! spread over the nodes' device listeners ([`device_addr`]), API calls over their APIs
//! ([`Spread`]), and CPU and memory are summed over their processes.
//!
//! A started server gets a configuration file with the original server's keys (both
//! listeners on port 0 of 127.0.0.1, and with TLS a certificate for `push-delivery` signed
//! by a fresh CA), runs in its own process group, and announces its ports in the two
//! `listening for` log lines. Its stderr is drained for the whole run, and it is killed
//! when the run ends.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::ApiSpread;
use crate::procfs;

/// The server name device certificates are made for, as deployed devices expect it.
pub(crate) const TLS_SERVER_NAME: &str = "push-delivery";

/// Where the server is and how to watch it.
#[derive(Debug)]
pub(crate) struct Target {
    /// The device listeners, one per node: session i connects to the (i mod n)-th.
    pub(crate) devices: Vec<SocketAddr>,
    /// The HTTP APIs' base URLs, without a trailing slash (`http://host:port`), one per
    /// node.
    pub(crate) apis: Vec<String>,
    /// How API calls are spread over [`Target::apis`].
    pub(crate) spread: Spread,
    /// The server processes, when known: CPU and memory come from their `/proc` entries
    /// and are summed.
    pub(crate) pids: Vec<u32>,
    /// The CA certificate (PEM) devices trust; `None` when they verify nothing.
    pub(crate) ca: Option<PathBuf>,
    child: Option<Child>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// How many of the server's last stderr lines are kept to explain a failure.
const TAIL_LINES: usize = 20;

/// The device address session `index` connects to, every time: the (index mod n)-th of
/// `devices`. `None` when there is none.
pub(crate) fn device_addr(devices: &[SocketAddr], index: u32) -> Option<SocketAddr> {
    let n = devices.len();
    (n > 0).then(|| devices[index as usize % n])
}

/// Which API each call goes to, as indexes into [`Target::apis`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spread {
    mode: ApiSpread,
    apis: usize,
    devices: usize,
}

impl Spread {
    /// The spread of `mode` over `apis` APIs for devices on `devices` addresses. The
    /// same-node and cross-node spreads pair the i-th API with the i-th device address,
    /// so they need as many of each; cross-node needs two nodes at least.
    pub(crate) fn new(mode: ApiSpread, apis: usize, devices: usize) -> Result<Self> {
        if apis == 0 || devices == 0 {
            bail!("no --api or no --devices address");
        }
        if mode != ApiSpread::RoundRobin && apis != devices {
            bail!(
                "--api-spread {} pairs each --api with the --devices address at its place: \
                 give as many of each (got {apis} and {devices})",
                mode.name()
            );
        }
        if mode == ApiSpread::CrossNode && apis < 2 {
            bail!("--api-spread cross-node needs two nodes or more");
        }
        Ok(Spread {
            mode,
            apis,
            devices,
        })
    }

    /// The spread's mode.
    pub(crate) fn mode(self) -> ApiSpread {
        self.mode
    }

    /// The API notify `k` (counting from 0) for device `device` goes to.
    pub(crate) fn notify(self, k: usize, device: u32) -> usize {
        let node = device as usize % self.devices;
        match self.mode {
            ApiSpread::RoundRobin => k % self.apis,
            ApiSpread::SameNode => node % self.apis,
            ApiSpread::CrossNode => (node + 1) % self.apis,
        }
    }

    /// The API broadcast `k` (counting from 0) goes to: each in turn, whatever the mode
    /// (a broadcast is for every device, on every node).
    pub(crate) fn broadcast(self, k: usize) -> usize {
        k % self.apis
    }
}

/// The sum of `figures`, when there is at least one and each is known.
pub(crate) fn sum_known(figures: &[Option<u64>]) -> Option<u64> {
    if figures.is_empty() {
        return None;
    }
    figures.iter().copied().sum()
}

impl Target {
    /// Servers that are already running: one or several nodes.
    pub(crate) fn attach(
        devices: &[SocketAddr],
        apis: &[String],
        spread: ApiSpread,
        pids: &[u32],
        ca: Option<PathBuf>,
    ) -> Result<Self> {
        Ok(Target {
            devices: devices.to_vec(),
            apis: apis
                .iter()
                .map(|a| a.trim_end_matches('/').to_owned())
                .collect(),
            spread: Spread::new(spread, apis.len(), devices.len())?,
            pids: pids.to_vec(),
            ca,
            child: None,
            tail: Arc::default(),
        })
    }

    /// Starts `command` (whitespace-separated words) with a generated configuration as its
    /// last argument, in `dir`, and waits up to `wait` for its listening lines.
    pub(crate) fn launch(
        command: &str,
        tls: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
        dir: &Path,
        spread: ApiSpread,
        wait: Duration,
    ) -> Result<Self> {
        let spread = Spread::new(spread, 1, 1)?;
        let mut words = command.split_whitespace();
        let Some(program) = words.next() else {
            bail!("--server needs a command");
        };
        let mut config = serde_json::json!({
            "addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "exchange_timeout": "5s",
            "ping_interval": "10s",
            "session_queue_size": 10,
            "broker_queue_size": 10000,
            "http_read_timeout": "5s",
            "http_write_timeout": "5s",
            "max_notifications_per_app": 100,
            "delivery_domain": "",
        });
        let ca = if tls {
            let ca = write_certificates(dir)?;
            config["key_pem_file"] = dir.join("key.pem").display().to_string().into();
            config["cert_pem_file"] = dir.join("cert.pem").display().to_string().into();
            Some(ca)
        } else {
            None
        };
        if let Some(obj) = config.as_object_mut() {
            obj.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let config_path = dir.join("server.json");
        std::fs::write(&config_path, config.to_string())
            .with_context(|| format!("cannot write {}", config_path.display()))?;

        let mut child = Command::new(program)
            .args(words)
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let pid = child.id();
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, rx) = flume::unbounded();
        let Some(stderr) = child.stderr.take() else {
            bail!("no stderr from {program}");
        };
        let lines = Arc::clone(&tail);
        std::thread::Builder::new()
            .name("server-stderr".into())
            .spawn(move || drain(BufReader::new(stderr), tx, lines))
            .context("cannot start a thread")?;

        let mut target = Target {
            devices: Vec::new(),
            apis: Vec::new(),
            spread,
            pids: vec![pid],
            ca,
            child: Some(child),
            tail,
        };
        let (mut http, mut devices) = (None, None);
        let deadline = std::time::Instant::now() + wait;
        while http.is_none() || devices.is_none() {
            match rx.recv_deadline(deadline) {
                Ok(Listening::Http(a)) => http = Some(a),
                Ok(Listening::Devices(a)) => devices = Some(a),
                // Its stderr closed: it exited (or closed stderr) without saying.
                Err(flume::RecvTimeoutError::Disconnected) => {
                    let status = target.child.as_mut().and_then(exit_status);
                    bail!(
                        "{program} ended before saying where it listens ({}); its last lines:\n{}",
                        status.map_or_else(
                            || "it closed its stderr and is still running".to_owned(),
                            |s| s.to_string()
                        ),
                        target.tail()
                    )
                }
                Err(flume::RecvTimeoutError::Timeout) => bail!(
                    "{program} did not say where it listens within {wait:?}; its last lines:\n{}",
                    target.tail()
                ),
            }
        }
        if let (Some(http), Some(devices)) = (http, devices) {
            target.apis = vec![format!("http://{http}")];
            target.devices = vec![devices];
        }
        Ok(target)
    }

    /// The process id of a server pushload started (also its process group).
    pub(crate) fn started_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's last stderr lines.
    pub(crate) fn tail(&self) -> String {
        match self.tail.lock() {
            Ok(t) => t.iter().cloned().collect::<Vec<_>>().join("\n"),
            Err(_) => String::new(),
        }
    }

    /// Each server process's CPU time so far (µs), in `--pid` order; `None` for one
    /// whose time cannot be read. [`sum_known`] of them is the server's.
    pub(crate) fn cpu_us_each(&self) -> Vec<Option<u64>> {
        self.pids.iter().map(|&p| procfs::cpu_us(p).ok()).collect()
    }

    /// The server processes' resident memory (KiB), summed, when each is known.
    pub(crate) fn rss_kb(&self) -> Option<u64> {
        let each: Vec<Option<u64>> = self.pids.iter().map(|&p| procfs::rss_kb(p).ok()).collect();
        sum_known(&each)
    }

    /// Whether a server pushload started has exited.
    pub(crate) fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops a server pushload started: SIGTERM to its group, SIGKILL after a grace period.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..50 {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening line of the server's log.
enum Listening {
    Http(SocketAddr),
    Devices(SocketAddr),
}

/// How `child` ended, waiting for it a second at most.
fn exit_status(child: &mut Child) -> Option<std::process::ExitStatus> {
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
    None
}

/// Reads the server's stderr to its end: passes on the listening lines, keeps the last
/// lines for error messages, and never lets the pipe fill (a line that is not UTF-8 is
/// read lossily, not taken for the end).
fn drain(
    mut stderr: impl BufRead,
    tx: flume::Sender<Listening>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match stderr.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        let text = line.trim_end();
        if let Some(addr) = listening_addr(text, "INFO listening for http on ") {
            let _ = tx.send(Listening::Http(addr));
        } else if let Some(addr) = listening_addr(text, "INFO listening for devices on ") {
            let _ = tx.send(Listening::Devices(addr));
        }
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text.to_owned());
        }
    }
}

/// The address at the end of a `listening for` line. A line is
/// `YYYY/MM/DD HH:MM:SS.uuuuuu INFO listening for … on HOST:PORT`.
fn listening_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    let at = line.find(marker)?;
    line[at + marker.len()..].trim().parse().ok()
}

/// Writes a CA and a certificate for [`TLS_SERVER_NAME`] it signed (`cert.pem`,
/// `key.pem`, `ca.pem`) into `dir`; returns the CA's path.
fn write_certificates(dir: &Path) -> Result<PathBuf> {
    let ca_key = rcgen::KeyPair::generate().context("cannot make a key")?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).context("cannot make a CA")?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pushload CA");
    let ca = ca_params
        .self_signed(&ca_key)
        .context("cannot sign the CA")?;
    let key = rcgen::KeyPair::generate().context("cannot make a key")?;
    let cert = rcgen::CertificateParams::new(vec![TLS_SERVER_NAME.to_owned()])
        .context("cannot make a certificate")?
        .signed_by(&key, &ca, &ca_key)
        .context("cannot sign the certificate")?;
    let ca_path = dir.join("ca.pem");
    for (name, pem) in [
        ("cert.pem", cert.pem()),
        ("key.pem", key.serialize_pem()),
        ("ca.pem", ca.pem()),
    ] {
        std::fs::write(dir.join(name), pem).with_context(|| format!("cannot write {name}"))?;
    }
    Ok(ca_path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_from_listening_lines() {
        let line = "2026/12/01 08:00:00.000001 INFO listening for devices on 127.0.0.1:9090";
        assert_eq!(
            listening_addr(line, "INFO listening for devices on "),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(listening_addr(line, "INFO listening for http on "), None);
    }

    #[test]
    fn sessions_go_round_robin_over_the_device_addresses() {
        let a: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let c: SocketAddr = "[::1]:7003".parse().unwrap();
        assert_eq!(device_addr(&[a], 0), Some(a));
        assert_eq!(device_addr(&[a], 12_345), Some(a));
        let three = [a, b, c];
        let got: Vec<_> = (0..7).filter_map(|i| device_addr(&three, i)).collect();
        assert_eq!(got, [a, b, c, a, b, c, a]);
        // The last index there is still maps, and each address gets its share.
        assert_eq!(
            device_addr(&three, u32::MAX),
            Some(three[u32::MAX as usize % 3])
        );
        let on_b = (0..300)
            .filter(|&i| device_addr(&three, i) == Some(b))
            .count();
        assert_eq!(on_b, 100);
        assert_eq!(device_addr(&[], 3), None);
    }

    #[test]
    fn round_robin_sends_call_k_to_api_k_mod_m() {
        let s = Spread::new(ApiSpread::RoundRobin, 3, 2).unwrap();
        let notifies: Vec<_> = (0..7).map(|k| s.notify(k, 1)).collect();
        assert_eq!(notifies, [0, 1, 2, 0, 1, 2, 0]);
        let broadcasts: Vec<_> = (0..4).map(|k| s.broadcast(k)).collect();
        assert_eq!(broadcasts, [0, 1, 2, 0]);
        // One API takes everything, as before there were several.
        let one = Spread::new(ApiSpread::RoundRobin, 1, 1).unwrap();
        assert!((0..10).all(|k| one.notify(k, k as u32 * 7) == 0 && one.broadcast(k) == 0));
    }

    #[test]
    fn same_node_and_cross_node_follow_the_device_address() {
        let same = Spread::new(ApiSpread::SameNode, 3, 3).unwrap();
        let cross = Spread::new(ApiSpread::CrossNode, 3, 3).unwrap();
        let devices =
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].map(|a| a.parse::<SocketAddr>().unwrap());
        for device in 0..30u32 {
            let node = devices
                .iter()
                .position(|&a| device_addr(&devices, device) == Some(a))
                .unwrap();
            for k in [0, 1, 2, 5] {
                assert_eq!(same.notify(k, device), node, "device {device}");
                assert_eq!(cross.notify(k, device), (node + 1) % 3, "device {device}");
            }
        }
        // Broadcasts still take each API in turn.
        assert_eq!(
            (0..4).map(|k| cross.broadcast(k)).collect::<Vec<_>>(),
            [0, 1, 2, 0]
        );
    }

    #[test]
    fn pairing_spreads_need_matching_lists() {
        assert!(Spread::new(ApiSpread::SameNode, 2, 3).is_err());
        assert!(Spread::new(ApiSpread::CrossNode, 1, 1).is_err());
        assert!(Spread::new(ApiSpread::CrossNode, 2, 2).is_ok());
        assert!(Spread::new(ApiSpread::RoundRobin, 2, 3).is_ok());
        assert!(Spread::new(ApiSpread::RoundRobin, 0, 1).is_err());
    }

    #[test]
    fn figures_of_several_processes_add_up_only_when_all_are_known() {
        assert_eq!(sum_known(&[Some(3)]), Some(3));
        assert_eq!(sum_known(&[Some(3), Some(4)]), Some(7));
        assert_eq!(sum_known(&[Some(3), None]), None);
        assert_eq!(sum_known(&[]), None);
    }

    #[test]
    fn measures_several_processes_summed() {
        let me = std::process::id();
        let target = Target::attach(
            &["127.0.0.1:1".parse().unwrap()],
            &["http://127.0.0.1:2/".to_owned()],
            ApiSpread::RoundRobin,
            &[me, me],
            None,
        )
        .unwrap();
        assert_eq!(target.apis, ["http://127.0.0.1:2"]);
        let each = target.cpu_us_each();
        assert_eq!(each.len(), 2);
        assert!(each.iter().all(Option::is_some));
        let sum = sum_known(&target.cpu_us_each()).unwrap();
        // Two readings of one process, a moment apart: the sum is about twice one.
        assert!(sum >= 2 * each[0].unwrap(), "{sum} vs {each:?}");
        let one = procfs::rss_kb(me).unwrap();
        assert!(target.rss_kb().unwrap() >= one);
    }
}
