//! `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`: where the client connects, as whom, and
//! which database it selects.

use std::fmt;

use super::RedisError;

/// The port Redis listens on when the URL names none.
pub const DEFAULT_PORT: u16 = 6379;

/// A parsed `redis://` URL.
///
/// The host is a name, an IPv4 address or a bracketed IPv6 address (`[::1]`); the user and
/// password are percent-decoded; the database is a number (0 when absent). A password
/// without a user is sent as `AUTH PASSWORD`, with one as `AUTH USER PASSWORD` (Redis 6
/// ACLs). `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// The host, without brackets for IPv6.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The database selected with `SELECT` after connecting (0: none sent).
    pub db: u32,
    /// The ACL user, if the URL names one.
    pub username: Option<String>,
    /// The password sent with `AUTH`, if the URL has one.
    pub password: Option<String>,
}

impl RedisUrl {
    /// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
    pub fn parse(url: &str) -> Result<Self, RedisError> {
        let bad = |why: &str| RedisError::InvalidUrl(format!("{why}: {}", redacted(url)));
        let rest = url.strip_prefix("redis://").ok_or_else(|| {
            bad("not a redis:// URL (rediss:// and unix sockets are not supported)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("query parameters are not supported"));
        }
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = match info.find(':') {
                    Some(i) => (&info[..i], Some(&info[i + 1..])),
                    None => (info, None),
                };
                let user = percent_decode(user).ok_or_else(|| bad("bad percent-encoding"))?;
                let pass = pass
                    .map(|p| percent_decode(p).ok_or_else(|| bad("bad percent-encoding")))
                    .transpose()?;
                match pass {
                    // `redis://:secret@host`: a password alone.
                    Some(pass) => ((!user.is_empty()).then_some(user), Some(pass)),
                    // `redis://secret@host`: taken as the password, as other clients do.
                    None if !user.is_empty() => (None, Some(user)),
                    None => (None, None),
                }
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| bad("unclosed '[' in the host"))?;
            let port = match &v6[end + 1..] {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (&v6[..end], port)
        } else {
            match hostport.rfind(':') {
                Some(i) => (&hostport[..i], Some(&hostport[i + 1..])),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
        };
        let db = match path.trim_end_matches('/') {
            "" => 0,
            d => d
                .parse::<u32>()
                .map_err(|_| bad("the path must be a database number"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            db,
            username,
            password,
        })
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        match (&self.username, &self.password) {
            (Some(user), Some(_)) => write!(f, "{user}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            _ => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}/{}", self.host, self.port, self.db)
        } else {
            write!(f, "{}:{}/{}", self.host, self.port, self.db)
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

/// `url` with whatever stands before an `@` masked, for error messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}***{}", &url[..s + 3], &url[a..]),
        _ => url.to_owned(),
    }
}

/// Decodes `%XX` escapes; `None` if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_db() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/3").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6380, 3));
        assert_eq!((u.username, u.password), (None, None));
    }

    #[test]
    fn defaults_port_and_db() {
        let u = RedisUrl::parse("redis://cache.internal").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.internal", 6379, 0));
        let u = RedisUrl::parse("redis://cache.internal/").unwrap();
        assert_eq!(u.db, 0);
    }

    #[test]
    fn passwords_and_users() {
        let u = RedisUrl::parse("redis://:s%40cret@h:1/2").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("s@cret")));
        let u = RedisUrl::parse("redis://app:pw@h").unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref()),
            (Some("app"), Some("pw"))
        );
        let u = RedisUrl::parse("redis://pw@h").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("pw")));
    }

    #[test]
    fn ipv6_hosts() {
        let u = RedisUrl::parse("redis://[::1]:7000/1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("::1", 7000, 1));
        assert_eq!(u.to_string(), "redis://[::1]:7000/1");
        let u = RedisUrl::parse("redis://[::1]").unwrap();
        assert_eq!(u.port, 6379);
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for bad in [
            "http://h:1",
            "rediss://h:1",
            "redis://",
            "redis://h:port",
            "redis://h:70000",
            "redis://h/notadb",
            "redis://h/1?timeout=3",
            "redis://[::1",
            "redis://[::1]x",
            "redis://:%zz@h",
        ] {
            assert!(
                matches!(RedisUrl::parse(bad), Err(RedisError::InvalidUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_password_is_never_shown() {
        let u = RedisUrl::parse("redis://app:hunter2@h:1/0").unwrap();
        assert!(!format!("{u} {u:?}").contains("hunter2"));
        let err = RedisUrl::parse("redis://app:hunter2@h:notaport").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
