//! `ui:` in the gateway config.

use serde::Deserialize;
use std::fmt;

/// The default path of the dashboard page.
pub const DEFAULT_UI_PATH: &str = "/balancer/ui";

/// `ui: {enable, path, username, password}`.
///
/// With both `username` and `password` set, the dashboard page, `/balancer/stats` and
/// `/metrics` require HTTP Basic credentials; without them they are open (and
/// [`log_auth_mode`](crate::log_auth_mode) says so at startup). `enable: false` removes
/// the page (the stats and metrics routes stay). `Debug` never prints the credentials.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UiConfig {
    /// Serve the dashboard page (default `true`).
    pub enable: bool,
    /// Where the page is served (default `/balancer/ui`).
    pub path: String,
    /// Basic-auth user name (default none).
    pub username: Option<String>,
    /// Basic-auth password (default none).
    pub password: Option<String>,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            enable: true,
            path: DEFAULT_UI_PATH.to_owned(),
            username: None,
            password: None,
        }
    }
}

impl UiConfig {
    /// The credentials, when both are set and the user name is not empty.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) if !u.is_empty() => Some((u, p)),
            _ => None,
        }
    }

    /// The page path, with a leading `/` and without a trailing one.
    pub fn normalized_path(&self) -> String {
        let trimmed = self.path.trim().trim_end_matches('/');
        if trimmed.is_empty() {
            return DEFAULT_UI_PATH.to_owned();
        }
        if trimmed.starts_with('/') {
            trimmed.to_owned()
        } else {
            format!("/{trimmed}")
        }
    }
}

fn redact(v: &Option<String>) -> &'static str {
    if v.is_some() {
        "<redacted>"
    } else {
        "<none>"
    }
}

impl fmt::Debug for UiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UiConfig")
            .field("enable", &self.enable)
            .field("path", &self.path)
            .field("username", &redact(&self.username))
            .field("password", &redact(&self.password))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_names_and_redaction() {
        let c: UiConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, UiConfig::default());
        assert!(c.enable && c.path == "/balancer/ui" && c.credentials().is_none());
        let c: UiConfig = serde_json::from_str(
            r#"{"enable": false, "path": "dashboard/", "username": "admin", "password": "s3cret-pw"}"#,
        )
        .unwrap();
        assert_eq!(c.normalized_path(), "/dashboard");
        assert_eq!(c.credentials(), Some(("admin", "s3cret-pw")));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cret-pw") && !dbg.contains("admin"),
            "{dbg}"
        );
        assert!(dbg.contains("<redacted>"));
        assert!(serde_json::from_str::<UiConfig>(r#"{"user": "x"}"#).is_err());
        let half: UiConfig = serde_json::from_str(r#"{"username": "admin"}"#).unwrap();
        assert!(half.credentials().is_none(), "both are needed");
    }
}
