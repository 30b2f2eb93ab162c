//! Endpoint keys: an exact path (`/work`) or a prefix pattern (`/v1/models/*`), and which
//! request paths a pattern covers. Used by the config check and by
//! [`Endpoints`](crate::Endpoints)' lookup.

/// The prefix of a pattern key (`/v1/models/*` → `/v1/models`), `None` for an exact key.
pub(crate) fn pattern_prefix(key: &str) -> Option<&str> {
    key.strip_suffix("/*")
}

/// Whether `path` is `prefix` itself or a path under it (on a `/` boundary).
pub(crate) fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An endpoint key: an exact path or a `/*` prefix pattern.
pub(crate) fn validate_key(key: &str) -> Result<(), &'static str> {
    if !key.starts_with('/') {
        return Err("a path must start with `/`");
    }
    let Some(prefix) = pattern_prefix(key) else {
        return match key.contains('*') {
            true => Err(
                "`*` is only allowed as a trailing `/*` (a prefix pattern such as `/v1/models/*`)",
            ),
            false => Ok(()),
        };
    };
    if prefix.contains('*') {
        Err("`*` is only allowed as a trailing `/*` (a prefix pattern such as `/v1/models/*`)")
    } else if prefix.is_empty() {
        Err("a prefix pattern needs a non-empty prefix before `/*` (such as `/v1/*`)")
    } else if prefix.ends_with('/') {
        Err("a prefix pattern's prefix must not end with `/` (write `/v1/*`, not `/v1//*`)")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_covers_its_prefix_and_paths_under_it_on_a_slash_boundary() {
        assert_eq!(pattern_prefix("/v1/models/*"), Some("/v1/models"));
        assert_eq!(pattern_prefix("/work"), None);
        assert!(under("/v1/models", "/v1/models"));
        assert!(under("/v1/models/a/b", "/v1/models"));
        assert!(!under("/v1/modelsX", "/v1/models"));
        assert!(!under("/v1", "/v1/models"));
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("/work").is_ok());
        assert!(validate_key("/v1/*").is_ok());
        for bad in ["work", "/v1*", "/*", "/v1//*", "/a/*/b"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }
}
