//! The environment's part in a config: `${VAR}` expansion in the YAML text, and
//! `PORTCULLIS_<FIELD>` overrides of its fields.
//!
//! The loader ([`GatewayConfig::from_yaml_with_env`](super::GatewayConfig::from_yaml_with_env))
//! prepares the text in three steps before the typed read, so that every field check and
//! error message of a plain file applies to what the environment set:
//!
//! 1. **`${VAR}` expansion.** `${VAR}` is replaced by the variable's value, `${VAR:-default}`
//!    by the value or, when it is unset or empty, by `default`; `$${` writes a literal `${`,
//!    and any other `$` is left alone. It is text substitution, done before the YAML is
//!    parsed, so it works in any value; quote the reference (`password: "${UI_PASSWORD}"`)
//!    when the value may hold YAML syntax (`: `, ` #`, a leading `[`, `{`, `*`, `&`, `!`,
//!    `%`, `@`). Comments are not expanded. An unset variable without a default, and a
//!    value with a line break, are refused naming the variable and the line.
//! 2. **Deprecated names** of the older fastapi-balancer schema move to the new fields
//!    ([`compat`](super::compat)).
//! 3. **Overrides.** `PORTCULLIS_<PATH>` sets the field at `<PATH>`: the name after the
//!    prefix, lowercased, with `__` between the keys of nested mappings
//!    (`PORTCULLIS_LISTEN`, `PORTCULLIS_UPSTREAM_TIMEOUT`, `PORTCULLIS_STORAGE__URL`,
//!    `PORTCULLIS_UI__PASSWORD`). The key under `endpoints` (and under an endpoint's
//!    `headers`) is taken as written, since paths are case-sensitive:
//!    `PORTCULLIS_ENDPOINTS__/work__CAPACITY=8`. A number indexes a sequence
//!    (`PORTCULLIS_UPSTREAMS__0__URL`). The value is read as a YAML scalar (`8`, `0.5`,
//!    `true`, `null`; anything else, and a number written in a form YAML would rewrite such
//!    as `007`, stays the exact string), or a flow collection when it starts with `[` or `{`
//!    (`PORTCULLIS_UPSTREAMS='[{url: "http://10.0.0.1:9000"}]'`). A variable that names no
//!    field, or whose value the field refuses, exits 2 naming the variable. The variables in
//!    [`IGNORED_VARIABLES`] configure the test suite, not the gateway, and are left alone.
//!
//! When neither overrides nor deprecated names are present the text goes to the parser as
//! it was, with its line numbers; otherwise the changed tree is written back to YAML and
//! errors are located in the original text by their field path.
//!
//! Secrets: [`Environment`]'s `Debug` shows the variables' names only, and every error
//! message of the load has the values of `ui.password` and of the password in
//! `storage.url` replaced by `***`, wherever they came from.

use super::compat;
use super::ConfigError;
use serde_yaml_ng::{Mapping, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The prefix of an override variable.
pub(super) const PREFIX: &str = "PORTCULLIS_";

/// `PORTCULLIS_` variables that are not config overrides: the test suite's knobs
/// (`tests/chaos.rs`, the dashboard screenshot tests). They are never read as fields.
pub const IGNORED_VARIABLES: &[&str] = &[
    "PORTCULLIS_CHAOS_SECS",
    "PORTCULLIS_CHAOS_BACKEND",
    "PORTCULLIS_UPDATE_SCREENSHOT",
];

/// The environment variables a config is loaded with: a snapshot of the process's
/// ([`from_process`](Self::from_process)), or given pairs (tests, embedding).
///
/// `Debug` lists the variables' names, never their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
    /// `PORTCULLIS_` variables whose name or value is not UTF-8 (refused by the load).
    not_unicode: Vec<String>,
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Environment")
            .field("names", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Environment {
    /// No variables at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The process's environment now. A variable that is not UTF-8 is left out; one whose
    /// name starts with `PORTCULLIS_` is remembered, so the load refuses it by name.
    pub fn from_process() -> Self {
        let mut env = Self::default();
        for (name, value) in std::env::vars_os() {
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => {
                    env.vars.insert(name, value);
                }
                (name, _) => {
                    let name = match name {
                        Ok(n) => n,
                        Err(n) => n.to_string_lossy().into_owned(),
                    };
                    if name.starts_with(PREFIX) {
                        env.not_unicode.push(name);
                    }
                }
            }
        }
        env
    }

    /// These variables only.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            not_unicode: Vec::new(),
        }
    }

    /// The value of `name`, when set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The override variables, in name order.
    fn overrides(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX) && !IGNORED_VARIABLES.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The text the typed read gets, and what it takes to report its errors against the file.
pub(super) struct Prepared<'a> {
    /// The text after expansion, with deprecated names and overrides applied.
    pub(super) text: Cow<'a, str>,
    /// `text` is the tree written back (its lines are not the file's).
    rewritten: bool,
    /// The overrides applied: variable and the field path it set.
    applied: Vec<(String, String)>,
    /// The deprecated names the file used.
    aliases: Vec<compat::Alias>,
    /// Values that must not appear in a message.
    secrets: Vec<String>,
}

impl Prepared<'_> {
    /// `e` (from the read of [`text`](Self::text)) as the file's error: an error in a field an
    /// override set names the variable; in rewritten text the line is looked up in the
    /// original `file_text`; secrets are masked.
    pub(super) fn locate(&self, mut e: ConfigError, file_text: &str) -> ConfigError {
        if let Some(field) = e.field.clone() {
            if let Some((var, _)) = self
                .applied
                .iter()
                .rev()
                .find(|(_, path)| within(&field, path))
            {
                e.message = format!("set by {var}: {}", e.message);
                e.line = None;
            } else if let Some(alias) = self.aliases.iter().find(|a| within(&field, &a.new_path()))
            {
                // The file wrote the deprecated name: show that one, on its line.
                e.message = format!("(the deprecated name of `{field}`) {}", e.message);
                e.line = super::find_path_line(file_text, alias.old);
                e.field = Some(alias.old.to_owned());
            } else if self.rewritten {
                e.line = super::find_path_line(file_text, &field);
            }
        } else if self.rewritten {
            e.line = None;
        }
        e.message = self.mask(&e.message);
        e
    }

    /// `text` with every secret replaced by `***`.
    pub(super) fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }
}

/// `true` when `field` is `path` or lies inside it.
fn within(field: &str, path: &str) -> bool {
    field == path
        || field
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with(['.', '[']))
}

/// Steps 1–3 of the [module docs](self) on `text` read from `file`.
pub(super) fn prepare<'a>(
    text: &'a str,
    env: &Environment,
    file: &Path,
) -> Result<Prepared<'a>, ConfigError> {
    let refuse = |line: Option<usize>, message: String| ConfigError {
        file: file.to_path_buf(),
        field: None,
        line,
        message,
    };
    if let Some(name) = env.not_unicode.first() {
        return Err(refuse(None, format!("{name}: the value is not UTF-8 text")));
    }
    let expanded = expand(text, env).map_err(|(line, message)| refuse(Some(line), message))?;
    let overrides: Vec<(&str, &str)> = env.overrides().collect();
    let mut prepared = Prepared {
        text: expanded,
        rewritten: false,
        applied: Vec::new(),
        aliases: Vec::new(),
        secrets: Vec::new(),
    };
    let tree = match serde_yaml_ng::from_str::<Value>(&prepared.text) {
        Ok(tree) => tree,
        // The typed read reports the syntax error with its line; nothing can be overridden.
        Err(_) => return Ok(prepared),
    };
    let mut root = match tree {
        Value::Mapping(m) => m,
        Value::Null if !overrides.is_empty() => Mapping::new(),
        // Not a mapping: the typed read says so.
        _ => return Ok(prepared),
    };
    let field_error = |e: portcullis_core::ConfigError| ConfigError::at_field(e, text, file);
    let used = compat::upgrade(&mut root).map_err(field_error)?;
    for alias in &used {
        tracing::warn!(
            field = alias.old,
            replacement = %alias.new_path(),
            "deprecated config field `{}`: use `{}`",
            alias.old,
            alias.new_path()
        );
    }
    for (var, raw) in &overrides {
        let path = override_path(var).map_err(|m| refuse(None, format!("{var}: {m}")))?;
        let (path, alias) = compat::canonical(path);
        if let Some(alias) = alias {
            tracing::warn!(
                variable = var,
                replacement = %alias.new_path(),
                "deprecated config field `{}` in {var}: use `{}`",
                alias.old,
                alias.new_path()
            );
        }
        let field = set(&mut root, &path, scalar_value(raw))
            .map_err(|m| refuse(None, format!("{var}: {m}")))?;
        prepared.applied.push(((*var).to_owned(), field));
    }
    prepared.secrets = secrets(&root);
    prepared.aliases = used;
    if !prepared.aliases.is_empty() || !overrides.is_empty() {
        let text = serde_yaml_ng::to_string(&Value::Mapping(root))
            .map_err(|e| refuse(None, format!("cannot write the overridden config: {e}")))?;
        prepared.text = Cow::Owned(text);
        prepared.rewritten = true;
    }
    Ok(prepared)
}

/// `${VAR}` / `${VAR:-default}` / `$${` in `text`; comments are left as they are. The error
/// is the 1-based line and the message.
fn expand<'a>(text: &'a str, env: &Environment) -> Result<Cow<'a, str>, (usize, String)> {
    if !text.contains("${") {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let comment = comment_start(line);
        let (body, rest) = line.split_at(comment);
        let mut s = body;
        while let Some(at) = s.find('$') {
            out.push_str(&s[..at]);
            let after = &s[at..];
            if let Some(tail) = after.strip_prefix("$${") {
                out.push_str("${");
                s = tail;
            } else if let Some(tail) = after.strip_prefix("${") {
                let close = tail.find('}').ok_or_else(|| {
                    (
                        i + 1,
                        "`${` without its closing `}` (write `$${` for a literal `${`)".to_owned(),
                    )
                })?;
                let inner = &tail[..close];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                if !is_var_name(name) {
                    return Err((
                        i + 1,
                        format!("`${{{inner}}}`: `{name}` is not an environment variable name"),
                    ));
                }
                let value = match (env.get(name), default) {
                    (Some(""), Some(d)) => d,
                    (Some(v), _) => v,
                    (None, Some(d)) => d,
                    (None, None) => {
                        return Err((
                            i + 1,
                            format!(
                                "`${{{name}}}`: the environment variable {name} is not set (`${{{name}:-default}}` gives a default)"
                            ),
                        ))
                    }
                };
                if value.contains(['\n', '\r']) {
                    return Err((
                        i + 1,
                        format!("`${{{name}}}`: the value of {name} has a line break"),
                    ));
                }
                out.push_str(value);
                s = &tail[close + 1..];
            } else {
                out.push('$');
                s = &after[1..];
            }
        }
        out.push_str(s);
        out.push_str(rest);
    }
    Ok(Cow::Owned(out))
}

/// Where a line's comment starts (its length when it has none): a `#` at the start or after
/// a blank, outside single and double quotes.
fn comment_start(line: &str) -> usize {
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(b'"') if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'"' | b'\''
                    if i == 0
                        || matches!(bytes[i - 1], b' ' | b'\t' | b':' | b'[' | b'{' | b',') =>
                {
                    quote = Some(b)
                }
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => return i,
                _ => {}
            },
        }
        i += 1;
    }
    bytes.len()
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The field path of an override variable: the keys after the prefix, split at `__`;
/// lowercased except a key under `endpoints` or an endpoint's `headers`.
fn override_path(var: &str) -> Result<Vec<String>, String> {
    let rest = &var[PREFIX.len()..];
    let mut path: Vec<String> = Vec::new();
    for part in rest.split("__") {
        if part.is_empty() {
            return Err("an empty key (`__` at the start or end, or `____`)".into());
        }
        let verbatim = match path.as_slice() {
            [endpoints] => endpoints == "endpoints",
            [endpoints, _, headers] => endpoints == "endpoints" && headers == "headers",
            _ => false,
        };
        path.push(if verbatim {
            part.to_owned()
        } else {
            part.to_ascii_lowercase()
        });
    }
    Ok(path)
}

/// The override's value: a YAML scalar when YAML would write it back exactly as given
/// (blanks included), a flow collection when it starts with `[` or `{`, else the string as
/// it is.
fn scalar_value(raw: &str) -> Value {
    match serde_yaml_ng::from_str::<Value>(raw) {
        Ok(v @ (Value::Sequence(_) | Value::Mapping(_))) if raw.starts_with(['[', '{']) => v,
        Ok(Value::Null) if matches!(raw, "null" | "~") => Value::Null,
        Ok(v @ (Value::Bool(_) | Value::Number(_)))
            if serde_yaml_ng::to_string(&v).is_ok_and(|t| t.trim_end() == raw) =>
        {
            v
        }
        _ => Value::String(raw.to_owned()),
    }
}

/// Sets `path` in `root` to `value`, making the mappings on the way (a `null` or a
/// `storage` shorthand becomes the mapping it stands for); returns the path as error
/// messages write it (`endpoints./work.capacity`, `upstreams[0].url`).
fn set(root: &mut Mapping, path: &[String], value: Value) -> Result<String, String> {
    let (first, rest) = path.split_first().ok_or("names no field")?;
    let mut shown = first.clone();
    let mut at = root
        .entry(Value::from(first.as_str()))
        .or_insert(Value::Null);
    for key in rest {
        if at.is_null() {
            // Nothing there yet: an index starts a list, a name a mapping.
            *at = match key.parse::<usize>() {
                Ok(_) => Value::Sequence(Vec::new()),
                Err(_) => Value::Mapping(Mapping::new()),
            };
        }
        if shown == "storage" {
            if let Some(m) = storage_shorthand(at) {
                *at = Value::Mapping(m);
            }
        }
        at = match at {
            Value::Mapping(m) => {
                shown.push('.');
                shown.push_str(key);
                m.entry(Value::from(key.as_str())).or_insert(Value::Null)
            }
            Value::Sequence(seq) => {
                let i: usize = key
                    .parse()
                    .map_err(|_| format!("`{shown}` is a list: `{key}` is not an index"))?;
                shown.push_str(&format!("[{i}]"));
                if i == seq.len() {
                    seq.push(Value::Null);
                }
                let len = seq.len();
                seq.get_mut(i).ok_or_else(|| {
                    format!("`{shown}` is out of range: the list has {len} entries")
                })?
            }
            _ => return Err(format!("`{shown}` is a single value, not a mapping")),
        };
    }
    *at = value;
    Ok(shown)
}

/// The mapping a `storage:` shorthand stands for (`memory` → `{type: memory}`, a URL →
/// `{type: redis, url: ...}`), for an override of one of its fields.
fn storage_shorthand(v: &Value) -> Option<Mapping> {
    let s = v.as_str()?.trim();
    let mut m = Mapping::new();
    if s == "memory" {
        m.insert("type".into(), "memory".into());
    } else {
        m.insert("type".into(), "redis".into());
        m.insert("url".into(), s.into());
    }
    Some(m)
}

/// The values that must not appear in a message: `ui.password`, and the password of each
/// URL in `storage.url` (or the `storage:` shorthand).
fn secrets(root: &Mapping) -> Vec<String> {
    let mut out = Vec::new();
    let ui_password = root
        .get("ui")
        .and_then(|ui| ui.get("password"))
        .and_then(compat::scalar_text);
    out.extend(ui_password);
    let storage = root.get("storage");
    let url = storage
        .and_then(|s| s.get("url"))
        .or(storage.filter(|s| s.is_string()));
    if let Some(urls) = url.and_then(Value::as_str) {
        out.extend(urls.split(',').filter_map(url_password));
    }
    out.retain(|s| !s.is_empty());
    // Longest first, so a secret that contains another is masked whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// The password part of `scheme://user:password@host`, when there is one.
fn url_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
    Some(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn expansion_with_defaults_escapes_and_comments() {
        let e = env(&[("HOST", "10.0.0.1"), ("EMPTY", ""), ("PASS", "s3cr3t")]);
        let text = "a: ${HOST}:9000\nb: ${MISSING:-x y}\nc: ${EMPTY:-dflt}\nd: \"$${HOST} and $5 ${PASS}\"\n# ${NOT_EXPANDED}\ne: 1 # ${ALSO_NOT}\n";
        assert_eq!(
            expand(text, &e).unwrap(),
            "a: 10.0.0.1:9000\nb: x y\nc: dflt\nd: \"${HOST} and $5 s3cr3t\"\n# ${NOT_EXPANDED}\ne: 1 # ${ALSO_NOT}\n"
        );
        assert!(matches!(expand("a: 1\n", &e), Ok(Cow::Borrowed(_))));
        for (text, line, needle) in [
            ("a: 1\nb: ${NOPE}\n", 2, "NOPE is not set"),
            ("a: ${HOST\n", 1, "closing"),
            ("a: ${1X}\n", 1, "not an environment variable name"),
            ("\n\na: '${NOPE:-}' ${NOPE2}\n", 3, "NOPE2"),
        ] {
            let (l, m) = expand(text, &e).unwrap_err();
            assert_eq!(l, line, "{text:?}: {m}");
            assert!(m.contains(needle), "{text:?}: {m}");
        }
        let multi = env(&[("M", "a\nb: 2")]);
        let (_, m) = expand("a: ${M}\n", &multi).unwrap_err();
        assert!(m.contains("line break") && !m.contains("b: 2"), "{m}");
    }

    #[test]
    fn override_names_map_to_field_paths() {
        let p = |v: &str| override_path(v).unwrap();
        assert_eq!(p("PORTCULLIS_LISTEN"), ["listen"]);
        assert_eq!(p("PORTCULLIS_UPSTREAM_TIMEOUT"), ["upstream_timeout"]);
        assert_eq!(p("PORTCULLIS_STORAGE__URL"), ["storage", "url"]);
        assert_eq!(
            p("PORTCULLIS_ENDPOINTS__/V1/Work__CAPACITY"),
            ["endpoints", "/V1/Work", "capacity"]
        );
        assert_eq!(
            p("PORTCULLIS_ENDPOINTS__/w__HEADERS__X-Api-Key"),
            ["endpoints", "/w", "headers", "X-Api-Key"]
        );
        assert!(override_path("PORTCULLIS_UI____PASSWORD").is_err());
        assert!(override_path("PORTCULLIS_").is_err());
    }

    #[test]
    fn values_are_yaml_scalars_or_the_exact_string() {
        assert_eq!(scalar_value("8"), Value::from(8));
        assert_eq!(scalar_value("0.5"), Value::from(0.5));
        assert_eq!(scalar_value("true"), Value::from(true));
        assert_eq!(scalar_value("null"), Value::Null);
        for exact in ["007", "0x1F", "1e3", "", "~x", "a: b", "hunter2", " 8"] {
            assert_eq!(scalar_value(exact), Value::from(exact), "{exact:?}");
        }
        let seq = scalar_value("[{url: \"http://a:1\"}]");
        assert!(seq.is_sequence(), "{seq:?}");
    }

    #[test]
    fn set_makes_the_path_and_expands_the_storage_shorthand() {
        let mut root: Mapping =
            serde_yaml_ng::from_str("storage: memory\nui:\nupstreams:\n  - {url: http://a:1}\n")
                .unwrap();
        assert_eq!(
            set(
                &mut root,
                &["storage".into(), "key_prefix".into()],
                "gw".into()
            )
            .unwrap(),
            "storage.key_prefix"
        );
        assert_eq!(
            set(&mut root, &["ui".into(), "password".into()], "pw".into()).unwrap(),
            "ui.password"
        );
        assert_eq!(
            set(
                &mut root,
                &["upstreams".into(), "0".into(), "weight".into()],
                3.into()
            )
            .unwrap(),
            "upstreams[0].weight"
        );
        assert_eq!(
            set(&mut root, &["upstreams".into(), "1".into()], Value::Null).unwrap(),
            "upstreams[1]"
        );
        let want: Mapping = serde_yaml_ng::from_str(
            "storage: {type: memory, key_prefix: gw}\nui: {password: pw}\nupstreams:\n  - {url: http://a:1, weight: 3}\n  - null\n",
        )
        .unwrap();
        assert_eq!(root, want);
        let mut empty = Mapping::new();
        assert_eq!(
            set(
                &mut empty,
                &["upstreams".into(), "0".into(), "url".into()],
                "http://a:1".into()
            )
            .unwrap(),
            "upstreams[0].url"
        );
        let want: Mapping =
            serde_yaml_ng::from_str("upstreams: [{url: \"http://a:1\"}]\n").unwrap();
        assert_eq!(empty, want);
        let e = set(&mut root, &["upstreams".into(), "7".into()], 1.into()).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = set(&mut root, &["upstreams".into(), "x".into()], 1.into()).unwrap_err();
        assert!(e.contains("not an index"), "{e}");
        let e = set(
            &mut root,
            &["ui".into(), "password".into(), "x".into()],
            1.into(),
        )
        .unwrap_err();
        assert!(e.contains("single value"), "{e}");
    }

    #[test]
    fn secrets_are_collected_and_masked() {
        let root: Mapping = serde_yaml_ng::from_str(
            "ui: {password: 1234}\nstorage: {url: \"redis://:pw1@a:1,rediss://u:pw2@b:2,redis://c:3\"}\n",
        )
        .unwrap();
        let mut s = secrets(&root);
        s.sort();
        assert_eq!(s, ["1234", "pw1", "pw2"]);
        let root: Mapping = serde_yaml_ng::from_str("storage: \"redis://:pw3@a:1\"\n").unwrap();
        assert_eq!(secrets(&root), ["pw3"]);
        assert_eq!(url_password("redis://a:1"), None);
        let p = Prepared {
            text: Cow::Borrowed(""),
            rewritten: false,
            applied: vec![],
            aliases: vec![],
            secrets: vec!["hunter2".into()],
        };
        assert_eq!(p.mask("got `hunter2`"), "got `***`");
    }

    #[test]
    fn debug_shows_names_only() {
        let e = env(&[("PORTCULLIS_UI__PASSWORD", "hunter2")]);
        let dbg = format!("{e:?}");
        assert!(
            dbg.contains("PORTCULLIS_UI__PASSWORD") && !dbg.contains("hunter2"),
            "{dbg}"
        );
        let ignored = env(&[("PORTCULLIS_CHAOS_SECS", "5"), ("PORTCULLIS_X", "1")]);
        assert_eq!(
            ignored.overrides().collect::<Vec<_>>(),
            [("PORTCULLIS_X", "1")]
        );
    }
}
