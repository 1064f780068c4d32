#![allow(clippy::print_stdout, clippy::print_stderr)] // an example shows what happens
//! Embeds the server in a program: the configuration is built in code, and SIGINT or
//! SIGTERM shuts it down in order (what the `pushbroker` binary does).
//!
//! ```sh
//! cargo run --example embed_server            # serves until Ctrl-C
//! cargo run --example embed_server -- --demo  # one device, one notification, then stops
//! ```
//!
//! With `--demo`, a thread plays an application server and a device against the running
//! server over loopback (register, connect, notify, ACK), then sends the process SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use pushbroker::{Server, ServerConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let demo = std::env::args().any(|a| a == "--demo");
    let config = ServerConfig {
        addr: "127.0.0.1:0".into(),      // devices (port 0: any free port)
        http_addr: "127.0.0.1:0".into(), // the HTTP API
        ping_interval: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    Server::run_until_signal(&config, Duration::from_secs(2), |server| {
        println!(
            "devices connect to {}, the HTTP API is on {}",
            server.device_addr(),
            server.http_addr()
        );
        if demo {
            let (devices, http) = (server.device_addr(), server.http_addr());
            std::thread::spawn(move || {
                if let Err(e) = play(devices, http) {
                    eprintln!("demo failed: {e}");
                    std::process::exit(1);
                }
                // Stop as Ctrl-C would.
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
            });
        }
    })?;
    println!("stopped");
    Ok(())
}

/// An application server and a device: register, connect, notify, read, ACK.
fn play(devices: SocketAddr, http: SocketAddr) -> Result<(), Error> {
    let io_timeout = Some(Duration::from_secs(10));
    let registered = post(
        http,
        "/register",
        r#"{"deviceid":"dev-1","appid":"com.example.app_app"}"#,
    )?;
    let token = registered["token"].as_str().ok_or("no token")?.to_owned();
    println!("registered: token {token}");

    let mut device = TcpStream::connect(devices)?;
    device.set_read_timeout(io_timeout)?;
    device.write_all(&[0])?; // the protocol version
    write_frame(
        &mut device,
        r#"{"T":"connect","DeviceId":"dev-1","Info":{"device":"mako","channel":"daily"}}"#,
    )?;
    println!("device reads {}", read_frame(&mut device)?); // CONNACK

    let notify = serde_json::json!({
        "appid": "com.example.app_app",
        "token": token,
        "expire_on": "2099-01-01T00:00:00Z",
        "data": {"message": "hello"},
    });
    println!("notify: {}", post(http, "/notify", &notify.to_string())?);
    loop {
        let frame = read_frame(&mut device)?;
        println!("device reads {frame}");
        let msg: serde_json::Value = serde_json::from_str(&frame)?;
        match msg["T"].as_str() {
            Some("ping") => write_frame(&mut device, r#"{"T":"pong"}"#)?,
            Some("notifications") => {
                write_frame(&mut device, r#"{"T":"ack"}"#)?;
                break;
            }
            _ => write_frame(&mut device, r#"{"T":"ack"}"#)?,
        }
    }
    println!("device acknowledged the notification");
    Ok(())
}

/// Writes one frame: a big-endian u16 length, then the JSON.
fn write_frame(stream: &mut TcpStream, json: &str) -> Result<(), Error> {
    let len = u16::try_from(json.len())?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(json.as_bytes())?;
    Ok(())
}

/// Reads one frame from the server: the same u16 length prefix.
fn read_frame(stream: &mut TcpStream) -> Result<String, Error> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body)?;
    Ok(String::from_utf8(body)?)
}

/// POSTs `body` to `path` and returns the JSON answer.
fn post(http: SocketAddr, path: &str, body: &str) -> Result<serde_json::Value, Error> {
    let mut stream = TcpStream::connect(http)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, json) = answer.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path} answered {head}").into());
    }
    Ok(serde_json::from_str(json)?)
}
