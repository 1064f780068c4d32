//! The endpoints, behind [`respond`]: the API's core, free of sockets.
//!
//! # Order of the checks
//!
//! As the original server's `JSONPostHandler` did them, a `POST` endpoint answers the
//! first failure of: the method is not `POST` (405); the length is undeclared (411), zero
//! (400) or over `max_body` (413); the `Content-Type`'s media type is not
//! `application/json` (415; parameters such as `; charset=utf-8` are accepted, as Go's
//! `mime.ParseMediaType` does); the body cannot be read (400 `io-error`); it is not a JSON
//! object with fields of the right types (400). Then the endpoint's own checks, in the
//! original's order: ids, `data` (missing; for `/notify` also over 2048 bytes), `expire_on`
//! (invalid, past), then the store and the broker. `/broadcast` data is bounded only by
//! the body's limit.

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde::Serialize;
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::debug;

use super::body::{Broadcast, Registration, Unicast};
use super::error::{JSON_MEDIA_TYPE, json_response};
use super::metrics::{self, PROMETHEUS_TEXT, Stats};
use super::{ApiContext, ApiError, MAX_DATA_BYTES, SHARD_ANSWER_TIMEOUT};
use crate::logging::{Untrusted, target};
use crate::protocol::Payload;
use crate::store::{InternalChannelId, NotifyVerdict, UnicastRequest};

/// What the core needs of a request besides its body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a [u8]>,
    /// The declared body length: the `Content-Length`; `0` when the request declares no
    /// body (neither `Content-Length` nor `Transfer-Encoding`); `None` when the length is
    /// not declared (chunked), which the `POST` endpoints refuse with 411.
    pub content_length: Option<u64>,
    /// The `Authorization` header, if any (for `/stats`).
    pub authorization: Option<&'a [u8]>,
}

/// The request body could not be read (the client went away or sent less than it
/// declared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("could not read the request body")]
pub struct BodyReadError;

/// The endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Broadcast,
    Notify,
    Register,
    Unregister,
    DeliveryHosts,
    Health,
    Metrics,
    Stats,
}

impl Endpoint {
    fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/broadcast" => Endpoint::Broadcast,
            "/notify" => Endpoint::Notify,
            "/register" => Endpoint::Register,
            "/unregister" => Endpoint::Unregister,
            "/delivery-hosts" => Endpoint::DeliveryHosts,
            "/health" => Endpoint::Health,
            "/metrics" => Endpoint::Metrics,
            "/stats" => Endpoint::Stats,
            _ => return None,
        })
    }
}

/// `{"ok":true}`.
const OK: &[u8] = br#"{"ok":true}"#;

/// Answers one request: routes it, runs the endpoint, counts it (and its error, by label)
/// on the shard, and logs it at debug. `body` is awaited only when the endpoint's checks
/// of the head pass.
///
/// Must run on the shard of `ctx` (a glommio executor thread). Never panics on any input.
pub async fn respond<B>(ctx: &ApiContext, head: &RequestHead<'_>, body: B) -> Response<Full<Bytes>>
where
    B: Future<Output = Result<Bytes, BodyReadError>>,
{
    ctx.counters().count_request();
    match route(ctx, head, body).await {
        Ok(resp) => {
            debug!(
                target: target::API,
                method = %head.method,
                path = %Untrusted(head.path),
                status = resp.status().as_u16(),
                "api request"
            );
            resp
        }
        Err(e) => {
            ctx.counters().count_error(e.label());
            debug!(
                target: target::API,
                method = %head.method,
                path = %Untrusted(head.path),
                status = e.status().as_u16(),
                label = %e.label(),
                "api request failed: {e}"
            );
            e.to_response()
        }
    }
}

async fn route<B>(
    ctx: &ApiContext,
    head: &RequestHead<'_>,
    body: B,
) -> Result<Response<Full<Bytes>>, ApiError>
where
    B: Future<Output = Result<Bytes, BodyReadError>>,
{
    let Some(endpoint) = Endpoint::of(head.path) else {
        return Err(ApiError::NotFound);
    };
    match endpoint {
        // The body is parsed, then dropped before the broker is awaited (it shares
        // hyper's read buffer).
        Endpoint::Broadcast => {
            let (chan, payload, expiration) =
                broadcast_request(ctx, &read_post(ctx, head, body).await?)?;
            broadcast(ctx, chan, payload, expiration).await
        }
        Endpoint::Notify => {
            let req = notify_request(ctx, &read_post(ctx, head, body).await?)?;
            notify(ctx, req).await
        }
        Endpoint::Register => register(ctx, &read_post(ctx, head, body).await?),
        Endpoint::Unregister => unregister(ctx, &read_post(ctx, head, body).await?),
        Endpoint::DeliveryHosts => {
            check_get(head)?;
            match ctx.shard().cluster() {
                None => Ok(json_response(StatusCode::OK, ctx.delivery_hosts.clone())),
                Some(cluster) => {
                    // Boxed: its Redis request would otherwise size every request's
                    // handler future, /notify's included.
                    let hosts = Box::pin(cluster.delivery_hosts()).await.map_err(|e| {
                        debug!(target: target::API, "delivery hosts not read: {e}");
                        ApiError::from_broker(&e, ApiError::Internal)
                    })?;
                    Ok(json_response(
                        StatusCode::OK,
                        ctx.render_delivery_hosts(&hosts),
                    ))
                }
            }
        }
        Endpoint::Health => {
            check_get(head)?;
            health(ctx).await
        }
        Endpoint::Metrics => {
            check_get(head)?;
            check_stats_auth(ctx, head)?;
            let answers = metrics::gather(ctx.shard().sending(), SHARD_ANSWER_TIMEOUT).await;
            let mut resp = Response::new(Full::new(Bytes::from(metrics::prometheus(&answers))));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            Ok(resp)
        }
        Endpoint::Stats => {
            check_get(head)?;
            check_stats_auth(ctx, head)?;
            let answers = metrics::gather(ctx.shard().sending(), SHARD_ANSWER_TIMEOUT).await;
            json(&Stats::new(&answers))
        }
    }
}

/// `/stats` and `/metrics` answer only with the configured basic credentials, if any.
fn check_stats_auth(ctx: &ApiContext, head: &RequestHead<'_>) -> Result<(), ApiError> {
    match &ctx.settings().statistics_auth {
        Some(expected) if !basic_auth_matches(head.authorization, expected) => {
            Err(ApiError::StatsUnauthorized)
        }
        _ => Ok(()),
    }
}

/// The checks of a `POST` endpoint's head, in the original's order.
fn check_post(head: &RequestHead<'_>, max_body: usize) -> Result<(), ApiError> {
    if *head.method != Method::POST {
        return Err(ApiError::WrongMethodPost);
    }
    match head.content_length {
        None => return Err(ApiError::NoContentLength),
        Some(0) => return Err(ApiError::BodyEmpty),
        Some(n) if n > max_body as u64 => return Err(ApiError::BodyTooLarge),
        Some(_) => {}
    }
    if !head.content_type.is_some_and(is_json_media_type) {
        return Err(ApiError::WrongContentType);
    }
    Ok(())
}

/// Whether a `Content-Type` value's media type (what comes before any `;` parameter,
/// without surrounding blanks, in any case) is `application/json`.
fn is_json_media_type(content_type: &[u8]) -> bool {
    let media_type = match content_type.iter().position(|&b| b == b';') {
        Some(end) => &content_type[..end],
        None => content_type,
    };
    media_type
        .trim_ascii()
        .eq_ignore_ascii_case(JSON_MEDIA_TYPE.as_bytes())
}

/// Checks a `POST` endpoint's head, then reads the body (exactly the declared length).
async fn read_post<B>(ctx: &ApiContext, head: &RequestHead<'_>, body: B) -> Result<Bytes, ApiError>
where
    B: Future<Output = Result<Bytes, BodyReadError>>,
{
    check_post(head, ctx.settings().max_body)?;
    let body = body.await.map_err(|_| ApiError::CouldNotReadBody)?;
    if Some(body.len() as u64) != head.content_length {
        return Err(ApiError::CouldNotReadBody);
    }
    Ok(body)
}

fn check_get(head: &RequestHead<'_>) -> Result<(), ApiError> {
    if *head.method == Method::GET {
        Ok(())
    } else {
        Err(ApiError::WrongMethodGet)
    }
}

/// The checks common to `/broadcast` and `/notify`: `data` present and, when `max_data`
/// is given, no larger; `expire_on` RFC 3339 with an offset and not past.
fn check_cast(
    data: Option<Payload>,
    max_data: Option<usize>,
    expire_on: &str,
) -> Result<(Payload, SystemTime), ApiError> {
    let data = data.ok_or(ApiError::MissingData)?;
    if max_data.is_some_and(|max| data.len() > max) {
        return Err(ApiError::DataTooLarge);
    }
    let expiration = parse_expiration(expire_on)?;
    if expiration < SystemTime::now() {
        return Err(ApiError::PastExpiration);
    }
    Ok((data, expiration))
}

/// An RFC 3339 time with an offset (`Z` or `±hh:mm`, fractional seconds allowed).
fn parse_expiration(expire_on: &str) -> Result<SystemTime, ApiError> {
    OffsetDateTime::parse(expire_on, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| ApiError::InvalidExpiration)
}

/// A `/broadcast` body's channel, payload and expiration, checked.
fn broadcast_request(
    ctx: &ApiContext,
    body: &[u8],
) -> Result<(InternalChannelId, Payload, SystemTime), ApiError> {
    let req = Broadcast::parse(body).map_err(|_| ApiError::MalformedJson)?;
    // Bounded by the body alone, as in the original.
    let (payload, expiration) = check_cast(req.data, None, &req.expire_on)?;
    let chan = ctx
        .shard()
        .store()
        .get_internal_channel_id(&req.channel)
        .map_err(|e| ApiError::from_channel_lookup(&e))?;
    if !chan.is_broadcast() {
        return Err(ApiError::Internal);
    }
    Ok((chan, payload, expiration))
}

async fn broadcast(
    ctx: &ApiContext,
    chan: InternalChannelId,
    payload: Payload,
    expiration: SystemTime,
) -> Result<Response<Full<Bytes>>, ApiError> {
    ctx.shard()
        .sending()
        .publish(chan, payload, expiration)
        .await
        .map_err(|e| {
            debug!(target: target::API, "broadcast not published: {e}");
            ApiError::from_broker(&e, ApiError::CouldNotStoreNotification)
        })?;
    Ok(ok())
}

/// A `/notify` body as the broker takes it, checked.
fn notify_request(ctx: &ApiContext, body: &[u8]) -> Result<UnicastRequest, ApiError> {
    let req = Unicast::parse(body).map_err(|_| ApiError::MalformedJson)?;
    if req.app_id.is_empty()
        || (req.token.is_empty() && (req.user_id.is_empty() || req.device_id.is_empty()))
    {
        return Err(ApiError::MissingId);
    }
    let (payload, expiration) = check_cast(req.data, Some(MAX_DATA_BYTES), &req.expire_on)?;
    let chan = ctx
        .shard()
        .store()
        .get_internal_channel_id_from_token(&req.token, &req.app_id, &req.user_id, &req.device_id)
        .map_err(|e| {
            debug!(target: target::API, "token not resolved: {e}");
            ApiError::from_token_lookup(&e)
        })?;
    if !chan.is_unicast() {
        return Err(ApiError::Internal);
    }
    Ok(UnicastRequest {
        chan_id: chan,
        app_id: req.app_id.into_owned(),
        payload,
        expiration,
        replace_tag: Some(req.replace_tag)
            .filter(|tag| !tag.is_empty())
            .map(Cow::into_owned),
        clear_pending: req.clear_pending,
    })
}

async fn notify(ctx: &ApiContext, req: UnicastRequest) -> Result<Response<Full<Bytes>>, ApiError> {
    match ctx.shard().notify_from_here(req).await {
        Ok(NotifyVerdict::Accepted { .. }) => Ok(ok()),
        Ok(NotifyVerdict::TooManyPending { newest }) => Err(ApiError::TooManyPending { newest }),
        Err(e) => {
            debug!(target: target::API, "notify not applied: {e}");
            Err(ApiError::from_broker(
                &e,
                ApiError::CouldNotStoreNotification,
            ))
        }
    }
}

fn registration(body: &[u8]) -> Result<Registration<'_>, ApiError> {
    let reg = Registration::parse(body).map_err(|_| ApiError::MalformedJson)?;
    if reg.device_id.is_empty() || reg.app_id.is_empty() {
        return Err(ApiError::MissingId);
    }
    Ok(reg)
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    ok: bool,
    token: &'a str,
}

fn register(ctx: &ApiContext, body: &[u8]) -> Result<Response<Full<Bytes>>, ApiError> {
    let reg = registration(body)?;
    let token = ctx
        .shard()
        .store()
        .register(&reg.device_id, &reg.app_id)
        .map_err(|e| {
            debug!(target: target::API, "token not made: {e}");
            ApiError::CouldNotMakeToken
        })?;
    json(&TokenAnswer {
        ok: true,
        token: &token,
    })
}

fn unregister(ctx: &ApiContext, body: &[u8]) -> Result<Response<Full<Bytes>>, ApiError> {
    let reg = registration(body)?;
    ctx.shard()
        .store()
        .unregister(&reg.device_id, &reg.app_id)
        .map_err(|e| {
            debug!(target: target::API, "token not removed: {e}");
            ApiError::CouldNotRemoveToken
        })?;
    Ok(ok())
}

#[derive(Serialize)]
struct Healthy {
    ok: bool,
    shards: usize,
}

async fn health(ctx: &ApiContext) -> Result<Response<Full<Bytes>>, ApiError> {
    let answers = metrics::gather(ctx.shard().sending(), SHARD_ANSWER_TIMEOUT).await;
    if answers.iter().all(Option::is_some) {
        json(&Healthy {
            ok: true,
            shards: answers.len(),
        })
    } else {
        Err(ApiError::ShardsNotAnswering)
    }
}

fn ok() -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, Bytes::from_static(OK))
}

fn json(value: &impl Serialize) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = serde_json::to_vec(value).map_err(|_| ApiError::Internal)?;
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// Whether `authorization` is `Basic base64(user:password)` with the expected pair.
fn basic_auth_matches(authorization: Option<&[u8]>, (user, password): &(String, String)) -> bool {
    let Some(value) = authorization.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let Some((scheme, credentials)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = BASE64.decode(credentials.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (given_user, given_password) = (&decoded[..colon], &decoded[colon + 1..]);
    // Both compared in full, whatever the first gives.
    constant_time_eq(given_user, user.as_bytes())
        & constant_time_eq(given_password, password.as_bytes())
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
