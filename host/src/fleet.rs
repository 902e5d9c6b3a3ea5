//! `GET /metrics` on the serving port: the fleet's vLLM metrics combined as one vLLM
//! server would report them, so a load tool pointed at the router (aiperf's server-metrics
//! scrape, `vllm bench serve`) sees the whole fleet instead of a different worker on every
//! call (which looked like counter resets). The router's own metrics stay on
//! `--prometheus-port`.
//!
//! Every worker (each base URL once; data-parallel ranks share it) is scraped in parallel
//! at request time; samples with the same name and labels are **summed** (counters,
//! gauges, histogram buckets, `_sum` and `_count` alike); `# HELP`/`# TYPE` lines are kept
//! once per family. A worker that does not answer within the probe timeout is left out
//! and named in the `# vllm-router:` comment at the top.

use std::collections::HashMap;

/// Merge Prometheus text expositions by summing identical series. Series keep the order
/// in which they were first seen; `# HELP`/`# TYPE` lines appear once, before their
/// family's first sample. Lines that do not parse as `series value [timestamp]` are
/// dropped (a broken worker cannot break the answer).
pub fn merge(texts: &[&str]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, f64> = HashMap::new();
    let mut meta_seen: std::collections::HashSet<String> = Default::default();
    for text in texts {
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                if meta_seen.insert(line.to_string()) {
                    order.push(line.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = split_sample(line) else {
                continue;
            };
            match values.get_mut(series) {
                Some(v) => *v += value,
                None => {
                    values.insert(series.to_string(), value);
                    order.push(series.to_string());
                }
            }
        }
    }
    let mut out = String::new();
    for key in order {
        if key.starts_with('#') {
            out.push_str(&key);
        } else {
            let v = values[&key];
            out.push_str(&key);
            out.push(' ');
            out.push_str(&format_value(v));
        }
        out.push('\n');
    }
    out
}

/// `name{labels} value [timestamp]` → (series, value). Label values may contain spaces
/// and escaped quotes, so the series ends at the closing brace when there is one.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let end = if let Some(open) = line.find('{') {
        let mut escaped = false;
        let mut quoted = false;
        let mut close = None;
        for (i, c) in line[open..].char_indices() {
            match c {
                '\\' if quoted => escaped = !escaped,
                '"' if !escaped => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(open + i + 1);
                    break;
                }
                _ => escaped = false,
            }
            if c != '\\' {
                escaped = false;
            }
        }
        close?
    } else {
        line.find(' ')?
    };
    let series = &line[..end];
    let value = line[end..].split_whitespace().next()?;
    let v = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().ok()?,
    };
    Some((series, v))
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{model_name=\"m\"} 100.0\n# TYPE vllm:e2e_request_latency_seconds histogram\nvllm:e2e_request_latency_seconds_bucket{le=\"1.0\",model_name=\"m\"} 2.0\nvllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 5.0\nvllm:e2e_request_latency_seconds_sum{model_name=\"m\"} 7.5\n";
    const B: &str = "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 1.0\n# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{model_name=\"m\"} 23.0\n# TYPE vllm:e2e_request_latency_seconds histogram\nvllm:e2e_request_latency_seconds_bucket{le=\"1.0\",model_name=\"m\"} 1.0\nvllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 1.0\nvllm:e2e_request_latency_seconds_sum{model_name=\"m\"} 0.25\nbroken line\n";

    #[test]
    fn sums_counters_gauges_and_buckets_and_keeps_metadata_once() {
        let m = merge(&[A, B]);
        assert!(
            m.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 4\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:prompt_tokens_total{model_name=\"m\"} 123\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 6\n"),
            "{m}"
        );
        assert!(
            m.contains("vllm:e2e_request_latency_seconds_sum{model_name=\"m\"} 7.75\n"),
            "{m}"
        );
        assert_eq!(
            m.matches("# TYPE vllm:num_requests_running gauge").count(),
            1
        );
        assert!(!m.contains("broken"));
        // Metadata precedes its samples.
        assert!(
            m.find("# TYPE vllm:prompt_tokens_total").unwrap()
                < m.find("vllm:prompt_tokens_total{").unwrap()
        );
    }

    #[test]
    fn label_values_with_spaces_and_braces_stay_one_series() {
        let t = "x{path=\"/a b}\",q=\"say \\\"hi\\\"\"} 2\nx{path=\"/a b}\",q=\"say \\\"hi\\\"\"} 3 1700000000\n";
        assert_eq!(merge(&[t]), "x{path=\"/a b}\",q=\"say \\\"hi\\\"\"} 5\n");
    }
}
