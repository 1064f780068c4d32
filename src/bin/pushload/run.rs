//! The coordinator: starts or finds the server, starts the worker processes, drives the
//! scenario through the HTTP API, checks every delivery the workers report, and measures
//! the server and itself from `/proc`.

use std::cell::{Cell, RefCell};
use std::io::{BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use crate::http::ApiClient;
use crate::link::{self, Command, Event, FromWorker, Receipt, ReceiptKind, WorkerSpec};
use crate::procfs::{self, now_ns};
use crate::report::{Percentiles, Report};
use crate::target::{Spread, Target, sum_known};
use crate::wire;
use crate::{Options, Scenario};

/// Expiry of every notify pushload sends: far enough never to matter (each goes to one of
/// this run's own devices).
const EXPIRE_ON: &str = "2099-01-01T00:00:00Z";
/// Without `--notify-rate`, churn spreads its notifies over this many seconds.
const CHURN_SECS: f64 = 10.0;
/// The application id of pushload's notifications.
const APP_ID: &str = "com.example.pushload_pushload";

/// The worker processes and what they say.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: flume::Receiver<Option<FromWorker>>,
}

impl Workers {
    /// Starts one worker process per spec (this executable with `--worker`), and a thread
    /// per worker that passes its frames on.
    fn spawn(specs: Vec<WorkerSpec>) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find pushload's own executable")?;
        let (tx, rx) = flume::unbounded();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for spec in specs {
            let mut child = Process::new(&exe)
                .arg("--worker")
                .arg(serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start a worker process")?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("a worker process has no pipes");
            };
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("worker-in".into())
                .spawn(move || {
                    let mut input = BufReader::with_capacity(1 << 16, stdout);
                    while let Ok(Some(frame)) = link::read_frame(&mut input) {
                        if tx.send(Some(frame)).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(None);
                })
                .context("cannot start a thread")?;
            children.push(child);
            stdins.push(stdin);
        }
        Ok(Workers {
            children,
            stdins,
            rx,
        })
    }

    /// Tells every worker `command`.
    fn send(&mut self, command: Command) -> Result<()> {
        let mut line = serde_json::to_string(&command)?;
        line.push('\n');
        for stdin in &mut self.stdins {
            stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush())
                .context("a worker process is gone")?;
        }
        Ok(())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every delivery the workers report, checked against what was sent.
struct Tally {
    /// Sessions asked for (device indexes below it are valid).
    sessions: u32,
    /// Per broadcast: which devices have it (a bit each).
    bcast_seen: Vec<Vec<u64>>,
    /// Per broadcast: how many devices have it.
    bcast_count: Vec<u32>,
    /// Per broadcast: whether the server accepted it.
    bcast_posted: Vec<bool>,
    /// Per broadcast: when it was posted.
    bcast_post_ns: Vec<u64>,
    /// Per broadcast: when the last device read it.
    bcast_last_ns: Vec<u64>,
    /// Per notify: the device it is for.
    notify_target: Vec<u32>,
    /// Per notify: when it was posted (0: not yet).
    notify_post_ns: Vec<u64>,
    /// Per notify: the HTTP answer (0: none yet, 1: the call failed).
    notify_status: Vec<u16>,
    /// Per notify: whether it arrived.
    notify_seen: Vec<bool>,
    /// Notifies with an answer.
    notify_answered: u32,
    /// Notifies answered 200.
    notify_ok: u32,
    /// Notifies answered 200 that have arrived.
    notify_delivered_ok: u32,
    /// Deliveries of this run's payloads, each counted once.
    deliveries: u64,
    /// Deliveries that came again.
    duplicates: u64,
    /// Deliveries of something not sent, or to another device.
    wrong: u64,
    /// Sessions lost, connections failed, API calls failed or refused.
    errors: u64,
    /// A phase ran out of time.
    unfinished: bool,
    /// The first few problems, in words.
    problems: Vec<String>,
    /// API calls made, per API (notifies and broadcasts).
    api_calls: Vec<u64>,
    /// POST to delivery, per delivery, in µs.
    latency_us: Histogram<u64>,
    /// The live progress bar (hidden when stderr is not a terminal).
    progress: ProgressBar,
}

impl Tally {
    /// An error: a session lost, a connection failed, an API call failed or refused.
    fn problem(&mut self, what: String) {
        self.errors += 1;
        self.say(what);
    }

    /// A phase that ran out of time: the run is not ok, whatever its counts say.
    fn unfinished(&mut self, what: String) {
        self.unfinished = true;
        self.say(what);
    }

    /// Keeps `what` among the first few problems the report lists.
    fn say(&mut self, what: String) {
        if self.problems.len() < 10 {
            self.problems.push(what);
        }
    }

    /// Checks a batch of deliveries.
    fn receipts(&mut self, batch: &[Receipt]) {
        for r in batch {
            match r.kind {
                ReceiptKind::Broadcast => self.broadcast(r),
                ReceiptKind::Notify => self.notify(r),
            }
        }
        self.progress.inc(batch.len() as u64);
    }

    /// Checks a broadcast delivery: posted, to a known device, the first for it.
    fn broadcast(&mut self, r: &Receipt) {
        let k = r.item as usize;
        if k >= self.bcast_seen.len() || r.device >= self.sessions || !self.bcast_posted[k] {
            self.wrong += 1;
            return;
        }
        let (word, bit) = (r.device as usize / 64, 1u64 << (r.device % 64));
        if self.bcast_seen[k][word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.bcast_seen[k][word] |= bit;
        self.bcast_count[k] += 1;
        self.bcast_last_ns[k] = self.bcast_last_ns[k].max(r.at_ns);
        self.deliveries += 1;
        self.record_latency(r.at_ns, self.bcast_post_ns[k]);
    }

    /// Checks a notification: posted, to the device it was addressed to, the first time.
    fn notify(&mut self, r: &Receipt) {
        let n = r.item as usize;
        if n >= self.notify_target.len()
            || self.notify_post_ns[n] == 0
            || self.notify_target[n] != r.device
            || r.addressed != r.device
        {
            self.wrong += 1;
            return;
        }
        if self.notify_seen[n] {
            self.duplicates += 1;
            return;
        }
        self.notify_seen[n] = true;
        if self.notify_status[n] == 200 {
            self.notify_delivered_ok += 1;
        }
        self.deliveries += 1;
        self.record_latency(r.at_ns, self.notify_post_ns[n]);
    }

    /// Records the time from a POST to a delivery.
    fn record_latency(&mut self, at_ns: u64, posted_ns: u64) {
        let us = at_ns.saturating_sub(posted_ns) / 1000;
        let _ = self.latency_us.record(us.max(1));
    }

    /// Whether every notify has its answer and every accepted one has arrived.
    fn unicast_done(&self) -> bool {
        self.notify_answered as usize == self.notify_target.len()
            && self.notify_delivered_ok == self.notify_ok
    }
}

/// The coordinator's side of a run.
struct Coordinator {
    workers: Workers,
    tally: Rc<RefCell<Tally>>,
    /// Notified when an API call has its answer.
    answered: Rc<Notify>,
    ready: u32,
    threads: u32,
    connected_threads: u32,
    connected_ok: u32,
    connect_failed: u32,
    connect_us: Histogram<u64>,
    marks: Vec<u64>,
    settled_threads: u32,
    reconnects: u64,
    finals: u32,
    workers_gone: u32,
}

impl Coordinator {
    /// Handles what the workers say until `done` holds or `deadline` passes; says which.
    async fn pump(&mut self, deadline_ns: u64, done: impl Fn(&Coordinator) -> bool) -> bool {
        while !done(self) {
            let left = deadline_ns.saturating_sub(now_ns());
            if left == 0 || self.workers_gone as usize == self.workers.children.len() {
                return false;
            }
            // Wakes for what a worker says and for each API answer, since either may be
            // what `done` waits for.
            let next = tokio::select! {
                m = self.workers.rx.recv_async() => Ok(m),
                () = self.answered.notified() => continue,
                () = tokio::time::sleep(Duration::from_nanos(left)) => Err(()),
            };
            match next {
                Ok(Ok(Some(FromWorker::Receipts(batch)))) => {
                    self.tally.borrow_mut().receipts(&batch);
                }
                Ok(Ok(Some(FromWorker::Event(event)))) => self.event(event),
                Ok(Ok(None)) => {
                    // A worker's stream ends after its final word, in order: one that
                    // ends with fewer final words than ended streams ended early.
                    self.workers_gone += 1;
                    if self.finals < self.workers_gone {
                        self.tally
                            .borrow_mut()
                            .problem("a worker process ended early".into());
                    }
                }
                Ok(Err(_)) | Err(_) => {}
            }
        }
        true
    }

    /// Takes in what a worker said.
    fn event(&mut self, event: Event) {
        match event {
            Event::Ready { threads } => {
                self.ready += 1;
                self.threads += threads;
            }
            Event::Connected {
                ok,
                failed,
                first_error,
                connect_us,
            } => {
                self.connected_threads += 1;
                self.connected_ok += ok;
                self.connect_failed += failed;
                for us in connect_us {
                    let _ = self.connect_us.record(us.max(1));
                }
                if let Some(e) = first_error {
                    self.tally
                        .borrow_mut()
                        .problem(format!("{failed} devices could not connect, e.g. {e}"));
                }
            }
            Event::Mark { cpu_us } => self.marks.push(cpu_us),
            Event::Lost { device, reason } => self
                .tally
                .borrow_mut()
                .problem(format!("device {device} lost its connection: {reason}")),
            Event::Settled { reconnects } => {
                self.settled_threads += 1;
                self.reconnects += reconnects;
            }
            Event::Final { .. } => self.finals += 1,
        }
    }

    /// CPU time of pushload's processes so far (µs): this one and every worker.
    async fn client_cpu_us(&mut self, deadline_ns: u64) -> Result<u64> {
        self.marks.clear();
        self.workers.send(Command::Mark)?;
        let k = self.workers.children.len();
        if !self.pump(deadline_ns, |c| c.marks.len() == k).await {
            bail!("the worker processes did not answer");
        }
        Ok(self.marks.iter().sum::<u64>() + procfs::cpu_us(std::process::id()).unwrap_or(0))
    }
}

/// CPU, memory and time at the edges of a measured phase.
struct Meter {
    at_ns: u64,
    /// The server processes' CPU, summed when each is known.
    server_cpu_us: Option<u64>,
    /// Each server process's CPU, in `--pid` order.
    server_cpu_us_each: Vec<Option<u64>>,
    client_cpu_us: u64,
    /// This process's share of `client_cpu_us`.
    coordinator_cpu_us: u64,
}

impl Meter {
    /// Reads the clocks and CPU times now.
    async fn read(c: &mut Coordinator, target: &Target, deadline_ns: u64) -> Result<Self> {
        let client_cpu_us = c.client_cpu_us(deadline_ns).await?;
        let server_cpu_us_each = target.cpu_us_each();
        Ok(Meter {
            at_ns: now_ns(),
            server_cpu_us: sum_known(&server_cpu_us_each),
            server_cpu_us_each,
            client_cpu_us,
            coordinator_cpu_us: procfs::cpu_us(std::process::id()).unwrap_or(0),
        })
    }
}

/// Runs the whole load run and reports it.
pub(crate) fn run(opts: &Options) -> Result<Report> {
    let dir = scratch_dir()?;
    let timeout = Duration::from_secs(opts.timeout_secs);
    let mut target = match &opts.server {
        Some(cmd) => Target::launch(
            cmd,
            opts.tls,
            &opts.server_config,
            &dir,
            opts.api_spread,
            timeout,
        )?,
        None if !opts.devices.is_empty() && !opts.api.is_empty() => {
            if opts.tls && opts.ca.is_none() {
                bail!(
                    "--tls with --devices needs --ca FILE, the CA the server's certificate chains to"
                );
            }
            Target::attach(
                &opts.devices,
                &opts.api,
                opts.api_spread,
                &opts.pid,
                opts.ca.clone(),
            )?
        }
        None => bail!("give --server 'CMD ARGS', or --devices HOST:PORT with --api URL"),
    };
    if let Some(pid) = target.started_pid() {
        stop_server_on_signals(pid, dir.clone())?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start an executor")?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, drive(opts, &mut target));
    if target.exited() {
        let tail = target.tail();
        target.stop();
        let _ = std::fs::remove_dir_all(&dir);
        bail!("the server exited during the run; its last lines:\n{tail}");
    }
    target.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Kills the server pushload started (in its own process group, so a terminal's Ctrl-C
/// does not reach it) when pushload is interrupted or terminated, then exits.
fn stop_server_on_signals(pid: u32, dir: std::path::PathBuf) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot handle signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let group = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = std::fs::remove_dir_all(&dir);
                std::process::exit(128 + signal);
            }
        })
        .context("cannot start a thread")?;
    Ok(())
}

/// A new folder for the generated configuration and certificates.
fn scratch_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pushload-{}-{}", std::process::id(), now_ns()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    Ok(dir)
}

/// A latency histogram in µs.
fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; the bounds are valid constants.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the scenario against `target` and fills the report.
async fn drive(opts: &Options, target: &mut Target) -> Result<Report> {
    let n = opts.sessions;
    let k = opts.workers.clamp(1, n.max(1));
    let threads = opts.threads.max(1);
    let nonce = format!("{:x}", now_ns() % 0xffff_ffff);
    let churn_lifetime_s =
        (opts.scenario == Scenario::Churn).then(|| f64::from(n) / opts.churn_rate.max(0.001));
    let specs = (0..k)
        .map(|i| {
            let first = n / k * i + i.min(n % k);
            WorkerSpec {
                first,
                count: n / k + u32::from(i < n % k),
                threads,
                devices: target.devices.clone(),
                tls_ca: if opts.tls { target.ca.clone() } else { None },
                nonce: nonce.clone(),
                connect_concurrency: (opts.connect_concurrency / k).max(1),
                churn_lifetime_s,
                timeout_s: opts.timeout_secs,
            }
        })
        .collect();
    let progress = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec}") {
        progress.set_style(style.progress_chars("=> "));
    }
    let tally = Rc::new(RefCell::new(Tally {
        sessions: n,
        bcast_seen: Vec::new(),
        bcast_count: Vec::new(),
        bcast_posted: Vec::new(),
        bcast_post_ns: Vec::new(),
        bcast_last_ns: Vec::new(),
        notify_target: Vec::new(),
        notify_post_ns: Vec::new(),
        notify_status: Vec::new(),
        notify_seen: Vec::new(),
        notify_answered: 0,
        notify_ok: 0,
        notify_delivered_ok: 0,
        deliveries: 0,
        duplicates: 0,
        wrong: 0,
        errors: 0,
        unfinished: false,
        problems: Vec::new(),
        api_calls: vec![0; target.apis.len()],
        latency_us: histogram(),
        progress: progress.clone(),
    }));
    let mut c = Coordinator {
        workers: Workers::spawn(specs)?,
        tally: Rc::clone(&tally),
        answered: Rc::new(Notify::new()),
        ready: 0,
        threads: 0,
        connected_threads: 0,
        connected_ok: 0,
        connect_failed: 0,
        connect_us: histogram(),
        marks: Vec::new(),
        settled_threads: 0,
        reconnects: 0,
        finals: 0,
        workers_gone: 0,
    };
    let timeout = Duration::from_secs(opts.timeout_secs);
    let timeout_ns = opts.timeout_secs * 1_000_000_000;
    let deadline = || now_ns() + timeout_ns;
    let workers = c.workers.children.len();
    if !c.pump(deadline(), |c| c.ready as usize == workers).await {
        bail!("the worker processes did not start");
    }

    // Connect every device.
    progress.set_message("connect");
    progress.set_length(u64::from(n));
    let rss_before = target.rss_kb();
    let m0 = Meter::read(&mut c, target, deadline()).await?;
    c.workers.send(Command::Connect)?;
    let total_threads = c.threads;
    c.pump(deadline(), |c| c.connected_threads == total_threads)
        .await;
    let m1 = Meter::read(&mut c, target, deadline()).await?;
    progress.set_position(u64::from(c.connected_ok));
    let connected = c.connected_ok;
    let connect_s = (m1.at_ns - m0.at_ns) as f64 / 1e9;
    let mut report = Report::new(opts, k);
    report.devices.clone_from(&target.devices);
    report.apis.clone_from(&target.apis);
    report.api_spread = target.spread.mode().name().to_owned();
    report.pids.clone_from(&target.pids);
    report.sessions = connected;
    report.connects_per_s = (connected > 0).then(|| f64::from(connected) / connect_s);
    report.server_cpu_us_per_connect = per(cpu_delta(&m0, &m1), u64::from(connected));
    report.connect_ms = Percentiles::of(&c.connect_us);
    let rss_after = target.rss_kb();
    report.server_rss_per_session_kb = rss_per_session(rss_before, rss_after, connected);

    let phase = Phase {
        opts,
        target,
        tally: Rc::clone(&tally),
        progress: progress.clone(),
        nonce,
        connected,
        timeout,
    };
    let (start, end) = match opts.scenario {
        Scenario::Connect => (m0, m1),
        Scenario::Idle => {
            let end = idle(&phase, &mut c, &mut report, &m1, rss_before).await?;
            (m1, end)
        }
        Scenario::Broadcast => {
            let end = broadcast(&phase, &mut c, &mut report).await?;
            (m1, end)
        }
        Scenario::Unicast | Scenario::Churn => {
            let end = notifies(&phase, &mut c, &mut report, &m1).await?;
            (m1, end)
        }
    };
    progress.finish_and_clear();

    // Stop the workers and collect the last words.
    let workers_total = c.workers.children.len() as u32;
    let _ = c.workers.send(Command::Finish);
    c.pump(now_ns() + 5_000_000_000, |c| c.finals == workers_total)
        .await;

    let t = tally.borrow();
    report.deliveries = t.deliveries;
    report.duplicates = t.duplicates;
    report.wrong = t.wrong;
    report.errors = t.errors;
    report.problems = t.problems.clone();
    report.phase_s = (end.at_ns - start.at_ns) as f64 / 1e9;
    report.server_cpu_s = cpu_delta(&start, &end).map(|us| us as f64 / 1e6);
    report.server_cpu_s_per_pid = start
        .server_cpu_us_each
        .iter()
        .zip(&end.server_cpu_us_each)
        .map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?) as f64 / 1e6))
        .collect();
    report.api_calls.clone_from(&t.api_calls);
    let client_cpu_us = end.client_cpu_us.saturating_sub(start.client_cpu_us);
    report.client_cpu_s = client_cpu_us as f64 / 1e6;
    report.coordinator_cpu_s = end
        .coordinator_cpu_us
        .saturating_sub(start.coordinator_cpu_us) as f64
        / 1e6;
    report.latency_ms = if matches!(opts.scenario, Scenario::Connect | Scenario::Idle) {
        Percentiles::of(&c.connect_us)
    } else {
        Percentiles::of(&t.latency_us)
    };
    if t.deliveries > 0 {
        report.server_cpu_us_per_delivery = per(cpu_delta(&start, &end), t.deliveries);
        report.client_cpu_us_per_delivery = Some(client_cpu_us as f64 / t.deliveries as f64);
        report.deliveries_per_s = Some(t.deliveries as f64 / report.phase_s);
    }
    if connected < n {
        report
            .problems
            .push(format!("{} of {n} sessions did not connect", n - connected));
    }
    report.ok = connected == n
        && !t.unfinished
        && report.errors == 0
        && report.missing == 0
        && report.duplicates == 0
        && report.wrong == 0;
    Ok(report)
}

/// What a scenario's measured phase works with.
struct Phase<'a> {
    opts: &'a Options,
    target: &'a Target,
    tally: Rc<RefCell<Tally>>,
    progress: ProgressBar,
    /// This run's mark in device ids and payloads.
    nonce: String,
    /// Sessions that connected.
    connected: u32,
    /// Longest wait for one step.
    timeout: Duration,
}

impl Phase<'_> {
    /// When a step started now must be over.
    fn deadline(&self) -> u64 {
        now_ns() + u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// `idle`: holds the sessions; server memory per session and CPU per session-second.
async fn idle(
    p: &Phase<'_>,
    c: &mut Coordinator,
    report: &mut Report,
    start: &Meter,
    rss_before: Option<u64>,
) -> Result<Meter> {
    let (opts, target, progress, connected) = (p.opts, p.target, &p.progress, p.connected);
    let deadline = || p.deadline();
    progress.set_message("idle");
    let until = now_ns() + opts.idle_secs * 1_000_000_000;
    c.pump(until, |_| false).await;
    let end = Meter::read(c, target, deadline()).await?;
    report.server_rss_per_session_kb = rss_per_session(rss_before, target.rss_kb(), connected);
    let session_s = f64::from(connected) * (end.at_ns - start.at_ns) as f64 / 1e9;
    report.server_cpu_us_per_session_s = cpu_delta(start, &end)
        .filter(|_| session_s > 0.0)
        .map(|cpu| cpu as f64 / session_s);
    Ok(end)
}

/// `broadcast`: broadcasts one after another, each until every device has it.
async fn broadcast(p: &Phase<'_>, c: &mut Coordinator, report: &mut Report) -> Result<Meter> {
    let Phase {
        opts,
        target,
        tally,
        progress,
        nonce,
        connected,
        timeout,
    } = p;
    let (connected, timeout) = (*connected, *timeout);
    let deadline = || p.deadline();
    let b = opts.broadcasts as usize;
    {
        let mut t = tally.borrow_mut();
        t.bcast_seen = vec![vec![0u64; (opts.sessions as usize).div_ceil(64)]; b];
        t.bcast_count = vec![0; b];
        t.bcast_posted = vec![false; b];
        t.bcast_post_ns = vec![0; b];
        t.bcast_last_ns = vec![0; b];
    }
    progress.set_message("broadcast");
    progress.set_position(0);
    progress.set_length(b as u64 * u64::from(connected));
    let mut apis = api_clients(target)?;
    // Broadcasts stay live an hour: long enough for the run, short enough not to
    // pile up on a server that runs on.
    let bcast_expiry = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .context("cannot format an expiry")?;
    let mut rounds = histogram();
    for i in 0..b {
        let body = format!(
            r#"{{"channel":"system","expire_on":"{bcast_expiry}","data":{}}}"#,
            wire::broadcast_data(nonce, i as u32)
        );
        let at = target.spread.broadcast(i);
        let Some(api) = apis.get_mut(at) else {
            bail!("no API for broadcast {i}");
        };
        {
            let mut t = tally.borrow_mut();
            t.bcast_post_ns[i] = now_ns();
            t.bcast_posted[i] = true;
            if let Some(calls) = t.api_calls.get_mut(at) {
                *calls += 1;
            }
        }
        match api.post_within(timeout, "/broadcast", body).await {
            Ok(a) if a.status == 200 => {}
            Ok(a) => {
                let mut t = tally.borrow_mut();
                t.bcast_posted[i] = false;
                t.problem(format!(
                    "/broadcast answered {}: {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                ));
                continue;
            }
            Err(e) => {
                let mut t = tally.borrow_mut();
                t.bcast_posted[i] = false;
                t.problem(format!("/broadcast failed: {e:#}"));
                continue;
            }
        }
        let reached = c
            .pump(deadline(), |c| {
                let t = c.tally.borrow();
                t.bcast_count[i] >= connected
            })
            .await;
        if !reached {
            let mut t = tally.borrow_mut();
            let got = t.bcast_count[i];
            t.unfinished(format!(
                "broadcast {i} reached {got} of {connected} devices within {} s",
                opts.timeout_secs
            ));
            break;
        }
        let t = tally.borrow();
        let round_us = t.bcast_last_ns[i].saturating_sub(t.bcast_post_ns[i]) / 1000;
        let _ = rounds.record(round_us.max(1));
    }
    let end = Meter::read(c, target, deadline()).await?;
    report.round_ms = Percentiles::of(&rounds);
    let t = tally.borrow();
    report.expected = t.bcast_posted.iter().filter(|p| **p).count() as u64 * u64::from(connected);
    report.missing = report.expected.saturating_sub(t.deliveries);
    Ok(end)
}

/// `unicast` and `churn`: notifies to random devices from keep-alive clients, while
/// devices reconnect for churn.
async fn notifies(
    p: &Phase<'_>,
    c: &mut Coordinator,
    report: &mut Report,
    start: &Meter,
) -> Result<Meter> {
    let Phase {
        opts,
        target,
        tally,
        progress,
        nonce,
        timeout,
        ..
    } = p;
    let timeout = *timeout;
    let deadline = || p.deadline();
    let m = opts.notifies as usize;
    {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(opts.seed);
        let mut t = tally.borrow_mut();
        t.notify_target = (0..m)
            .map(|_| rng.random_range(0..opts.sessions.max(1)))
            .collect();
        t.notify_post_ns = vec![0; m];
        t.notify_status = vec![0; m];
        t.notify_seen = vec![false; m];
    }
    progress.set_message(if opts.scenario == Scenario::Churn {
        "churn"
    } else {
        "unicast"
    });
    progress.set_position(0);
    progress.set_length(m as u64);
    let churn = opts.scenario == Scenario::Churn;
    if churn {
        c.workers.send(Command::Churn)?;
    }
    let rate = match (opts.notify_rate, churn) {
        (r, _) if r > 0.0 => Some(r),
        (_, true) => Some(f64::from(opts.notifies) / CHURN_SECS),
        (_, false) => None,
    };
    let pace = Pace {
        next: Cell::new(0),
        start: tokio::time::Instant::now(),
        interval: rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        timeout,
    };
    let pace = Rc::new(pace);
    for _ in 0..opts.concurrency.max(1) {
        let apis = api_clients(target)?;
        tokio::task::spawn_local(post_notifies(
            apis,
            target.spread,
            Rc::clone(tally),
            Rc::clone(&pace),
            Rc::clone(&c.answered),
            nonce.clone(),
        ));
    }
    // The phase may last as long as its pacing plus a timeout.
    let paced_s = rate.map_or(0.0, |r| f64::from(opts.notifies) / r);
    let phase_deadline = p.deadline() + (paced_s * 1e9) as u64;
    let mut finished = true;
    if churn {
        finished &= c
            .pump(phase_deadline, |c| {
                let t = c.tally.borrow();
                t.notify_answered as usize == t.notify_target.len()
            })
            .await;
        c.workers.send(Command::Settle)?;
        let settled = c.pump(deadline(), |c| c.settled_threads == c.threads).await;
        if !settled {
            tally
                .borrow_mut()
                .unfinished("devices did not all reconnect after churn".into());
        }
        report.reconnects = Some(c.reconnects);
    }
    finished &= c
        .pump(phase_deadline, |c| c.tally.borrow().unicast_done())
        .await;
    // Accepted notifies that never came are counted missing; what else is left
    // undone makes the run unfinished.
    if !finished && tally.borrow().notify_answered < opts.notifies {
        let mut t = tally.borrow_mut();
        let (answered, accepted, arrived) = (t.notify_answered, t.notify_ok, t.notify_delivered_ok);
        t.unfinished(format!(
            "the notifies did not finish in time: {answered} of {m} answered, \
             {arrived} of {accepted} accepted ones arrived"
        ));
    }
    let end = Meter::read(c, target, deadline()).await?;
    let t = tally.borrow();
    report.expected = u64::from(t.notify_ok);
    report.missing = t
        .notify_status
        .iter()
        .zip(&t.notify_seen)
        .filter(|(status, seen)| **status == 200 && !**seen)
        .count() as u64;
    let secs = (end.at_ns - start.at_ns) as f64 / 1e9;
    report.notifies_per_s = Some(t.notify_answered as f64 / secs);
    Ok(end)
}

/// A keep-alive client for each of the target's APIs, in their order.
fn api_clients(target: &Target) -> Result<Vec<ApiClient>> {
    target.apis.iter().map(|a| ApiClient::new(a)).collect()
}

/// Server CPU between two readings, when both are known.
fn cpu_delta(a: &Meter, b: &Meter) -> Option<u64> {
    Some(b.server_cpu_us?.saturating_sub(a.server_cpu_us?))
}

/// `total_us` per item, when there were items and a total.
fn per(total_us: Option<u64>, count: u64) -> Option<f64> {
    (count > 0).then_some(total_us? as f64 / count as f64)
}

/// Server memory growth per session, in KB.
fn rss_per_session(before: Option<u64>, after: Option<u64>, sessions: u32) -> Option<f64> {
    (sessions > 0).then_some(after?.saturating_sub(before?) as f64 / f64::from(sessions))
}

/// Which notify goes next, and when.
struct Pace {
    next: Cell<usize>,
    start: tokio::time::Instant,
    /// Time between two notifies; `None`: as fast as the clients go.
    interval: Option<Duration>,
    /// Longest wait for one answer.
    timeout: Duration,
}

/// One keep-alive client's share of the notifies: takes the next number until none is
/// left, waits for its time when paced, and records each answer.
async fn post_notifies(
    mut apis: Vec<ApiClient>,
    spread: Spread,
    tally: Rc<RefCell<Tally>>,
    pace: Rc<Pace>,
    answered: Rc<Notify>,
    nonce: String,
) {
    loop {
        let n = pace.next.get();
        let device = {
            let t = tally.borrow();
            match t.notify_target.get(n) {
                Some(&d) => d,
                None => return,
            }
        };
        pace.next.set(n + 1);
        if let Some(interval) = pace.interval {
            tokio::time::sleep_until(pace.start + interval * n as u32).await;
        }
        let at = spread.notify(n, device);
        let id = wire::device_id(&nonce, device);
        let body = format!(
            r#"{{"appid":"{APP_ID}","userid":"{id}","deviceid":"{id}","expire_on":"{EXPIRE_ON}","data":{}}}"#,
            wire::notify_data(&nonce, n as u32, device)
        );
        {
            let mut t = tally.borrow_mut();
            t.notify_post_ns[n] = now_ns();
            if let Some(calls) = t.api_calls.get_mut(at) {
                *calls += 1;
            }
        }
        let answer = match apis.get_mut(at) {
            Some(api) => api.post_within(pace.timeout, "/notify", body).await,
            None => Err(anyhow::anyhow!("no API number {at}")),
        };
        let mut t = tally.borrow_mut();
        t.notify_answered += 1;
        match answer {
            Ok(a) => {
                t.notify_status[n] = a.status;
                if a.status == 200 {
                    t.notify_ok += 1;
                    if t.notify_seen[n] {
                        t.notify_delivered_ok += 1;
                    }
                } else {
                    t.problem(format!(
                        "/notify answered {}: {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    ));
                }
            }
            Err(e) => {
                t.notify_status[n] = 1;
                t.problem(format!("/notify failed: {e:#}"));
            }
        }
        drop(t);
        answered.notify_one();
    }
}
