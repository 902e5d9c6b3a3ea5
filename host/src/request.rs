//! A client request as the router sees it: the original body bytes (forwarded unchanged),
//! the client's headers, and what routing needs, extracted in one borrowed JSON pass.

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::OnceLock;
use vllm_router_sdk::routing::{FieldIndex, routing_text};

/// Fields the router reads from every JSON body. Deserialising into this struct validates
/// the whole body as JSON but allocates nothing for fields it ignores.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Why a body cannot be routed; each maps to a 400-class OpenAI-style error.
#[derive(Debug)]
pub enum BodyError {
    /// Not JSON at all, or truncated.
    Malformed(String),
    /// Valid JSON, but not an object.
    NotObject,
}

/// An inbound request, shared (`Arc`) between the proxy, the policy call and the body
/// stream. Only [`RequestInfo::routing_text`] and [`RequestInfo::body_field`] do more
/// work, on first use.
#[derive(Debug)]
pub struct RequestInfo {
    /// URL path.
    pub path: String,
    /// Path and query, as sent upstream.
    pub path_and_query: String,
    /// HTTP method.
    pub method: http::Method,
    /// The client's headers, as received.
    pub headers: HeaderMap,
    /// The body, exactly as received; forwarded byte for byte.
    pub body: Bytes,
    /// The body's `model`.
    pub model: Option<String>,
    /// The body's `stream` flag.
    pub stream: bool,
    /// Request id (client's or generated).
    pub request_id: String,
    /// Whether the id came from a client header.
    pub request_id_from_client: bool,
    /// The prompt's KV blocks, set before `select` for a policy that reads the prefix
    /// cache ([`crate::kv::KvEvents::prepare`]).
    pub kv: OnceLock<crate::kv::KvPrompt>,
    index: OnceLock<FieldIndex>,
    text: OnceLock<String>,
}

impl RequestInfo {
    /// Parse what routing needs from a JSON body. `body` must be non-empty JSON object
    /// text; the error says what is wrong with it.
    pub fn from_json(
        method: http::Method,
        path_and_query: String,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Self, BodyError> {
        // JSON text is UTF-8 (RFC 8259); serde skips ignored fields without checking.
        if let Err(e) = std::str::from_utf8(&body) {
            return Err(BodyError::Malformed(format!(
                "body is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            )));
        }
        let peek: Peek<'_> = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) if e.is_data() => {
                let first = body.iter().find(|b| !b.is_ascii_whitespace());
                return Err(if first == Some(&b'{') {
                    BodyError::Malformed(e.to_string())
                } else {
                    BodyError::NotObject
                });
            }
            Err(e) => return Err(BodyError::Malformed(e.to_string())),
        };
        let model = peek.model.map(Cow::into_owned);
        let stream = peek.stream.unwrap_or(false);
        Ok(RequestInfo {
            path,
            path_and_query,
            method,
            headers,
            body,
            model,
            stream,
            request_id: String::new(),
            request_id_from_client: false,
            kv: OnceLock::new(),
            index: OnceLock::new(),
            text: OnceLock::new(),
        })
    }

    /// A request without a JSON body (GET, or a body-less POST to a non-generation path).
    pub fn raw(
        method: http::Method,
        path_and_query: String,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Self {
        RequestInfo {
            path,
            path_and_query,
            method,
            headers,
            body,
            model: None,
            stream: false,
            request_id: String::new(),
            request_id_from_client: false,
            kv: OnceLock::new(),
            index: OnceLock::new(),
            text: OnceLock::new(),
        }
    }

    fn index(&self) -> &FieldIndex {
        self.index.get_or_init(|| FieldIndex::new(&self.body))
    }

    /// Routing text (see `vllm_router_sdk::routing::routing_text`), computed once.
    pub fn routing_text(&self) -> &str {
        self.text
            .get_or_init(|| routing_text(&self.body, self.index()))
    }

    /// The raw JSON text of top-level body field `name` (from the same one-pass index
    /// as [`RequestInfo::body_field`]), e.g. `[{"role":"user",…}]` for `messages`.
    pub fn raw_field(&self, name: &str) -> Option<&str> {
        let r = self.index().range(name)?;
        std::str::from_utf8(self.body.get(r)?).ok()
    }

    /// A scalar body field by dotted path.
    pub fn body_field(&self, path: &str) -> Option<String> {
        self.index().get(&self.body, path)
    }

    /// A client header as text (first value; non-UTF-8 values are not visible).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a policy may read of a request (the runtime crate knows no HTTP; this is the
/// bridge).
impl vllm_router_runtime::RequestView for RequestInfo {
    fn path(&self) -> &str {
        &self.path
    }
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        RequestInfo::header(self, name)
    }
    fn body_field(&self, path: &str) -> Option<String> {
        RequestInfo::body_field(self, path)
    }
    fn body_pointer(&self, pointer: &str) -> Option<String> {
        self.index().pointer(&self.body, pointer)
    }
    fn routing_text(&self) -> &str {
        RequestInfo::routing_text(self)
    }
    fn body_length(&self) -> u64 {
        self.body.len() as u64
    }
    fn request_id(&self) -> &str {
        &self.request_id
    }
    fn prefix_match(&self, candidates: &[u32], out: &mut Vec<u64>) -> u32 {
        match self.kv.get() {
            Some(p) => p.matches(candidates, out),
            None => {
                out.extend(candidates.iter().map(|_| 0u64));
                0
            }
        }
    }
}
