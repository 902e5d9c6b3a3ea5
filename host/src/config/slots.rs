//! Policy slots from the flags or the TOML slots file (`--policy-slots-file`), the PD
//! slots' specs, and built-ins' `init` configs from their tunable flags.

use super::Args;
use std::path::PathBuf;

impl Args {
    /// The `init` config for built-in policy `name`: its tunables from the flags (each
    /// built-in declares its own flag → config mapping, see
    /// [`crate::policy::builtin::Builtin::tunables`]), then `--policy-config` on top.
    /// Other policies get `--policy-config` alone.
    pub fn builtin_config(&self, name: &str) -> String {
        self.builtin_config_with(name, &self.policy_config)
    }

    /// Like [`Args::builtin_config`] with `base` (a JSON object) instead of
    /// `--policy-config`: keys in `base` win over the flags.
    pub fn builtin_config_with(&self, name: &str, base: &str) -> String {
        let mut cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(base).unwrap_or_default();
        if let Some(tunables) = crate::policy::builtin::find(name).and_then(|b| b.tunables) {
            for (k, v) in tunables(self) {
                cfg.entry(k).or_insert(v);
            }
        }
        serde_json::Value::Object(cfg).to_string()
    }
}

/// One policy slot to create at startup.
#[derive(Debug, Clone)]
pub struct SlotDef {
    /// Slot name.
    pub name: String,
    /// Component source and `init` config.
    pub spec: crate::policy::SlotSpec,
    /// A/B weight.
    pub weight: u32,
    /// Shadow slot.
    pub shadow: bool,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotsFile {
    #[serde(default)]
    sticky: bool,
    #[serde(default, rename = "slot")]
    slots: Vec<SlotFileEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotFileEntry {
    name: String,
    builtin: Option<String>,
    path: Option<PathBuf>,
    config: Option<toml::Value>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    shadow: bool,
    /// This slot's sandbox limits (else the router's `--policy-*` flags).
    timeout_ms: Option<u64>,
    max_memory_mb: Option<u64>,
    max_instances: Option<u64>,
}

fn one() -> u32 {
    1
}

impl Args {
    fn source(
        name: Option<&String>,
        wasm: Option<&PathBuf>,
    ) -> Option<crate::policy::PolicySource> {
        use crate::policy::PolicySource;
        match (wasm, name) {
            (Some(p), _) => Some(PolicySource::File(p.clone())),
            (None, Some(n)) => Some(PolicySource::Builtin(n.clone())),
            (None, None) => None,
        }
    }

    fn spec(&self, source: crate::policy::PolicySource, config: &str) -> crate::policy::SlotSpec {
        use crate::policy::PolicySource;
        let config = match &source {
            PolicySource::Builtin(n) => self.builtin_config_with(n, config),
            PolicySource::File(_) => config.to_string(),
        };
        crate::policy::SlotSpec {
            source,
            config,
            limits: Default::default(),
        }
    }

    /// The slots to start with, and whether A/B assignment is sticky: from
    /// `--policy-slots-file` when given, else `default` (--policy / --policy-wasm), `b`
    /// (--ab-*) and `shadow` (--shadow-*). Errors name the flag or file entry.
    pub fn slot_defs(&self) -> Result<(Vec<SlotDef>, bool), String> {
        use crate::policy::PolicySource;
        if let Some(file) = &self.policy_slots_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("--policy-slots-file {}: {e}", file.display()))?;
            let parsed: SlotsFile = toml::from_str(&text)
                .map_err(|e| format!("--policy-slots-file {}: {e}", file.display()))?;
            let dir = file.parent().map(PathBuf::from).unwrap_or_default();
            let mut defs = Vec::new();
            for e in parsed.slots {
                let source = match (e.builtin, e.path) {
                    (Some(b), None) => PolicySource::Builtin(b),
                    (None, Some(p)) => {
                        PolicySource::File(if p.is_absolute() { p } else { dir.join(p) })
                    }
                    _ => {
                        return Err(format!(
                            "--policy-slots-file: slot '{}' needs exactly one of `builtin` or `path`",
                            e.name
                        ));
                    }
                };
                let config = match e.config {
                    None => "{}".to_string(),
                    Some(toml::Value::String(s)) => s,
                    Some(v) => serde_json::to_string(&v).map_err(|err| {
                        format!("--policy-slots-file: slot '{}': config: {err}", e.name)
                    })?,
                };
                if defs.iter().any(|d: &SlotDef| d.name == e.name) {
                    return Err(format!(
                        "--policy-slots-file: slot '{}' is defined twice",
                        e.name
                    ));
                }
                let mut spec = self.spec(source, &config);
                spec.limits = crate::policy::SlotLimits {
                    timeout_ms: e.timeout_ms,
                    max_memory_mb: e.max_memory_mb,
                    max_instances: e.max_instances,
                };
                defs.push(SlotDef {
                    name: e.name,
                    spec,
                    weight: e.weight,
                    shadow: e.shadow,
                });
            }
            if !defs.iter().any(|d| !d.shadow && d.weight > 0) {
                return Err(
                    "--policy-slots-file: at least one non-shadow slot needs weight > 0".into(),
                );
            }
            return Ok((defs, parsed.sticky));
        }
        let main = Self::source(Some(&self.policy), self.policy_wasm.as_ref()).expect("policy");
        let b = Self::source(self.ab_policy.as_ref(), self.ab_policy_wasm.as_ref());
        let main_weight = if b.is_some() {
            100 - self.ab_percent
        } else {
            100
        };
        let mut defs = vec![SlotDef {
            name: "default".into(),
            spec: self.spec(main, &self.policy_config),
            weight: main_weight,
            shadow: false,
        }];
        if let Some(src) = b {
            defs.push(SlotDef {
                name: "b".into(),
                spec: self.spec(src, &self.ab_policy_config),
                weight: self.ab_percent,
                shadow: false,
            });
        }
        if let Some(src) = Self::source(
            self.shadow_policy.as_ref(),
            self.shadow_policy_wasm.as_ref(),
        ) {
            defs.push(SlotDef {
                name: "shadow".into(),
                spec: self.spec(src, &self.shadow_policy_config),
                weight: 0,
                shadow: true,
            });
        }
        if !defs.iter().any(|d| !d.shadow && d.weight > 0) {
            return Err("no policy slot would take traffic".into());
        }
        Ok((defs, self.ab_sticky))
    }
}

impl Args {
    /// PD mode: the prefill and decode slot specs (`--prefill-policy[-wasm]`,
    /// `--decode-policy[-wasm]`, default `--policy` / `--policy-wasm`).
    pub fn pd_specs(&self) -> (crate::policy::SlotSpec, crate::policy::SlotSpec) {
        let main = || Self::source(Some(&self.policy), self.policy_wasm.as_ref()).expect("policy");
        let prefill = Self::source(
            self.prefill_policy.as_ref(),
            self.prefill_policy_wasm.as_ref(),
        )
        .unwrap_or_else(main);
        let decode = Self::source(
            self.decode_policy.as_ref(),
            self.decode_policy_wasm.as_ref(),
        )
        .unwrap_or_else(main);
        (
            self.spec(prefill, &self.policy_config),
            self.spec(decode, &self.policy_config),
        )
    }
}
