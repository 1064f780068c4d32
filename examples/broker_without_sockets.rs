#![allow(clippy::print_stdout)] // an example shows what happens
//! Drives a broker without sockets: one device registers, gets a broadcast and a unicast
//! notification, ACKs each, and the store forgets what was acknowledged.
//!
//! ```sh
//! cargo run --example broker_without_sockets
//! ```
//!
//! The frames printed are what a device would read on its connection (a big-endian u16
//! length, then the JSON). A real transport writes them to the device and reads its
//! `{"T":"ack"}`; here every frame is acknowledged at once.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use pushbroker::broker::{
    Broker, BrokerSending, BrokerSession, Next, Prepared, SessionId, perform,
};
use pushbroker::glommio::LocalExecutorBuilder;
use pushbroker::store::{NotifyVerdict, UnicastRequest, apply_notify};
use pushbroker::{
    ConnectMsg, InMemoryPendingStore, InternalChannelId, Payload, PendingStore, ServerConfig,
    SimpleBroker,
};

type Error = Box<dyn std::error::Error>;

/// Performs what is queued for `sess` until an exchange sends something, printing each
/// frame and ACKing it. (An exchange with nothing left to send, such as the catch-up
/// queued at registration when nothing is pending, is a no-op.)
async fn deliver_next(sess: &mut dyn BrokerSession) -> Result<(), Error> {
    loop {
        let exchange = match sess.session_channel().next().await {
            Next::Exchange(exchange) => exchange,
            Next::Terminated => return Err("the session was ended".into()),
        };
        let prepared = perform(exchange.as_ref(), sess, |frame| {
            let json = String::from_utf8_lossy(frame.get(2..).unwrap_or_default());
            println!("  device reads {json}");
            true // and answers {"T":"ack"}
        })?;
        if prepared != Prepared::Nop {
            return Ok(());
        }
    }
}

async fn run() -> Result<(), Error> {
    let store = Rc::new(InMemoryPendingStore::new());
    // Queue sizes and limits as the server's defaults.
    let config = ServerConfig::default();
    let broker = SimpleBroker::new(Rc::clone(&store) as Rc<dyn PendingStore>, &config);
    broker.start();

    // The device's CONNECT: its id, its image channel and model, and the system
    // channel's level it last saw (it keeps each channel's TopLevel across connections).
    let connect = ConnectMsg {
        device_id: "dev-1".to_owned(),
        info: serde_json::json!({"device": "mako", "channel": "daily"})
            .as_object()
            .cloned(),
        levels: Some([("0".to_owned(), 0)].into_iter().collect()),
        ..ConnectMsg::default()
    };
    let mut sess = broker
        .register(&connect, &SessionId("example".to_owned()))
        .await?;
    println!("registered dev-1");

    // A broadcast: append to the system channel, then ask for delivery.
    let expiration = SystemTime::now() + Duration::from_secs(3600);
    let top = store.append_to_channel(
        &InternalChannelId::System,
        Payload::from_json(r#"{"daily/mako":[42]}"#)?,
        expiration,
    )?;
    broker.sending().broadcast(InternalChannelId::System)?;
    println!("broadcast at level {top}");
    deliver_next(&mut sess).await?;
    println!(
        "  dev-1 is now at system level {:?}",
        sess.levels().get(&InternalChannelId::System)
    );

    // A unicast notification, as /notify applies it, then delivery to the device.
    let chan = InternalChannelId::unicast("dev-1", "dev-1");
    let req = UnicastRequest {
        chan_id: chan.clone(),
        app_id: "com.example.app_app".to_owned(),
        payload: Payload::from_json(r#"{"message":"hello"}"#)?,
        expiration,
        replace_tag: None,
        clear_pending: false,
    };
    match apply_notify(store.as_ref(), &req, 100, "msg-1".to_owned())? {
        NotifyVerdict::Accepted { msg_id } => println!("notification {msg_id} pending"),
        other => return Err(format!("notify refused: {other:?}").into()),
    }
    broker.sending().unicast(std::slice::from_ref(&chan))?;
    deliver_next(&mut sess).await?;
    let (_, pending) = store.get_channel_snapshot(&chan)?;
    println!("  pending after the ACK: {}", pending.len());
    if !pending.is_empty() {
        return Err("an acknowledged notification is still pending".into());
    }

    broker.unregister(&sess);
    broker.stop().await;
    Ok(())
}

fn main() -> Result<(), Error> {
    // The broker and its sessions live on one glommio executor (not Send).
    LocalExecutorBuilder::default()
        .name("example")
        .spawn(|| async { run().await.map_err(|e| e.to_string()) })?
        .join()??;
    Ok(())
}
