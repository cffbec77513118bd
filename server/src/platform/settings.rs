//! A function's settings: one table, read alike from a manifest in the code (`cloudfunc.toml`
//! or `manifest.json`), form fields, query parameters and the JSON APIs, and resolved with
//! the server's defaults and bounds into a [`Version`].
//!
//! The [`settings!`] table below is the only place a setting is named: the struct, its
//! aliases, the list of known names, the overlay of one set on another and the parsing of
//! text fields all come from it. A stored [`Version`] reads back as the settings that made it
//! through serde and the same aliases ([`Settings::of_version`]), so a redeploy starts from
//! the previous version's settings without a second list.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cloudfunc_sandbox::Runtime;
use serde::{Deserialize, Serialize};

use super::{PlatformError, Result};
use crate::isolation::{Engines, Isolation};
use crate::model::{now_ms, Version};

/// A setting given as text (a form field, a query parameter) parsed into its type.
pub trait FromField: Sized {
    /// Parses `value`, given for the setting `key`; the error says what to send.
    fn from_field(key: &str, value: &str) -> std::result::Result<Self, String>;
}

impl FromField for String {
    fn from_field(_: &str, value: &str) -> std::result::Result<Self, String> {
        Ok(value.to_string())
    }
}

macro_rules! number_field {
    ($($t:ty => $what:literal),*) => {$(
        impl FromField for $t {
            fn from_field(key: &str, value: &str) -> std::result::Result<Self, String> {
                value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{key} must be {}, got {value:?}", $what))
            }
        }
    )*};
}

number_field!(u32 => "a whole number", u64 => "a whole number", f64 => "a number");

impl FromField for BTreeMap<String, String> {
    fn from_field(key: &str, value: &str) -> std::result::Result<Self, String> {
        serde_json::from_str(value).map_err(|_| {
            format!("{key} must be a JSON object of strings, like {{\"KEY\": \"value\"}}")
        })
    }
}

impl FromField for Vec<String> {
    fn from_field(key: &str, value: &str) -> std::result::Result<Self, String> {
        let value = value.trim();
        if value.starts_with('[') {
            return serde_json::from_str(value)
                .map_err(|_| format!("{key} must be a JSON array of names, like [\"DB_PASSWORD\"], or names separated by commas"));
        }
        Ok(value
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect())
    }
}

impl FromField for Runtime {
    fn from_field(_: &str, value: &str) -> std::result::Result<Self, String> {
        value.parse::<Runtime>().map_err(|e| e.to_string())
    }
}

impl FromField for Isolation {
    fn from_field(_: &str, value: &str) -> std::result::Result<Self, String> {
        value.parse()
    }
}

/// Declares [`Settings`] from one table: each setting's doc, name, type and aliases.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty $([$($alias:literal),+])? ;)*) => {
        /// Settings a deploy may give. Every field is optional: what is missing comes from
        /// the previous version, then from the server's defaults.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                $($(#[serde(alias = $alias)])+)?
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl Settings {
            /// Every name a setting is known by, aliases included.
            pub const NAMES: &'static [&'static str] =
                &[$(stringify!($field), $($($alias,)+)?)*];

            /// Fields of `other` win over ours.
            pub fn overlay(mut self, other: Settings) -> Settings {
                // `timeout` and `timeout_ms` are one setting in two units: given in either
                // by `other`, it replaces ours in both (a version's own timeout, read back in
                // milliseconds, would otherwise win over a new deploy's `timeout` seconds).
                if other.timeout.is_some() || other.timeout_ms.is_some() {
                    self.timeout = None;
                    self.timeout_ms = None;
                }
                $(if other.$field.is_some() { self.$field = other.$field; })*
                self
            }

            /// Settings from text fields (a form, a query string); a setting named twice
            /// (under two aliases) or an unknown name is refused.
            pub fn from_fields(fields: &HashMap<String, String>) -> std::result::Result<Settings, String> {
                let mut s = Settings::default();
                let mut keys: Vec<&String> = fields.keys().collect();
                keys.sort();
                for key in keys {
                    let value = &fields[key];
                    match key.as_str() {
                        $(
                            stringify!($field) $($(| $alias)+)? => {
                                if s.$field.is_some() {
                                    return Err(format!(
                                        "{} is given twice (under two of its names)",
                                        stringify!($field)
                                    ));
                                }
                                s.$field = Some(<$ty as FromField>::from_field(key, value)?);
                            }
                        )*
                        other => {
                            return Err(format!(
                                "unknown setting {other:?}; known: {}",
                                Settings::NAMES.join(", ")
                            ))
                        }
                    }
                }
                Ok(s)
            }
        }
    };
}

settings! {
    /// The function's name, `^[a-z0-9_-]{1,64}$`.
    name: String;
    /// `python` or `node`; by default guessed from the code's file names.
    runtime: Runtime ["language"];
    /// `module.function`; by default the runtime's conventions.
    handler: String ["function_name"];
    /// Per-call timeout in seconds.
    timeout: f64;
    /// Per-call timeout in milliseconds (wins over `timeout`).
    timeout_ms: u64;
    /// Memory limit in MiB.
    memory: u64 ["memory_mb", "memory_limit_mb"];
    /// CPU limit in thousandths of a core.
    cpu: u32 ["cpu_millicores"];
    /// Environment variables the function sees.
    env: BTreeMap<String, String>;
    /// Names of the tenant's secrets (`cloudfunc secrets set`) put in its environment.
    secrets: Vec<String>;
    /// Retries of an async task interrupted by a crash (0: at most once).
    max_retries: u32;
    /// `container` or `gvisor`.
    isolation: Isolation;
    /// Seconds a sandbox stays warm after a call.
    keep_warm: u64 ["keep_warm_s"];
    /// Sandboxes kept warm even when idle.
    min_instances: u32;
    /// Calls at once; past it sync calls queue briefly, then get 429.
    max_instances: u32;
    /// Where an async run's result goes when it succeeds: a function of the same tenant, or
    /// `chain:NAME` (empty: nowhere).
    on_success: String;
    /// Where an async run's error record goes when it fails (as `on_success`).
    on_failure: String;
}

/// The server's defaults and bounds for settings a deploy leaves out or asks too much of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Default per-call timeout.
    pub default_timeout_ms: u64,
    /// Longest timeout a function may ask for.
    pub max_timeout_ms: u64,
    /// Default memory limit.
    pub default_memory_mb: u64,
    /// Largest memory a function may ask for.
    pub max_memory_mb: u64,
    /// Default CPU limit.
    pub default_cpu_millicores: u32,
    /// Default seconds a sandbox stays warm (seed 003's 60 s).
    pub default_keep_warm_s: u64,
    /// A function's `max_instances` when it sets none.
    pub default_max_instances: u32,
}

impl Settings {
    /// Reads `cloudfunc.toml` or `manifest.json` from a code directory, if there is one.
    pub fn from_code_dir(dir: &Path) -> Result<Settings> {
        let toml_path = dir.join("cloudfunc.toml");
        if toml_path.is_file() {
            let text = std::fs::read_to_string(&toml_path)
                .map_err(|e| PlatformError::BadRequest(format!("cloudfunc.toml: {e}")))?;
            return Settings::from_toml(&text);
        }
        let json_path = dir.join("manifest.json");
        if json_path.is_file() {
            let text = std::fs::read(&json_path)
                .map_err(|e| PlatformError::BadRequest(format!("manifest.json: {e}")))?;
            return serde_json::from_slice(&text)
                .map_err(|e| PlatformError::BadRequest(format!("manifest.json is invalid: {e}")));
        }
        Ok(Settings::default())
    }

    /// Settings from a `cloudfunc.toml`'s text.
    pub fn from_toml(text: &str) -> Result<Settings> {
        toml::from_str(text).map_err(|e| {
            PlatformError::BadRequest(format!("cloudfunc.toml is invalid: {}", e.message()))
        })
    }

    /// The settings a stored version was made with, every one of them given.
    pub fn of_version(version: &Version) -> Settings {
        let mut value = serde_json::to_value(version).unwrap_or_default();
        if let Some(fields) = value.as_object_mut() {
            fields.remove("version");
            fields.remove("created_at");
            fields.retain(|_, v| !v.is_null());
        }
        serde_json::from_value(value).unwrap_or_else(|e| {
            unreachable!("every field of a version is a setting or an alias of one: {e}")
        })
    }

    /// Checks the settings against `bounds`, fills in what is missing, and makes version
    /// `number` of code in `code_dir` (which must exist, to guess the runtime from).
    pub fn resolve(
        self,
        number: u32,
        code_dir: &Path,
        bounds: &Bounds,
        engines: &Engines,
    ) -> Result<Version> {
        let bad = |m: String| PlatformError::BadRequest(m);
        let runtime = match self.runtime {
            Some(r) => r,
            None => guess_runtime(code_dir).ok_or_else(|| {
                bad("cannot tell the runtime: set runtime to \"python\" or \"node\"".into())
            })?,
        };
        if !runtime.available() {
            return Err(bad(format!(
                "the {runtime} runtime is not installed on this server"
            )));
        }
        let timeout_ms = match (self.timeout_ms, self.timeout) {
            (Some(ms), _) => ms,
            // Finite and positive, and capped below: the cast cannot wrap.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            (None, Some(secs)) if secs.is_finite() && secs > 0.0 => {
                (secs * 1000.0).round().min(u64::MAX as f64) as u64
            }
            (None, Some(_)) => {
                return Err(bad("timeout must be a positive number of seconds".into()))
            }
            (None, None) => bounds.default_timeout_ms,
        };
        if timeout_ms == 0 || timeout_ms > bounds.max_timeout_ms {
            return Err(bad(format!(
                "timeout must be between 1 ms and {} ms",
                bounds.max_timeout_ms
            )));
        }
        let memory_mb = self.memory.unwrap_or(bounds.default_memory_mb);
        if !(16..=bounds.max_memory_mb).contains(&memory_mb) {
            return Err(bad(format!(
                "memory must be between 16 and {} MiB",
                bounds.max_memory_mb
            )));
        }
        let cpu = self.cpu.unwrap_or(bounds.default_cpu_millicores);
        if !(10..=64_000).contains(&cpu) {
            return Err(bad("cpu must be between 10 and 64000 millicores".into()));
        }
        let env = self.env.unwrap_or_default();
        if let Some(key) = env.keys().find(|k| !valid_env_name(k)) {
            return Err(bad(format!(
                "environment variable name {key:?} is not [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        check_env_values(&env)?;
        let secrets = self.secrets.unwrap_or_default();
        if let Some(name) = secrets.iter().find(|n| !valid_env_name(n)) {
            return Err(bad(format!(
                "secret name {name:?} is not [A-Za-z_][A-Za-z0-9_]* (a secret is put in the environment under its name)"
            )));
        }
        if let Some(name) = secrets.iter().find(|n| env.contains_key(*n)) {
            return Err(bad(format!(
                "{name} is both in env and in secrets: keep it in one"
            )));
        }
        if let Some(h) = &self.handler {
            let ok = !h.is_empty()
                && h.len() <= 128
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok {
                return Err(bad(format!("handler {h:?} must look like module.function")));
            }
        }
        let isolation = self
            .isolation
            .unwrap_or_else(|| engines.default_isolation());
        // Refused now, not when it first runs.
        engines.get(isolation).map_err(PlatformError::BadRequest)?;
        let keep_warm_s = self.keep_warm.unwrap_or(bounds.default_keep_warm_s);
        if keep_warm_s > 3600 {
            return Err(bad("keep_warm must be between 0 and 3600 seconds".into()));
        }
        let max_instances = self.max_instances.unwrap_or(bounds.default_max_instances);
        let min_instances = self.min_instances.unwrap_or(0);
        if !(1..=1000).contains(&max_instances)
            || min_instances > 100
            || min_instances > max_instances
        {
            return Err(bad(
                "instances: max_instances must be 1 to 1000, min_instances 0 to 100 and at most max_instances".into(),
            ));
        }
        let on_success = destination(self.on_success, "on_success")?;
        let on_failure = destination(self.on_failure, "on_failure")?;
        Ok(Version {
            on_success,
            on_failure,
            version: number,
            runtime,
            handler: self.handler,
            timeout_ms,
            memory_mb,
            cpu_millicores: cpu,
            env,
            secrets,
            secret_env: Default::default(),
            max_retries: self.max_retries.unwrap_or(0).min(10),
            isolation,
            keep_warm_s,
            min_instances,
            max_instances,
            code_dir: code_dir.to_string_lossy().into_owned(),
            created_at: now_ms(),
        })
    }
}

/// A destination as given: a function's name or `chain:NAME`; empty means none.
fn destination(given: Option<String>, key: &str) -> Result<Option<String>> {
    let Some(d) = given.filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    if crate::model::valid_name(d.strip_prefix("chain:").unwrap_or(&d)) {
        Ok(Some(d))
    } else {
        Err(PlatformError::BadRequest(format!(
            "{key} must name a function or chain:NAME, got {d:?}"
        )))
    }
}

/// Largest value of one environment variable, bytes: a secret's limit, and half of what the
/// kernel takes for one string of a process's environment (beyond it `execve` fails, and the
/// runtime died at load with no word of why).
pub const MAX_ENV_VALUE_BYTES: usize = crate::platform::secrets::MAX_SECRET_BYTES;

/// Largest environment a function may set, names and values together (a process's whole
/// environment and arguments share a few MiB at most).
pub const MAX_ENV_BYTES: usize = 256 * 1024;

/// Refuses environment values no process can be given: a NUL byte ends a C string, and one
/// too long (or too many together) makes `execve` fail.
fn check_env_values(env: &BTreeMap<String, String>) -> Result<()> {
    let bad = |m: String| PlatformError::BadRequest(m);
    if let Some(key) = env.iter().find(|(_, v)| v.contains('\0')).map(|(k, _)| k) {
        return Err(bad(format!(
            "environment variable {key}'s value holds a NUL byte, which an environment cannot carry"
        )));
    }
    if let Some((key, value)) = env.iter().find(|(_, v)| v.len() > MAX_ENV_VALUE_BYTES) {
        return Err(bad(format!(
            "environment variable {key}'s value is {} bytes; the limit is {MAX_ENV_VALUE_BYTES} (put more in a file beside the code)",
            value.len()
        )));
    }
    let total: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if total > MAX_ENV_BYTES {
        return Err(bad(format!(
            "the environment is {total} bytes; the limit is {MAX_ENV_BYTES}"
        )));
    }
    Ok(())
}

/// Whether `key` is a usable environment variable name.
pub(super) fn valid_env_name(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The runtime a code directory is written for, by its conventional module names.
pub fn guess_runtime(dir: &Path) -> Option<Runtime> {
    let has = |names: &[&str]| names.iter().any(|n| dir.join(n).is_file());
    if has(&["function.py", "handler.py", "main.py"]) {
        Some(Runtime::Python)
    } else if has(&[
        "index.js",
        "handler.js",
        "function.js",
        "main.js",
        "index.mjs",
        "index.cjs",
    ]) {
        Some(Runtime::Node)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_source_reads_the_same_table() {
        let from_form = Settings::from_fields(&fields(&[
            ("name", "f"),
            ("language", "python"),
            ("timeout", "2.5"),
            ("memory_limit_mb", "64"),
            ("cpu_millicores", "500"),
            ("env", r#"{"A": "1"}"#),
            ("keep_warm_s", "5"),
        ]))
        .unwrap();
        let from_json: Settings = serde_json::from_str(
            r#"{"name": "f", "runtime": "python", "timeout": 2.5, "memory": 64, "cpu": 500,
                "env": {"A": "1"}, "keep_warm": 5}"#,
        )
        .unwrap();
        let from_toml = Settings::from_toml(
            "name = \"f\"\nlanguage = \"python\"\ntimeout = 2.5\nmemory_mb = 64\ncpu = 500\nkeep_warm = 5\n[env]\nA = \"1\"\n",
        )
        .unwrap();
        assert_eq!(from_form, from_json);
        assert_eq!(from_toml, from_json);
        assert_eq!(from_form.runtime, Some(Runtime::Python));
        assert_eq!(from_form.memory, Some(64));
    }

    #[test]
    fn a_new_timeout_in_either_unit_replaces_the_previous_versions() {
        let previous = Settings {
            timeout_ms: Some(5000),
            memory: Some(64),
            ..Settings::default()
        };
        let seconds = previous.clone().overlay(Settings {
            timeout: Some(7.0),
            ..Settings::default()
        });
        assert_eq!((seconds.timeout, seconds.timeout_ms), (Some(7.0), None));
        assert_eq!(seconds.memory, Some(64), "the rest is kept");
        let ms = Settings {
            timeout: Some(7.0),
            ..Settings::default()
        }
        .overlay(Settings {
            timeout_ms: Some(900),
            ..Settings::default()
        });
        assert_eq!((ms.timeout, ms.timeout_ms), (None, Some(900)));
        let kept = previous.overlay(Settings {
            memory: Some(128),
            ..Settings::default()
        });
        assert_eq!((kept.timeout, kept.timeout_ms), (None, Some(5000)));
    }

    #[test]
    fn environment_values_no_process_could_be_given_are_refused() {
        let check = |pairs: Vec<(&str, String)>| {
            let env = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            check_env_values(&env).map_err(|e| e.to_string())
        };
        assert!(check(vec![("A", "fine".into()), ("B", String::new())]).is_ok());
        assert!(check(vec![("A", "x".repeat(MAX_ENV_VALUE_BYTES))]).is_ok());
        let err = check(vec![("A", "a\0b".into())]).unwrap_err();
        assert!(err.contains("A's value holds a NUL byte"), "{err}");
        let err = check(vec![("BIG", "x".repeat(MAX_ENV_VALUE_BYTES + 1))]).unwrap_err();
        assert!(
            err.contains("BIG's value is 65537 bytes; the limit is 65536"),
            "{err}"
        );
        let many = ["A", "B", "C", "D", "E"].map(|k| (k, "x".repeat(60_000)));
        let err = check(many.to_vec()).unwrap_err();
        assert!(err.contains("the environment is 300015 bytes"), "{err}");
    }

    #[test]
    fn bad_fields_say_what_to_fix() {
        let err = |pairs: &[(&str, &str)]| Settings::from_fields(&fields(pairs)).unwrap_err();
        assert!(err(&[("colour", "red")]).contains("unknown setting \"colour\""));
        assert!(err(&[("memory", "lots")]).contains("memory must be a whole number"));
        assert!(err(&[("runtime", "ruby")]).contains("ruby"));
        assert!(err(&[("isolation", "vm")]).contains("container"));
        assert!(err(&[("env", "A=1")]).contains("JSON object"));
        assert!(err(&[("memory", "1"), ("memory_mb", "2")]).contains("twice"));
        let json: std::result::Result<Settings, _> = serde_json::from_str(r#"{"runtime": "ruby"}"#);
        assert!(json.unwrap_err().to_string().contains("ruby"));
    }

    #[test]
    fn a_version_reads_back_as_the_settings_that_made_it() {
        let settings = Settings {
            runtime: Some(Runtime::Node),
            handler: Some("index.main".into()),
            timeout_ms: Some(1500),
            memory: Some(64),
            cpu: Some(250),
            env: Some(BTreeMap::from([("K".into(), "v".into())])),
            max_retries: Some(2),
            isolation: Some(Isolation::Container),
            keep_warm: Some(9),
            min_instances: Some(1),
            max_instances: Some(3),
            on_failure: Some("chain:report".into()),
            secrets: Some(vec!["DB_PASSWORD".into()]),
            ..Settings::default()
        };
        let version = Version {
            version: 4,
            runtime: Runtime::Node,
            handler: settings.handler.clone(),
            timeout_ms: 1500,
            memory_mb: 64,
            cpu_millicores: 250,
            env: settings.env.clone().unwrap(),
            secrets: settings.secrets.clone().unwrap(),
            secret_env: Default::default(),
            max_retries: 2,
            isolation: Isolation::Container,
            keep_warm_s: 9,
            min_instances: 1,
            max_instances: 3,
            on_success: None,
            on_failure: Some("chain:report".into()),
            code_dir: "/code".into(),
            created_at: 1,
        };
        assert_eq!(Settings::of_version(&version), settings);
    }
}
