//! What a request means for routing, computed from its JSON body without re-serialising
//! it. The router host and the native test harness both use these functions, so a policy
//! sees the same routing text in `cargo test` as in production.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write;
use std::ops::Range;

/// Byte ranges of the top-level fields of a JSON object body, built once per request so
/// several [`FieldIndex::get`] calls scan the body only once.
#[derive(Debug, Default, Clone)]
pub struct FieldIndex {
    fields: Vec<(String, Range<usize>)>,
}

/// A member name, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// The members of a JSON object in document order, values unparsed. A list, not a hash
/// map: a request body has a handful of top-level fields, and hashing each name cost
/// more than the scan (callgrind, `tests/bench/instructions.sh`). Lookups scan from the
/// end, so a repeated name's last value wins, as with `serde_json::Value`.
struct Members<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(8).min(64));
                while let Some(entry) = m.next_entry::<Key<'de>, &'de RawValue>()? {
                    v.push(entry);
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(Visit)
    }
}

fn object_ranges(body: &[u8], base: usize) -> Option<Vec<(String, Range<usize>)>> {
    let Members(members) = serde_json::from_slice(body).ok()?;
    let start = body.as_ptr() as usize;
    Some(
        members
            .into_iter()
            .map(|(k, v)| {
                let off = v.get().as_ptr() as usize - start;
                (k.0.into_owned(), base + off..base + off + v.get().len())
            })
            .collect(),
    )
}

impl FieldIndex {
    /// Index the top level of `body`. A body that is not a JSON object gives an empty index.
    pub fn new(body: &[u8]) -> Self {
        FieldIndex {
            fields: object_ranges(body, 0).unwrap_or_default(),
        }
    }

    /// Byte range of top-level field `name` in the body the index was built from.
    pub fn range(&self, name: &str) -> Option<Range<usize>> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, r)| r.clone())
    }

    /// A scalar field by dotted path (`user`, `session_params.session_id`): strings
    /// unquoted, numbers and booleans as JSON text; objects, arrays, null → `None`.
    pub fn get(&self, body: &[u8], path: &str) -> Option<String> {
        let mut parts = path.split('.');
        let mut range = self.range(parts.next()?)?;
        for part in parts {
            let sub = object_ranges(&body[range.clone()], range.start)?;
            range = sub.into_iter().rev().find(|(k, _)| k == part)?.1;
        }
        scalar_text(&body[range])
    }
}

impl FieldIndex {
    /// A scalar field by JSON Pointer (RFC 6901): `/metadata/session_id`,
    /// `/messages/0/content`; `~1` stands for `/` and `~0` for `~` in a key. Same return
    /// rules as [`FieldIndex::get`]; a pointer that does not start with `/`, an array
    /// index that is not a plain decimal (`01`, `-`), or a path that leaves the body
    /// gives `None`. Only the objects and arrays on the path are scanned.
    pub fn pointer(&self, body: &[u8], pointer: &str) -> Option<String> {
        let rest = pointer.strip_prefix('/')?;
        let mut tokens = rest
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"));
        let mut range = self.range(&tokens.next()?)?;
        for token in tokens {
            let raw = &body[range.clone()];
            range = match raw.first()? {
                b'{' => {
                    let sub = object_ranges(raw, range.start)?;
                    sub.into_iter().rev().find(|(k, _)| *k == token)?.1
                }
                b'[' => {
                    if token.is_empty()
                        || !token.bytes().all(|b| b.is_ascii_digit())
                        || (token.len() > 1 && token.starts_with('0'))
                    {
                        return None;
                    }
                    let i: usize = token.parse().ok()?;
                    let items: Vec<&RawValue> = serde_json::from_slice(raw).ok()?;
                    let v = items.get(i)?.get();
                    let off = v.as_ptr() as usize - raw.as_ptr() as usize;
                    range.start + off..range.start + off + v.len()
                }
                _ => return None,
            };
        }
        scalar_text(&body[range])
    }
}

/// A scalar body field by JSON Pointer; see [`FieldIndex::pointer`].
pub fn body_pointer(body: &[u8], pointer: &str) -> Option<String> {
    FieldIndex::new(body).pointer(body, pointer)
}

fn scalar_text(raw: &[u8]) -> Option<String> {
    match raw.first()? {
        b'"' => serde_json::from_slice::<String>(raw).ok(),
        b'{' | b'[' | b'n' => None,
        _ => std::str::from_utf8(raw).ok().map(str::to_owned),
    }
}

/// A scalar body field by dotted path; see [`FieldIndex::get`].
pub fn body_field(body: &[u8], path: &str) -> Option<String> {
    FieldIndex::new(body).get(body, path)
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<Part<'a>>),
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

fn render_content(raw: &RawValue, out: &mut String) {
    match serde_json::from_str::<Content<'_>>(raw.get()) {
        Ok(Content::Text(t)) => out.push_str(&t),
        Ok(Content::Parts(parts)) => {
            for t in parts.iter().filter_map(|p| p.text.as_deref()) {
                out.push_str(t);
            }
        }
        Err(_) => {}
    }
}

/// Render a chat `messages` array (raw JSON) as `role\ncontent\n` per message, in order.
/// Text parts of multi-part content are concatenated; images and tool calls are skipped.
/// Stable: turn N+1's text starts with turn N's text, so prefix trees see the shared prefix.
pub fn render_messages(raw: &[u8], out: &mut String) {
    if let Ok(msgs) = serde_json::from_slice::<Vec<Message<'_>>>(raw) {
        render_message_list(&msgs, out);
    }
}

fn render_message_list(msgs: &[Message<'_>], out: &mut String) {
    for m in msgs {
        out.push_str(m.role.as_deref().unwrap_or(""));
        out.push('\n');
        if let Some(c) = m.content {
            render_content(c, out);
        }
        out.push('\n');
    }
}

/// Render a completions `prompt` / embeddings `input`: a string as is, a list of strings
/// joined by `\n`, token ids as space-separated decimals, a list of such lists joined by
/// `\n`.
pub fn render_prompt(raw: &[u8], out: &mut String) {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P<'a> {
        Text(#[serde(borrow)] Cow<'a, str>),
        Ids(Vec<i64>),
        Many(#[serde(borrow)] Vec<P<'a>>),
        Messages(#[serde(borrow)] Vec<Message<'a>>),
    }
    fn go(p: &P<'_>, out: &mut String) {
        match p {
            P::Text(t) => out.push_str(t),
            P::Ids(ids) => {
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    let _ = write!(out, "{id}");
                }
            }
            P::Many(items) => {
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    go(it, out);
                }
            }
            P::Messages(msgs) => render_message_list(msgs, out),
        }
    }
    if let Ok(p) = serde_json::from_slice::<P<'_>>(raw) {
        go(&p, out);
    }
}

/// The routing text of a request body: chat `messages` (rendered, see
/// [`render_messages`]), else `prompt`, else `input` (embeddings, responses), else `text`
/// (SGLang-style `/generate`); empty when none is present.
pub fn routing_text(body: &[u8], index: &FieldIndex) -> String {
    let mut out = String::new();
    if let Some(r) = index.range("messages") {
        render_messages(&body[r], &mut out);
    } else if let Some(r) = index
        .range("prompt")
        .or_else(|| index.range("input"))
        .or_else(|| index.range("text"))
    {
        render_prompt(&body[r], &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_field_reads_its_last_value_and_escaped_names_match() {
        let body = br#"{"user":"a","metadata":{"k":1,"k":2},"user":"b","e\u0073c":"x"}"#;
        let idx = FieldIndex::new(body);
        assert_eq!(idx.get(body, "user").as_deref(), Some("b"));
        assert_eq!(idx.get(body, "metadata.k").as_deref(), Some("2"));
        assert_eq!(idx.pointer(body, "/metadata/k").as_deref(), Some("2"));
        assert_eq!(idx.get(body, "esc").as_deref(), Some("x"));
        assert!(
            FieldIndex::new(b"[1,2]").range("0").is_none(),
            "not an object: empty index"
        );
    }

    #[test]
    fn json_pointer_reaches_arrays_and_escaped_keys() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}],"metadata":{"session_id":"s-1","a/b":7,"m~n":true,"nested":{"k":[1,2]}},"n":null}"#;
        let idx = FieldIndex::new(body);
        let p = |ptr: &str| idx.pointer(body, ptr);
        assert_eq!(p("/model").as_deref(), Some("m"));
        assert_eq!(p("/messages/1/content").as_deref(), Some("yo"));
        assert_eq!(p("/messages/0/role").as_deref(), Some("user"));
        assert_eq!(p("/metadata/session_id").as_deref(), Some("s-1"));
        assert_eq!(p("/metadata/a~1b").as_deref(), Some("7"));
        assert_eq!(p("/metadata/m~0n").as_deref(), Some("true"));
        assert_eq!(p("/metadata/nested/k/1").as_deref(), Some("2"));
        // Not scalars, missing, malformed.
        assert_eq!(p("/messages"), None);
        assert_eq!(p("/messages/0"), None);
        assert_eq!(p("/n"), None);
        assert_eq!(p("/messages/2/content"), None);
        assert_eq!(p("/messages/01/content"), None);
        assert_eq!(p("/messages/-"), None);
        assert_eq!(p("model"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("/model/x"), None);
        assert_eq!(body_pointer(b"not json", "/a"), None);
    }

    #[test]
    fn chat_turns_share_a_prefix() {
        let t1 = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
        let t2 = br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"text","text":"hello"}]},{"role":"user","content":"more"}],"model":"m"}"#;
        let a = routing_text(t1, &FieldIndex::new(t1));
        let b = routing_text(t2, &FieldIndex::new(t2));
        assert_eq!(a, "system\nbe brief\nuser\nhi\n");
        assert!(b.starts_with(&a), "{b:?} should extend {a:?}");
        assert!(b.ends_with("assistant\nhello\nuser\nmore\n"));
    }

    #[test]
    fn prompts_of_each_shape() {
        let cases: [(&[u8], &str); 4] = [
            (br#"{"prompt":"once upon"}"#, "once upon"),
            (br#"{"prompt":["a","b"]}"#, "a\nb"),
            (br#"{"prompt":[1,2,3]}"#, "1 2 3"),
            (br#"{"input":"embed me"}"#, "embed me"),
        ];
        for (body, want) in cases {
            assert_eq!(routing_text(body, &FieldIndex::new(body)), want);
        }
    }

    #[test]
    fn body_fields_are_parsed_not_scanned() {
        let body = br#"{"prompt":"user: mallory","session_params":{"session_id":"s-1"},"user":"bob","n":3,"x":null}"#;
        let idx = FieldIndex::new(body);
        assert_eq!(idx.get(body, "user").as_deref(), Some("bob"));
        assert_eq!(
            idx.get(body, "session_params.session_id").as_deref(),
            Some("s-1")
        );
        assert_eq!(idx.get(body, "n").as_deref(), Some("3"));
        assert_eq!(idx.get(body, "x"), None);
        assert_eq!(idx.get(body, "session_params"), None);
        assert_eq!(idx.get(body, "missing"), None);
        assert_eq!(body_field(b"[1,2]", "user"), None);
    }

    #[test]
    fn escaped_keys_and_values() {
        let body = br#"{"us\u0065r":"b\"ob"}"#;
        assert_eq!(body_field(body, "user").as_deref(), Some("b\"ob"));
    }
}

/// Client headers that carry a session key, in priority order (consistent_hash's key,
/// and the router's sticky A/B assignment).
pub const SESSION_KEY_HEADERS: &[&str] = &[
    "x-session-id",
    "x-user-id",
    "x-tenant-id",
    "x-request-id",
    "x-correlation-id",
    "x-trace-id",
];

/// JSON body fields that carry a session key, checked after [`SESSION_KEY_HEADERS`].
pub const SESSION_KEY_FIELDS: &[&str] =
    &["session_params.session_id", "user", "session_id", "user_id"];

/// 64-bit hash of `bytes`: eight bytes per step (xor, multiply by the 64-bit golden
/// ratio, rotate), then MurmurHash3's `fmix64` finaliser over the state and the length.
/// Deterministic on every platform, so every router replica builds the same ring; about
/// 8× faster than byte-wise FNV-1a on long routing texts.
pub fn stable_hash64(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^= bytes.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
