//! What a connection knows about its client, and how its commands' JSON is read.

use serde_json::value::RawValue;

/// What a connection knows about its client after `HELLO`.
pub(crate) struct Session {
    pub(crate) wid: Option<String>,
    /// This connection registered the worker `wid` (it was its first open connection): the
    /// worker's state (quiet, terminate) applies to its `FETCH`es, and to no other
    /// connection's, as on the real server.
    pub(crate) holds_state: bool,
}

/// Decodes a JSON object into `T`. Unlike plain serde, an array is not accepted for a
/// struct (the real server's decoder refuses it too).
pub(crate) fn from_object<T: serde::de::DeserializeOwned>(
    data: &[u8],
) -> Result<T, serde_json::Error> {
    let raw: Box<RawValue> = serde_json::from_slice(data)?;
    if !raw.get().starts_with('{') {
        return Err(serde::de::Error::custom("expected a JSON object"));
    }
    serde_json::from_str(raw.get())
}
