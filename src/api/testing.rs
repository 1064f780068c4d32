//! An HTTP answer as tests look at it: one type for the API's in-process tests, its
//! socket tests and the end-to-end tests.

/// One HTTP answer, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The headers, in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked), as text; bytes that are not UTF-8 are replaced.
    pub body: String,
}

impl HttpAnswer {
    /// Parses a whole raw HTTP/1.1 answer (head and body as read until the server
    /// closed); `None` when there is no status line or no end of head.
    pub fn parse(raw: &[u8]) -> Option<HttpAnswer> {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(raw.get(..split)?).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let mut body = raw.get(split + 4..)?.to_vec();
        let answer = HttpAnswer {
            status,
            headers,
            body: String::new(),
        };
        if answer
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        Some(HttpAnswer {
            body: String::from_utf8_lossy(&body).into_owned(),
            ..answer
        })
    }

    /// A header's value (the name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// When the body is not JSON (a failed test).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", self.body))
    }

    /// Asserts an error answer: status, label and message, JSON content type.
    ///
    /// # Panics
    /// When the answer is anything else (a failed test).
    pub fn assert_error(&self, status: u16, label: &str, message: &str) {
        assert_eq!(
            (self.status, self.body.as_str()),
            (
                status,
                format!(r#"{{"error":"{label}","message":"{message}"}}"#).as_str()
            ),
            "{self:?}"
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
    }

    /// Asserts `200 {"ok":true}` with a JSON content type.
    ///
    /// # Panics
    /// When the answer is anything else (a failed test).
    pub fn assert_ok(&self) {
        assert_eq!(
            (self.status, self.body.as_str()),
            (200, r#"{"ok":true}"#),
            "{self:?}"
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = data
            .get(..eol)
            .map(String::from_utf8_lossy)
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(data.get(start..end).unwrap_or_default());
        data = data.get((end + 2).min(data.len())..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_answer_is_put_together() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n5\r\n{\"ok\"\r\n6\r\n:true}\r\n0\r\n\r\n";
        let a = HttpAnswer::parse(raw).expect("an answer");
        a.assert_ok();
        assert_eq!(a.header("TRANSFER-ENCODING"), Some("chunked"));
    }

    #[test]
    fn no_head_is_no_answer() {
        assert_eq!(HttpAnswer::parse(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(HttpAnswer::parse(b"garbage\r\n\r\n"), None);
    }
}
