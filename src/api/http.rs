//! hyper on a glommio connection: [`serve_connection`] and [`handle`], which turns a hyper
//! request into the core's [`RequestHead`] and body future.

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use bytes::BytesMut;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response};
use smallvec::SmallVec;
use tracing::debug;

use super::ApiContext;
use super::handlers::{BodyReadError, RequestHead, respond};
use crate::logging::target;
use crate::rt::{HyperIo, HyperTimer};

/// Serves one HTTP/1.1 connection until the client closes it, a header-read or write
/// timeout ends it, or it fails. Keep-alive is on; every request is [`handle`]d on this
/// shard. Failures are the client's business: logged at debug only.
pub async fn serve_connection(stream: glommio::net::TcpStream, ctx: Rc<ApiContext>) {
    serve_connection_until(stream, ctx, std::future::pending()).await;
}

/// [`serve_connection`], shutting down gracefully once `stop` completes: the request in
/// flight, if any, is finished and answered, then the connection closes (an idle one at
/// once).
pub async fn serve_connection_until(
    stream: glommio::net::TcpStream,
    ctx: Rc<ApiContext>,
    stop: impl std::future::Future<Output = ()>,
) {
    // Only when known: a line reads `peer=1.2.3.4:5`, never `peer=Some(…)`.
    let peer = stream.peer_addr().ok().map(tracing::field::display);
    let settings = ctx.settings();
    if !settings.http_write_timeout.is_zero()
        && let Err(e) = stream.set_write_timeout(Some(settings.http_write_timeout))
    {
        debug!(target: target::API, peer, "cannot set the write timeout: {e}");
    }
    // Answers are small and whole: send them at once.
    let _ = stream.set_nodelay(true);
    let read_timeout = Some(settings.http_read_timeout).filter(|t| !t.is_zero());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(HyperTimer)
        .keep_alive(true)
        // A client may close its side once its request is sent and still gets the
        // answer. hyper otherwise reads while a request is served, to notice such a
        // close, and reserves a fresh read buffer for it on every request.
        .half_close(true)
        .header_read_timeout(read_timeout);
    let service = hyper::service::service_fn(move |req| {
        let ctx = Rc::clone(&ctx);
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let mut conn = std::pin::pin!(builder.serve_connection(HyperIo(stream), service));
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    let served = std::future::poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    match served {
        Ok(()) => debug!(target: target::API, peer, "http connection closed"),
        Err(e) => debug!(target: target::API, peer, "http connection ended: {e}"),
    }
}

/// Answers one request: hands its method, path, `Content-Type`, declared length,
/// `Authorization` and a body reader to [`respond`].
///
/// The declared length is the one hyper frames the body with: the `Content-Length`, `0`
/// for a request with neither `Content-Length` nor `Transfer-Encoding` (no body, by
/// HTTP/1.1 framing), unknown for a chunked body. The body is read only when the
/// endpoint's checks pass, and never beyond the configured `max_body`.
pub async fn handle(ctx: &ApiContext, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // What the endpoints look at, copied out (on the stack for a usual request) so that
    // hyper's head goes now: its header values share hyper's read buffer, which hyper
    // reuses for the next request only once nothing else holds it, and a notify for
    // another shard's device awaits that shard's answer.
    let method = parts.method.clone();
    let path = Copied::of(Some(parts.uri.path().as_bytes()));
    let content_type = Copied::of(parts.headers.get(CONTENT_TYPE).map(|v| v.as_bytes()));
    let authorization = Copied::of(parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes()));
    drop(parts);
    let head = RequestHead {
        method: &method,
        // A copy of a `&str`, so always UTF-8.
        path: path
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or_default(),
        content_type: content_type.as_deref(),
        content_length: body.size_hint().exact(),
        authorization: authorization.as_deref(),
    };
    let max_body = ctx.settings().max_body;
    let read_timeout = ctx.settings().http_read_timeout;
    respond(ctx, &head, read_body(body, max_body, read_timeout)).await
}

/// A part of a request head, copied: inline up to the size of a usual path or header.
struct Copied(Option<SmallVec<[u8; 64]>>);

impl Copied {
    fn of(bytes: Option<&[u8]>) -> Self {
        Self(bytes.map(SmallVec::from_slice))
    }

    fn as_deref(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }
}

/// The whole body, at most `max_body` bytes, within `read_timeout` (zero: no limit): a
/// client that declares a body and stalls cannot hold its connection forever.
async fn read_body(
    body: Incoming,
    max_body: usize,
    read_timeout: std::time::Duration,
) -> Result<Bytes, BodyReadError> {
    let collect = collect(body, max_body);
    let mut collect = std::pin::pin!(collect);
    // A small request's body came with its head: taken without arming a timer.
    let read = match futures_lite::future::poll_once(&mut collect).await {
        Some(read) => read,
        None if read_timeout.is_zero() => collect.await,
        None => glommio::timer::timeout(read_timeout, async { Ok(collect.await) })
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned())),
    };
    read.map_err(|e| {
        debug!(target: target::API, "cannot read a request body: {e}");
        BodyReadError
    })
}

/// The body's data, at most `max_body` bytes: a body that came in one piece (the usual
/// case) is handed on as it is, without a copy or a list of pieces.
async fn collect(mut body: Incoming, max_body: usize) -> Result<Bytes, String> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else {
            // Trailers: not part of the body.
            continue;
        };
        len = len.saturating_add(data.len());
        if len > max_body {
            return Err("length limit exceeded".to_owned());
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut buf = BytesMut::with_capacity(earlier.len() + data.len());
                buf.extend_from_slice(&earlier);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or_else(|| first.unwrap_or_default(), BytesMut::freeze))
}
