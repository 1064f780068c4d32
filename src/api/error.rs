//! The API's one error type: every way a request can fail, each mapped to its status
//! code, label and message (docs/protocol.md §3.2) in one place, and rendered as
//! `{"error":LABEL,"message":TEXT}` (plus `"extra"`) by [`ApiError::to_response`].
//!
//! Conversions from the store's and the broker's errors are plain functions of the error
//! ([`ApiError::from_broker`] and friends): no logging, no side effects. Messages are fixed
//! strings, so bad client input never sees internal details (a store's fault text stays in
//! the debug log).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use thiserror::Error;

use crate::broker::BrokerError;
use crate::protocol::Payload;
use crate::store::StoreError;

/// The media type of every JSON answer (and the only one `POST` bodies may have).
pub(crate) const JSON_MEDIA_TYPE: &str = "application/json";

/// The `WWW-Authenticate` challenge of `/stats`.
const STATS_CHALLENGE: &str = "Basic realm=\"pushbroker\"";

/// Label: the request itself is wrong.
const INVALID_REQUEST: &str = "invalid-request";
/// Label: the request body could not be read.
const IO_ERROR: &str = "io-error";
/// Label: the server cannot do it now; the client may retry.
const UNAVAILABLE: &str = "unavailable";

/// Why an API request failed. [`status`](ApiError::status), [`label`](ApiError::label)
/// and `Display` (the message) are what the client sees.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ApiError {
    /// A `POST` endpoint called with another method.
    #[error("Wrong request method, should be POST")]
    WrongMethodPost,
    /// A `GET` endpoint called with another method.
    #[error("Wrong request method, should be GET")]
    WrongMethodGet,
    /// The request declared no length (chunked transfer coding).
    #[error("A Content-Length must be provided")]
    NoContentLength,
    /// The request body is empty.
    #[error("Request body empty")]
    BodyEmpty,
    /// The request body is over the limit.
    #[error("Request body too large")]
    BodyTooLarge,
    /// The request body is not declared `application/json`.
    #[error("Wrong content type, should be application/json")]
    WrongContentType,
    /// The request body could not be read (the client went away, sent less than it
    /// declared...).
    #[error("Could not read request body")]
    CouldNotReadBody,
    /// The body is not a JSON object, or a field has the wrong type.
    #[error("Malformed JSON Object")]
    MalformedJson,
    /// An id field (`appid`, `token` or `userid` + `deviceid`, `deviceid`) is missing.
    #[error("Missing id field")]
    MissingId,
    /// The `data` field is missing.
    #[error("Missing data field")]
    MissingData,
    /// The `data` field is over the payload limit.
    #[error("Data too large")]
    DataTooLarge,
    /// `expire_on` is not an RFC 3339 time with an offset.
    #[error("Invalid expiration date")]
    InvalidExpiration,
    /// `expire_on` is in the past.
    #[error("Past expiration date")]
    PastExpiration,
    /// No broadcast channel has that name.
    #[error("Unknown channel")]
    UnknownChannel,
    /// The token does not resolve to a device.
    #[error("Unknown token")]
    UnknownToken,
    /// The token belongs to another application.
    #[error("Unauthorized")]
    Unauthorized,
    /// `/stats` without the configured credentials (answered with a Basic challenge).
    #[error("Unauthorized")]
    StatsUnauthorized,
    /// The application already has the most notifications pending for the device that it
    /// may.
    #[error("Too many pending notifications for this application")]
    TooManyPending {
        /// The newest pending payload of the application: the answer's `extra`.
        newest: Payload,
    },
    /// No endpoint has that path.
    #[error("Not found")]
    NotFound,
    /// The store failed while looking a channel up.
    #[error("Message store unavailable")]
    StoreUnavailable,
    /// The store failed while storing a notification.
    #[error("Could not store notification")]
    CouldNotStoreNotification,
    /// The store failed while making a token.
    #[error("Could not make token")]
    CouldNotMakeToken,
    /// The store failed while removing a token.
    #[error("Could not remove token")]
    CouldNotRemoveToken,
    /// The store failed while resolving a token.
    #[error("Could not resolve token")]
    CouldNotResolveToken,
    /// The shard that must take the request has a full inbox.
    #[error("Server busy, try again later")]
    Busy,
    /// The broker is stopped (shutting down).
    #[error("Server not running")]
    NotRunning,
    /// Some shard did not answer in time (`/health`).
    #[error("Not every shard answered")]
    ShardsNotAnswering,
    /// Anything unexpected: a bug, never a crash.
    #[error("Unknown error")]
    Internal,
}

/// The JSON body of an error answer, fields in the original's order.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    extra: Option<&'a Payload>,
}

impl ApiError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            WrongMethodPost | WrongMethodGet => StatusCode::METHOD_NOT_ALLOWED,
            NoContentLength => StatusCode::LENGTH_REQUIRED,
            BodyTooLarge | TooManyPending { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            WrongContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyEmpty | CouldNotReadBody | MalformedJson | MissingId | MissingData
            | DataTooLarge | InvalidExpiration | PastExpiration | UnknownChannel | UnknownToken => {
                StatusCode::BAD_REQUEST
            }
            Unauthorized | StatsUnauthorized => StatusCode::UNAUTHORIZED,
            NotFound => StatusCode::NOT_FOUND,
            StoreUnavailable
            | CouldNotStoreNotification
            | CouldNotMakeToken
            | CouldNotRemoveToken
            | CouldNotResolveToken
            | Busy
            | NotRunning
            | ShardsNotAnswering => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable label: the answer's `error` field, and the `label` of
    /// `pushbroker_api_errors_total`.
    pub fn label(&self) -> &'static str {
        use ApiError::*;
        match self {
            WrongMethodPost | WrongMethodGet | NoContentLength | BodyEmpty | BodyTooLarge
            | WrongContentType | MalformedJson | MissingId | MissingData | DataTooLarge
            | InvalidExpiration | PastExpiration => INVALID_REQUEST,
            CouldNotReadBody => IO_ERROR,
            UnknownChannel => "unknown-channel",
            UnknownToken => "unknown-token",
            Unauthorized | StatsUnauthorized => "unauthorized",
            TooManyPending { .. } => "too-many-pending",
            NotFound => "not-found",
            StoreUnavailable
            | CouldNotStoreNotification
            | CouldNotMakeToken
            | CouldNotRemoveToken
            | CouldNotResolveToken
            | Busy
            | NotRunning
            | ShardsNotAnswering => UNAVAILABLE,
            Internal => "internal",
        }
    }

    /// The answer's `extra` field, if it has one.
    pub fn extra(&self) -> Option<&Payload> {
        match self {
            ApiError::TooManyPending { newest } => Some(newest),
            _ => None,
        }
    }

    /// Whether the client may retry the same request later (a 503).
    pub fn is_unavailable(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }

    /// The JSON body: `{"error":LABEL,"message":TEXT}`, plus `"extra"` (raw JSON) for
    /// [`ApiError::TooManyPending`].
    pub fn body(&self) -> Bytes {
        let message = self.to_string();
        let body = ErrorBody {
            error: self.label(),
            message: &message,
            extra: self.extra(),
        };
        match serde_json::to_vec(&body) {
            Ok(json) => Bytes::from(json),
            // Only string fields and an already valid raw value: cannot fail. Should it,
            // the answer is still a well-formed error.
            Err(_) => Bytes::from_static(br#"{"error":"internal","message":"Unknown error"}"#),
        }
    }

    /// The whole answer: status, `Content-Type: application/json`, the body, and a
    /// `WWW-Authenticate` challenge for [`ApiError::StatsUnauthorized`].
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut resp = json_response(self.status(), self.body());
        if matches!(self, ApiError::StatsUnauthorized) {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static(STATS_CHALLENGE));
        }
        resp
    }

    /// A failure to resolve a broadcast channel's name.
    pub fn from_channel_lookup(e: &StoreError) -> Self {
        match e {
            StoreError::UnknownChannel => ApiError::UnknownChannel,
            StoreError::Unavailable(_) => ApiError::StoreUnavailable,
            _ => ApiError::Internal,
        }
    }

    /// A failure to resolve a notify's token (or user and device).
    pub fn from_token_lookup(e: &StoreError) -> Self {
        match e {
            StoreError::UnknownToken => ApiError::UnknownToken,
            StoreError::Unauthorized => ApiError::Unauthorized,
            _ => ApiError::CouldNotResolveToken,
        }
    }

    /// A failure of the broker to publish or notify: `store_fault` stands for what the
    /// store could not do.
    pub fn from_broker(e: &BrokerError, store_fault: ApiError) -> Self {
        match e {
            BrokerError::Store(_) => store_fault,
            BrokerError::QueueFull => ApiError::Busy,
            BrokerError::NotRunning => ApiError::NotRunning,
            BrokerError::Abort(_) | BrokerError::WrongShard { .. } => ApiError::Internal,
        }
    }
}

/// A JSON answer with `status` and `body`.
pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON_MEDIA_TYPE));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::ErrAbort;

    fn body_of(e: &ApiError) -> String {
        String::from_utf8(e.body().to_vec()).expect("UTF-8")
    }

    #[test]
    fn every_error_has_the_originals_status_label_and_message() {
        use ApiError::*;
        let table: &[(ApiError, u16, &str, &str)] = &[
            (
                NoContentLength,
                411,
                "invalid-request",
                "A Content-Length must be provided",
            ),
            (BodyEmpty, 400, "invalid-request", "Request body empty"),
            (
                BodyTooLarge,
                413,
                "invalid-request",
                "Request body too large",
            ),
            (
                WrongContentType,
                415,
                "invalid-request",
                "Wrong content type, should be application/json",
            ),
            (
                WrongMethodPost,
                405,
                "invalid-request",
                "Wrong request method, should be POST",
            ),
            (
                WrongMethodGet,
                405,
                "invalid-request",
                "Wrong request method, should be GET",
            ),
            (
                MalformedJson,
                400,
                "invalid-request",
                "Malformed JSON Object",
            ),
            (
                CouldNotReadBody,
                400,
                "io-error",
                "Could not read request body",
            ),
            (MissingId, 400, "invalid-request", "Missing id field"),
            (MissingData, 400, "invalid-request", "Missing data field"),
            (DataTooLarge, 400, "invalid-request", "Data too large"),
            (
                InvalidExpiration,
                400,
                "invalid-request",
                "Invalid expiration date",
            ),
            (
                PastExpiration,
                400,
                "invalid-request",
                "Past expiration date",
            ),
            (UnknownChannel, 400, "unknown-channel", "Unknown channel"),
            (UnknownToken, 400, "unknown-token", "Unknown token"),
            (Unauthorized, 401, "unauthorized", "Unauthorized"),
            (StatsUnauthorized, 401, "unauthorized", "Unauthorized"),
            (NotFound, 404, "not-found", "Not found"),
            (
                StoreUnavailable,
                503,
                "unavailable",
                "Message store unavailable",
            ),
            (
                CouldNotStoreNotification,
                503,
                "unavailable",
                "Could not store notification",
            ),
            (
                CouldNotMakeToken,
                503,
                "unavailable",
                "Could not make token",
            ),
            (
                CouldNotRemoveToken,
                503,
                "unavailable",
                "Could not remove token",
            ),
            (
                CouldNotResolveToken,
                503,
                "unavailable",
                "Could not resolve token",
            ),
            (Busy, 503, "unavailable", "Server busy, try again later"),
            (NotRunning, 503, "unavailable", "Server not running"),
            (
                ShardsNotAnswering,
                503,
                "unavailable",
                "Not every shard answered",
            ),
            (Internal, 500, "internal", "Unknown error"),
        ];
        for (e, status, label, message) in table {
            assert_eq!(e.status().as_u16(), *status, "{e:?}");
            assert_eq!(e.label(), *label, "{e:?}");
            assert_eq!(
                body_of(e),
                format!(r#"{{"error":"{label}","message":"{message}"}}"#)
            );
            assert_eq!(e.is_unavailable(), *status == 503, "{e:?}");
        }
    }

    #[test]
    fn too_many_pending_carries_the_newest_payload_as_raw_extra() {
        let newest = Payload::from_json(r#"{"b": [1,  2], "a":"x"}"#).expect("JSON");
        let e = ApiError::TooManyPending { newest };
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body_of(&e),
            r#"{"error":"too-many-pending","message":"Too many pending notifications for this application","extra":{"b": [1,  2], "a":"x"}}"#
        );
    }

    #[test]
    fn answers_are_json_and_the_stats_refusal_carries_a_basic_challenge() {
        let resp = ApiError::MissingId.to_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        assert!(resp.headers().get(WWW_AUTHENTICATE).is_none());
        let resp = ApiError::StatsUnauthorized.to_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            resp.headers()[WWW_AUTHENTICATE],
            "Basic realm=\"pushbroker\""
        );
    }

    #[test]
    fn store_and_broker_faults_map_without_leaking_their_text() {
        let down = StoreError::Unavailable("db at 10.0.0.7 refused".into());
        assert_eq!(
            ApiError::from_channel_lookup(&StoreError::UnknownChannel),
            ApiError::UnknownChannel
        );
        assert_eq!(
            ApiError::from_channel_lookup(&down),
            ApiError::StoreUnavailable
        );
        assert_eq!(
            ApiError::from_channel_lookup(&StoreError::UnknownToken),
            ApiError::Internal
        );
        assert_eq!(
            ApiError::from_token_lookup(&StoreError::UnknownToken),
            ApiError::UnknownToken
        );
        assert_eq!(
            ApiError::from_token_lookup(&StoreError::Unauthorized),
            ApiError::Unauthorized
        );
        assert_eq!(
            ApiError::from_token_lookup(&down),
            ApiError::CouldNotResolveToken
        );
        let store = ApiError::CouldNotStoreNotification;
        for (e, want) in [
            (
                BrokerError::Store(down.clone()),
                ApiError::CouldNotStoreNotification,
            ),
            (BrokerError::QueueFull, ApiError::Busy),
            (BrokerError::NotRunning, ApiError::NotRunning),
            (
                BrokerError::WrongShard {
                    owner: crate::broker::sharded::ShardId(1),
                },
                ApiError::Internal,
            ),
            (
                BrokerError::Abort(ErrAbort::unexpected_value()),
                ApiError::Internal,
            ),
        ] {
            let got = ApiError::from_broker(&e, store.clone());
            assert!(!body_of(&got).contains("10.0.0.7"));
            assert_eq!(got, want, "{e:?}");
        }
    }
}
