//! The server under load: started by pushload (`--server`) or already running
//! (`--devices`/`--api`).
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

use crate::procfs;

/// The server name device certificates are made for, as deployed devices expect it.
pub(crate) const TLS_SERVER_NAME: &str = "push-delivery";

/// Where the server is and how to watch it.
#[derive(Debug)]
pub(crate) struct Target {
    /// The device listener.
    pub(crate) devices: SocketAddr,
    /// The HTTP API's base URL, without a trailing slash (`http://host:port`).
    pub(crate) api: String,
    /// The server's process, when known: CPU and memory come from its `/proc` entry.
    pub(crate) pid: Option<u32>,
    /// The CA certificate (PEM) devices trust; `None` when they verify nothing.
    pub(crate) ca: Option<PathBuf>,
    child: Option<Child>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// How many of the server's last stderr lines are kept to explain a failure.
const TAIL_LINES: usize = 20;

impl Target {
    /// A server that is already running.
    pub(crate) fn attach(
        devices: SocketAddr,
        api: &str,
        pid: Option<u32>,
        ca: Option<PathBuf>,
    ) -> Self {
        Target {
            devices,
            api: api.trim_end_matches('/').to_owned(),
            pid,
            ca,
            child: None,
            tail: Arc::default(),
        }
    }

    /// Starts `command` (whitespace-separated words) with a generated configuration as its
    /// last argument, in `dir`, and waits up to `wait` for its listening lines.
    pub(crate) fn launch(
        command: &str,
        tls: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
        dir: &Path,
        wait: Duration,
    ) -> Result<Self> {
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
            devices: unspecified(),
            api: String::new(),
            pid: Some(pid),
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
                Err(_) => bail!(
                    "{program} did not say where it listens within {wait:?}; its last lines:\n{}",
                    target.tail()
                ),
            }
        }
        if let (Some(http), Some(devices)) = (http, devices) {
            target.api = format!("http://{http}");
            target.devices = devices;
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

    /// The server's CPU time so far (µs), when it is known.
    pub(crate) fn cpu_us(&self) -> Option<u64> {
        self.pid.and_then(|p| procfs::cpu_us(p).ok())
    }

    /// The server's resident memory (KiB), when it is known.
    pub(crate) fn rss_kb(&self) -> Option<u64> {
        self.pid.and_then(|p| procfs::rss_kb(p).ok())
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

/// A placeholder address until the server says where it listens.
fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A listening line of the server's log.
enum Listening {
    Http(SocketAddr),
    Devices(SocketAddr),
}

/// Reads the server's stderr to its end: passes on the listening lines, keeps the last
/// lines for error messages, and never lets the pipe fill.
fn drain(
    mut stderr: impl BufRead,
    tx: flume::Sender<Listening>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match stderr.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
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
}
