//! The older fastapi-balancer schema's field names, read as deprecated aliases.
//!
//! A `balancer.yml` written for the older schema names three fields differently:
//!
//! | old name      | name now            |
//! |---------------|---------------------|
//! | `strategy`    | `routing_strategy`  |
//! | `ui_username` | `ui.username`       |
//! | `ui_password` | `ui.password`       |
//!
//! Before the typed read, [`upgrade`] moves each old top-level key of the YAML tree to its
//! new place, so every check and error message afterwards speaks of the new name. A file
//! that gives both names with different values is refused, naming the old one: neither
//! value can be said to win. Each alias used is returned so the loader logs a deprecation
//! warning for it, once per load. The same table maps an environment override written with
//! an old name (`PORTCULLIS_STRATEGY`) to the new field ([`canonical`]).

use portcullis_core::ConfigError as FieldError;
use serde_yaml_ng::{Mapping, Value};

/// One deprecated field name and the path of the field that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Alias {
    /// The older schema's top-level key.
    pub(super) old: &'static str,
    /// The path of the field now, from the top.
    pub(super) new: &'static [&'static str],
}

impl Alias {
    /// The new field's path as the error messages write it (`ui.password`).
    pub(super) fn new_path(&self) -> String {
        self.new.join(".")
    }
}

/// The older schema's names.
pub(super) const ALIASES: [Alias; 3] = [
    Alias {
        old: "strategy",
        new: &["routing_strategy"],
    },
    Alias {
        old: "ui_username",
        new: &["ui", "username"],
    },
    Alias {
        old: "ui_password",
        new: &["ui", "password"],
    },
];

/// Moves every deprecated key of `root` to its new place; returns the aliases that were
/// used. Refuses (naming the old key) a file that also sets the new field to a different
/// value, or whose `ui` is not a mapping to put the value in.
pub(super) fn upgrade(root: &mut Mapping) -> Result<Vec<Alias>, FieldError> {
    let mut used = Vec::new();
    for alias in ALIASES {
        let Some(value) = root.remove(alias.old) else {
            continue;
        };
        let (parent, leaf) = alias.new.split_at(alias.new.len() - 1);
        let section = section_mut(root, parent).ok_or_else(|| {
            FieldError::new(
                alias.old,
                format!(
                    "`{}` (the deprecated name of `{}`) needs `{}` to be a mapping",
                    alias.old,
                    alias.new_path(),
                    parent.join(".")
                ),
            )
        })?;
        match section.get(leaf[0]) {
            Some(current) if !same_scalar(current, &value) => {
                return Err(FieldError::new(
                    alias.old,
                    format!(
                        "is the deprecated name of `{}`, which is set too, to a different value: keep only `{}`",
                        alias.new_path(),
                        alias.new_path()
                    ),
                ));
            }
            Some(_) => {}
            None => {
                section.insert(Value::from(leaf[0]), value);
            }
        }
        used.push(alias);
    }
    Ok(used)
}

/// The path an override names, with a deprecated first key replaced by its new path
/// (`strategy` → `routing_strategy`), and the alias when one was used.
pub(super) fn canonical(path: Vec<String>) -> (Vec<String>, Option<Alias>) {
    match ALIASES.iter().find(|a| path.len() == 1 && path[0] == a.old) {
        Some(alias) => (
            alias.new.iter().map(|s| (*s).to_owned()).collect(),
            Some(*alias),
        ),
        None => (path, None),
    }
}

/// The mapping at `path` below `root`, created (from nothing or from `null`) where it is
/// missing; `None` when something other than a mapping is in the way.
fn section_mut<'a>(root: &'a mut Mapping, path: &[&str]) -> Option<&'a mut Mapping> {
    let mut at = root;
    for key in path {
        let slot = at
            .entry(Value::from(*key))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if slot.is_null() {
            *slot = Value::Mapping(Mapping::new());
        }
        at = slot.as_mapping_mut()?;
    }
    Some(at)
}

/// `true` when two values say the same: equal, or scalars that read the same as text
/// (`ui_password: 1234` and `ui: {password: "1234"}`).
fn same_scalar(a: &Value, b: &Value) -> bool {
    a == b || matches!((scalar_text(a), scalar_text(b)), (Some(x), Some(y)) if x == y)
}

/// A scalar as the text it reads as (`1234` → `"1234"`); `None` for a collection or null.
pub(super) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Mapping {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn old_names_move_to_the_new_fields() {
        let mut root =
            tree("strategy: round-robin\nui_username: admin\nui_password: 1234\nui: {path: /ui}\n");
        let used = upgrade(&mut root).unwrap();
        assert_eq!(used, ALIASES.to_vec());
        assert_eq!(
            root,
            tree(
                "routing_strategy: round-robin\nui: {path: /ui, username: admin, password: 1234}\n"
            )
        );
        // No `ui` yet, or `ui: null`: one is made.
        for text in ["ui_password: x\n", "ui:\nui_password: x\n"] {
            let mut root = tree(text);
            upgrade(&mut root).unwrap();
            assert_eq!(root, tree("ui: {password: x}\n"), "{text}");
        }
        // Nothing to do: nothing used.
        let mut root = tree("routing_strategy: p2c\n");
        assert!(upgrade(&mut root).unwrap().is_empty());
    }

    #[test]
    fn both_names_must_agree() {
        let mut root = tree(
            "strategy: p2c\nrouting_strategy: p2c\nui_password: 1234\nui: {password: \"1234\"}\n",
        );
        assert_eq!(upgrade(&mut root).unwrap().len(), 2);
        for (text, field) in [
            ("strategy: p2c\nrouting_strategy: weighted\n", "strategy"),
            ("ui_username: a\nui: {username: b}\n", "ui_username"),
            (
                "ui_password: hunter2\nui: {password: other}\n",
                "ui_password",
            ),
            ("ui_password: hunter2\nui: [1]\n", "ui_password"),
        ] {
            let e = upgrade(&mut tree(text)).unwrap_err();
            assert_eq!(e.field, field, "{text}");
            assert!(!e.message.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn overrides_with_old_names_map_to_the_new_path() {
        let (path, alias) = canonical(vec!["ui_password".into()]);
        assert_eq!(path, ["ui", "password"]);
        assert_eq!(alias.unwrap().old, "ui_password");
        let (path, alias) = canonical(vec!["storage".into(), "url".into()]);
        assert_eq!(path, ["storage", "url"]);
        assert!(alias.is_none());
    }
}
