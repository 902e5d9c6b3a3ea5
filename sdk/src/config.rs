//! Reading a policy's JSON config without writing serde code: top-level fields of the
//! object the router passes to `init` (`{}` when none was given).

use serde_json::{Map, Value};

fn object(config: &str) -> Result<Map<String, Value>, String> {
    serde_json::from_str(config).map_err(|e| format!("config is not a JSON object: {e}"))
}

/// The integer field `key`: `Ok(None)` when absent; an error when the config is not a
/// JSON object or the field is not an integer.
pub fn int(config: &str, key: &str) -> Result<Option<i64>, String> {
    match object(config)?.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be an integer, got {v}")),
    }
}

/// The number field `key` (integer or float): `Ok(None)` when absent.
pub fn float(config: &str, key: &str) -> Result<Option<f64>, String> {
    match object(config)?.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a number, got {v}")),
    }
}

/// The string field `key`: `Ok(None)` when absent.
pub fn string(config: &str, key: &str) -> Result<Option<String>, String> {
    match object(config)?.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("{key} must be a string, got {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_says_what_is_wrong() {
        let c = r#"{"max_waiting": 4, "name": "a", "alpha": 0.5}"#;
        assert_eq!(int(c, "max_waiting"), Ok(Some(4)));
        assert_eq!(int(c, "missing"), Ok(None));
        assert_eq!(float(c, "alpha"), Ok(Some(0.5)));
        assert_eq!(string(c, "name"), Ok(Some("a".into())));
        assert!(int(c, "name").unwrap_err().contains("must be an integer"));
        assert!(int("[1]", "x").unwrap_err().contains("not a JSON object"));
    }
}
