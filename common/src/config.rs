//! Configuration handling both binaries use: one loader for a TOML file
//! (or text) into a configuration type that validates itself, the errors
//! it gives (each names where the configuration came from and the key),
//! and durations written like `30s`.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the configuration's shape (an unknown key, a wrong type).
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value the configuration does not accept.
    #[error("{origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// A value the configuration does not accept: its key and why. A section's
/// check gives it; the loader adds where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

/// `Err(Invalid)` for `key`, in the form section checks return.
pub fn invalid<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        key: key.into(),
        message: message.into(),
    })
}

impl Invalid {
    pub fn at(self, origin: &str) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_string(),
            key: self.key,
            message: self.message,
        }
    }
}

/// A configuration that checks itself once parsed. It takes itself by value
/// so that forms meaning the same (an old single-entry section and its list
/// form) can be settled into one.
pub trait Validate: Sized {
    fn validate(self) -> Result<Self, Invalid>;
}

/// Parses and validates TOML `text`; `origin` (a path, "environment") names
/// the source in errors, which are one line.
pub fn parse<T: DeserializeOwned + Validate>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let cfg: T = toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: parse_message(text, &e),
    })?;
    cfg.validate().map_err(|e| e.at(origin))
}

/// A parse error on one line: the key (`table.key`) and position, then the
/// reason. Not toml's own text, which quotes the whole line: a line of an
/// `env` table holds a secret that would reach cloud-init's log, so there
/// the quoted values in the reason are elided too.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let reason = e.message().trim_end().replace('\n', " ");
    let Some(span) = e.span() else {
        return reason;
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // `[worker.env]`, `[ worker . "env" ] # note`: the dotted name, bare.
    let bare = |t: &str| -> String {
        t.split('.')
            .map(|p| p.trim().trim_matches(['"', '\'']))
            .collect::<Vec<_>>()
            .join(".")
    };
    let table = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| {
            let l = l.split('#').next().unwrap_or("").trim();
            l.strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .map(|t| bare(t.trim_matches(['[', ']'])))
        })
        .unwrap_or_default();
    let key = line
        .split_once('=')
        .map(|(k, _)| bare(k))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let key = key.as_deref();
    let path = match (table.as_str(), key) {
        ("", Some(k)) => format!("`{k}`: "),
        (t, Some(k)) => format!("`{t}.{k}`: "),
        _ => String::new(),
    };
    let full = match key {
        Some(k) if table.is_empty() => k.to_string(),
        Some(k) => format!("{table}.{k}"),
        None => table.clone(),
    };
    let secret = full.split('.').any(|p| p == "env");
    // Values appear quoted ("...") or in backticks (`12345`): elided both.
    let reason = if secret {
        let mut out = String::new();
        let mut quote = None;
        for c in reason.chars() {
            match quote {
                None if c == '"' || c == '`' => {
                    quote = Some(c);
                    out.push(c);
                    out.push('…');
                }
                None => out.push(c),
                Some(q) if c == q => {
                    quote = None;
                    out.push(c);
                }
                Some(_) => {}
            }
        }
        out
    } else {
        reason
    };
    format!("{path}line {line_no}, column {column}: {reason}")
}

/// Reads, parses and validates the file at `path`.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// A duration written as `30s`, `5m`, `250ms` in a configuration file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    /// The same forms as in a configuration file, for command-line flags.
    fn from_str(s: &str) -> Result<Dur, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"30s\" or \"5m\": {e}"
            ))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// An error and its sources, outermost first: `a: b: c`, for the one line
/// `main` prints before exiting non-zero.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors repeat their source in their own message.
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize)]
    struct T {
        d: Dur,
    }

    #[test]
    fn durations_round_trip_and_errors_say_what_is_expected() {
        let t: T = toml_like(r#"{"d": "1m 30s"}"#).unwrap();
        assert_eq!(t.d.0, Duration::from_secs(90));
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"d":"1m 30s"}"#);
        let e = toml_like::<T>(r#"{"d": "soon"}"#).err().unwrap();
        assert!(e.contains("not a duration"), "{e}");
    }

    fn toml_like<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Small {
        n: u32,
        #[serde(default)]
        alias: Option<u32>,
    }

    impl Validate for Small {
        fn validate(mut self) -> Result<Self, Invalid> {
            if let Some(a) = self.alias.take() {
                self.n = a;
            }
            if self.n == 0 {
                return invalid("n", "must be at least 1");
            }
            Ok(self)
        }
    }

    #[test]
    fn the_loader_names_the_origin_and_the_key_on_one_line() {
        assert_eq!(parse::<Small>("alias = 3\nn = 1", "t").unwrap().n, 3);
        let e = parse::<Small>("n = 0", "c.toml").unwrap_err().to_string();
        assert_eq!(e, "c.toml: `n`: must be at least 1");
        let e = parse::<Small>("n = 1\nm = 2", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml: ") && e.contains('m') && !e.contains('\n'),
            "{e}"
        );
        let e = load::<Small>(Path::new("/nonexistent/c.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read /nonexistent/c.toml: "),
            "{e}"
        );
    }

    #[test]
    fn a_parse_error_names_its_place_without_quoting_the_line() {
        let e = parse::<Small>("n = 1\nalias = \"hunter2-secret\"", "c.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "c.toml: `alias`: line 2, column 9: invalid type: string \"hunter2-secret\", expected u32"
        );
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct WithEnv {
            worker: Env,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Env {
            env: std::collections::BTreeMap<String, String>,
        }
        impl Validate for WithEnv {
            fn validate(self) -> Result<Self, Invalid> {
                Ok(self)
            }
        }
        // As the real `worker.env`: strings; a number is the only mistake,
        // and serde quotes it in backticks.
        for text in [
            "[worker.env]\nTOKEN = 12345678\n",
            "[worker . \"env\"] # secrets\nTOKEN = 12345678\n",
            "[worker]\nenv.TOKEN = 12345678\n",
        ] {
            let e = parse::<WithEnv>(text, "c.toml").unwrap_err().to_string();
            assert!(!e.contains("12345678"), "{text:?}: {e}");
            assert!(e.contains("TOKEN`: line 2, column "), "{text:?}: {e}");
        }
    }

    #[test]
    fn chains_sources_without_repeats() {
        let io = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot save")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(error_chain(&Outer(io)), "cannot save: disk on fire");
    }
}
