//! A keep-alive HTTP/1.1 client for the server's API, on hyper.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One keep-alive connection to the API; it reconnects after a failure.
pub(crate) struct ApiClient {
    addr: SocketAddr,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// An API answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The HTTP status.
    pub(crate) status: u16,
    /// The body, for error messages.
    pub(crate) body: Bytes,
}

impl ApiClient {
    /// A client for the API at `base` (`http://host:port`); it connects on first use.
    pub(crate) fn new(base: &str) -> Result<Self> {
        let host = base
            .strip_prefix("http://")
            .with_context(|| format!("the API URL {base:?} must start with http://"))?
            .trim_end_matches('/');
        let addr = host
            .parse()
            .with_context(|| format!("the API URL {base:?} must name HOST:PORT by address"))?;
        Ok(ApiClient {
            addr,
            host: host.to_owned(),
            sender: None,
        })
    }

    /// The keep-alive connection, opened again when the server closed it.
    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("cannot connect to the API at {}", self.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .context("HTTP handshake")?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        match self.sender.as_mut() {
            Some(s) => Ok(s),
            None => bail!("no API connection"),
        }
    }

    /// POSTs a JSON `body` to `path`, giving up after `timeout`.
    pub(crate) async fn post_within(
        &mut self,
        timeout: std::time::Duration,
        path: &str,
        body: String,
    ) -> Result<Answer> {
        match tokio::time::timeout(timeout, self.post(path, body)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.sender = None;
                bail!("no answer within {timeout:?}")
            }
        }
    }

    /// POSTs a JSON `body` to `path`.
    pub(crate) async fn post(&mut self, path: &str, body: String) -> Result<Answer> {
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONTENT_LENGTH, body.len())
            .body(Full::new(Bytes::from(body)))?;
        let result = async {
            let sender = self.connection().await?;
            sender.ready().await.context("API connection")?;
            let response = sender.send_request(request).await.context("API request")?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .context("API response body")?
                .to_bytes();
            Ok(Answer { status, body })
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }
}
