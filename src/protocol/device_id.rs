//! A device's identity, as it names itself in CONNECT (`DeviceId`).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A device's id: the text of CONNECT's `DeviceId`, shared (cheap to clone, `Send`). It
/// keys the registry and names a session's device; anything that takes `&str` takes it
/// (it derefs to `str`), and a map keyed by `DeviceId` is looked up by `&str`.
///
/// The text is the device's, unchecked: its `Display` escapes it as
/// [`logging::Untrusted`](crate::logging::Untrusted) does, `as_str` gives it as it is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    /// The id `id`.
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for DeviceId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for DeviceId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for DeviceId {
    fn from(id: String) -> Self {
        Self(Arc::from(id))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// As a log line may show it: through [`logging::Untrusted`](crate::logging::Untrusted)
/// (an ordinary id as it is, anything else quoted, escaped and cut).
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::logging::Untrusted(&self.0).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_keyed_by_device_id_is_looked_up_by_text() {
        let mut map = ahash::AHashMap::new();
        map.insert(DeviceId::new("dev-1"), 1);
        assert_eq!(map.get("dev-1"), Some(&1));
        assert_eq!(map.get("dev-2"), None);
        let id = DeviceId::from(String::from("dev-1"));
        assert_eq!(id.as_str(), "dev-1");
        assert_eq!(format!("{id} {id:?}"), r#"dev-1 "dev-1""#);
        let forged = DeviceId::new("x\nINFO listening for devices on 1.2.3.4:5");
        assert!(!forged.to_string().contains('\n'), "{forged}");
    }
}
