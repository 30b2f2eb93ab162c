//! Writing the config back with the probed capacities: `capacity` is edited into the YAML
//! text so comments and layout survive, or the parsed document is rewritten cleanly; either
//! result must load back as the config with those capacities before it is written.

use super::{with_capacities, Failure};
use portcullis::gateway::config::GatewayConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// How the updated YAML was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum YamlLayout {
    /// The original text with `capacity` inserted or replaced: comments kept.
    Edited,
    /// Re-serialised from the parsed document: comments lost.
    Rewritten,
}

/// The config text with `caps` filled in, verified to load back as `config` with those
/// capacities: the edited text when possible, else a clean rewrite.
pub(super) fn updated_yaml(
    text: &str,
    config: &GatewayConfig,
    caps: &BTreeMap<String, i64>,
    file: &Path,
) -> Result<(String, YamlLayout), Failure> {
    let expected = with_capacities(config, caps);
    let loads_back = |t: &str| GatewayConfig::from_yaml(t, file).is_ok_and(|c| c == expected);
    if let Some(edited) = edit_capacities(text, caps) {
        if loads_back(&edited) {
            return Ok((edited, YamlLayout::Edited));
        }
    }
    if let Some(rewritten) = rewrite_capacities(text, caps) {
        if loads_back(&rewritten) {
            return Ok((rewritten, YamlLayout::Rewritten));
        }
    }
    Err(Failure::output(format!(
        "cannot produce a config that loads back with the probed capacities ({}); nothing written",
        caps.iter()
            .map(|(p, c)| format!("{p}: {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Writes `yaml` to `out` through a temporary file next to it, loads it back with
/// [`GatewayConfig::load`] and renames it into place only when it equals `expected`.
pub(super) fn write_verified(
    out: &Path,
    yaml: &str,
    expected: &GatewayConfig,
) -> Result<(), Failure> {
    let name = out
        .file_name()
        .ok_or_else(|| Failure::input(format!("--out `{}` does not name a file", out.display())))?;
    let tmp = out.with_file_name(format!(
        ".{}.bench-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        std::fs::write(&tmp, yaml)
            .map_err(|e| Failure::output(format!("cannot write {}: {e}", out.display())))?;
        match GatewayConfig::load(&tmp) {
            Ok(c) if &c == expected => {}
            Ok(_) => {
                return Err(Failure::output(format!(
                    "{} would not load back with the probed capacities; nothing written",
                    out.display()
                )))
            }
            Err(e) => {
                return Err(Failure::output(format!(
                    "{} would not load back ({e}); nothing written",
                    out.display()
                )))
            }
        }
        std::fs::rename(&tmp, out)
            .map_err(|e| Failure::output(format!("cannot write {}: {e}", out.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Clean rewrite: the parsed document with `capacity` set, serialised again.
fn rewrite_capacities(text: &str, caps: &BTreeMap<String, i64>) -> Option<String> {
    use serde_yaml_ng::{Mapping, Value};
    let mut doc: Value = serde_yaml_ng::from_str(text).ok()?;
    let endpoints = doc.get_mut("endpoints")?.as_mapping_mut()?;
    for (path, cap) in caps {
        let ep = endpoints.get_mut(path.as_str())?;
        if ep.is_null() {
            *ep = Value::Mapping(Mapping::new());
        }
        ep.as_mapping_mut()?
            .insert(Value::from("capacity"), Value::from(*cap));
    }
    let body = serde_yaml_ng::to_string(&doc).ok()?;
    Some(format!(
        "# Written by `gateway bench` (a clean rewrite: the original comments could not be kept).\n{body}"
    ))
}

/// One line of YAML text: its content (no line break) and its line break.
#[derive(Debug, Clone)]
struct Line {
    content: String,
    eol: String,
}

fn split_lines(text: &str) -> Vec<Line> {
    text.split_inclusive('\n')
        .map(|l| {
            let (content, eol) = if let Some(c) = l.strip_suffix("\r\n") {
                (c, "\r\n")
            } else if let Some(c) = l.strip_suffix('\n') {
                (c, "\n")
            } else {
                (l, "")
            };
            Line {
                content: content.to_string(),
                eol: eol.to_string(),
            }
        })
        .collect()
}

/// A blank or comment-only line (ignored by the structure scan).
fn is_filler(s: &str) -> bool {
    let t = s.trim_start_matches([' ', '\t']);
    t.is_empty() || t.starts_with('#')
}

/// Leading spaces; `None` when the indentation contains a tab (not valid YAML indentation).
fn indent_of(s: &str) -> Option<usize> {
    let n = s.len() - s.trim_start_matches(' ').len();
    if s[n..].starts_with('\t') {
        None
    } else {
        Some(n)
    }
}

/// The characters of a YAML line that are outside quoted scalars, each with its byte offset
/// and the character before it. A quote opens a quoted scalar only where a token starts.
#[derive(Debug)]
struct Unquoted<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    prev: Option<char>,
    /// The quote of the scalar being read, if any (still set at the end: unterminated).
    quote: Option<char>,
}

impl<'a> Unquoted<'a> {
    /// Scans `s`; `prev` is the character before it (`None` at a line start).
    fn new(s: &'a str, prev: Option<char>) -> Self {
        Self {
            chars: s.char_indices().peekable(),
            prev,
            quote: None,
        }
    }
}

impl Iterator for Unquoted<'_> {
    type Item = (usize, char, Option<char>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (i, c) = self.chars.next()?;
            let prev = self.prev.replace(c);
            match self.quote {
                Some('"') => {
                    if c == '\\' {
                        self.chars.next();
                    } else if c == '"' {
                        self.quote = None;
                    }
                }
                Some(_) => {
                    if c == '\'' {
                        if self.chars.peek().is_some_and(|(_, n)| *n == '\'') {
                            self.chars.next();
                        } else {
                            self.quote = None;
                        }
                    }
                }
                None => {
                    let token_start = prev.is_none_or(|p| p.is_whitespace() || "[{,:".contains(p));
                    if (c == '"' || c == '\'') && token_start {
                        self.quote = Some(c);
                    } else {
                        return Some((i, c, prev));
                    }
                }
            }
        }
    }
}

/// Splits `s` into its code and a trailing comment (with the whitespace before it): the first
/// `#` outside quotes that starts the line or follows whitespace.
fn split_comment(s: &str) -> (&str, &str) {
    for (i, c, prev) in Unquoted::new(s, None) {
        if c == '#' && prev.is_none_or(char::is_whitespace) {
            let code = s[..i].trim_end_matches([' ', '\t']);
            return (code, &s[code.len()..]);
        }
    }
    (s, "")
}

/// Parses `key:` at the start of `code` (no leading spaces); returns the key and the byte
/// offset just after the colon. `None` for anything but a plain or quoted scalar key.
fn parse_key(code: &str) -> Option<(String, usize)> {
    let (key, rest_at) = if code.starts_with('"') || code.starts_with('\'') {
        let q = code.chars().next()?;
        let mut end = None;
        let mut iter = code.char_indices().skip(1).peekable();
        while let Some((i, c)) = iter.next() {
            if q == '"' && c == '\\' {
                iter.next();
            } else if c == q {
                if q == '\'' && iter.peek().is_some_and(|(_, n)| *n == '\'') {
                    iter.next();
                    continue;
                }
                end = Some(i);
                break;
            }
        }
        let end = end?;
        let key: String = serde_yaml_ng::from_str(&code[..=end]).ok()?;
        (key, end + 1)
    } else {
        if code.starts_with(|c: char| "?-&*![]{}|>%@`#,".contains(c)) {
            return None;
        }
        let bytes = code.as_bytes();
        let colon = (0..bytes.len()).find(|&i| {
            bytes[i] == b':' && (i + 1 == bytes.len() || matches!(bytes[i + 1], b' ' | b'\t'))
        })?;
        (code[..colon].trim_end().to_string(), colon)
    };
    let rest = &code[rest_at..];
    let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
    let after = &rest[spaces..];
    let tail = after.strip_prefix(':')?;
    let quoted = code.starts_with(['"', '\'']);
    if !(quoted || tail.is_empty() || tail.starts_with([' ', '\t'])) {
        return None;
    }
    Some((key, rest_at + spaces + 1))
}

/// Byte ranges of the top-level entries of a flow collection's inside (between commas at
/// depth 0, outside quotes).
fn flow_entries(inner: &str) -> Option<Vec<(usize, usize)>> {
    let mut entries = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut scan = Unquoted::new(inner, Some('{'));
    for (i, c, _) in scan.by_ref() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                entries.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
    }
    if scan.quote.is_some() || depth != 0 {
        return None;
    }
    entries.push((start, inner.len()));
    Some(entries)
}

/// The offset of the `}` closing the flow mapping opened at `open` in `s`, on the same line.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c, _) in Unquoted::new(&s[open + 1..], Some('{')) {
        match c {
            '}' if depth == 0 => return Some(open + 1 + i),
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
    }
    None
}

/// Replaces or inserts `capacity` inside a flow mapping's inside (`method: POST, capacity: 8`).
fn edit_flow_mapping(inner: &str, cap: i64) -> Option<String> {
    let entries = flow_entries(inner)?;
    let mut found = None;
    let mut method_end = None;
    let mut first_start = None;
    for &(start, end) in &entries {
        let entry = &inner[start..end];
        if entry.trim().is_empty() {
            continue;
        }
        let lead = entry.len() - entry.trim_start().len();
        first_start.get_or_insert(start + lead);
        if let Some((key, after)) = parse_key(entry.trim_start()) {
            let after = after + lead;
            if key == "capacity" {
                if found.is_some() {
                    return None;
                }
                found = Some((start + after, end));
            } else if key == "method" {
                method_end = Some(start + entry.trim_end().len());
            }
        }
    }
    let mut out = inner.to_string();
    if let Some((value_start, value_end)) = found {
        let value = &inner[value_start..value_end];
        let trailing = &value[value.trim_end().len()..];
        if value.trim().is_empty() {
            return None;
        }
        out.replace_range(value_start..value_end, &format!(" {cap}{trailing}"));
    } else if let Some(at) = method_end {
        out.insert_str(at, &format!(", capacity: {cap}"));
    } else if let Some(at) = first_start {
        out.insert_str(at, &format!("capacity: {cap}, "));
    } else if inner.trim().is_empty() {
        out = format!("capacity: {cap}");
    } else {
        return None;
    }
    Some(out)
}

/// Fills in `capacity` per endpoint by editing the YAML text, keeping everything else as it
/// was. `None` when the layout is not one handled here (the caller then rewrites cleanly);
/// the caller also verifies that the result loads back as intended.
///
/// Handled: a block-mapping top level with a block-mapping `endpoints:` whose entries are flow
/// mappings on one line (`/work: {method: POST}`), block mappings, or empty/null values.
fn edit_capacities(text: &str, caps: &BTreeMap<String, i64>) -> Option<String> {
    let mut lines = split_lines(text);
    let content_at = |lines: &[Line], i: usize| -> Option<(usize, String)> {
        let c = &lines[i].content;
        if is_filler(c) {
            None
        } else {
            Some((indent_of(c).unwrap_or(usize::MAX), c.clone()))
        }
    };

    // The top-level `endpoints:` key.
    let mut endpoints_line = None;
    for (i, line) in lines.iter().enumerate() {
        let c = &line.content;
        if is_filler(c) {
            continue;
        }
        if indent_of(c)? != 0 {
            continue;
        }
        let (code, _) = split_comment(c);
        if let Some((key, after)) = parse_key(code) {
            if key == "endpoints" {
                if endpoints_line.is_some() || !code[after..].trim().is_empty() {
                    return None;
                }
                endpoints_line = Some(i);
            }
        }
    }
    let start = endpoints_line? + 1;
    let end = (start..lines.len())
        .find(|&i| content_at(&lines, i).is_some_and(|(ind, _)| ind == 0))
        .unwrap_or(lines.len());
    let child_indent = (start..end).find_map(|i| content_at(&lines, i))?.0;
    if child_indent == usize::MAX {
        return None;
    }

    // Edits: replaced line contents, and lines inserted after a given line.
    let mut replaced: BTreeMap<usize, String> = BTreeMap::new();
    let mut inserted: BTreeMap<usize, String> = BTreeMap::new();
    let mut done: BTreeMap<String, usize> = BTreeMap::new();
    let mut i = start;
    while i < end {
        let Some((ind, content)) = content_at(&lines, i) else {
            i += 1;
            continue;
        };
        if ind != child_indent {
            // Deeper lines belong to the previous entry and are skipped below.
            return None;
        }
        let body_end = (i + 1..end)
            .find(|&j| content_at(&lines, j).is_some_and(|(d, _)| d <= child_indent))
            .unwrap_or(end);
        let (code, comment) = split_comment(&content[ind..]);
        let (key, after) = parse_key(code)?;
        if let Some(&cap) = caps.get(&key) {
            *done.entry(key.clone()).or_default() += 1;
            let value = code[after..].trim();
            let has_body = (i + 1..body_end).any(|j| content_at(&lines, j).is_some());
            let head = &content[..ind];
            if value.starts_with('{') {
                if has_body {
                    return None;
                }
                let open = after + code[after..].find('{')?;
                let close = matching_brace(code, open)?;
                if !code[close + 1..].trim().is_empty() {
                    return None;
                }
                let inner = edit_flow_mapping(&code[open + 1..close], cap)?;
                replaced.insert(
                    i,
                    format!("{head}{}{inner}{}{comment}", &code[..=open], &code[close..]),
                );
            } else if value.is_empty() && has_body {
                edit_block_mapping(&lines, i, body_end, cap, &mut replaced, &mut inserted)?;
            } else if value.is_empty() || matches!(value, "~" | "null" | "Null" | "NULL") {
                if has_body {
                    return None;
                }
                replaced.insert(
                    i,
                    format!("{head}{} {{capacity: {cap}}}{comment}", &code[..after]),
                );
            } else {
                return None;
            }
        }
        i = body_end;
    }
    if caps.keys().any(|k| done.get(k) != Some(&1)) {
        return None;
    }

    for (i, content) in replaced {
        lines[i].content = content;
    }
    let mut out = String::with_capacity(text.len() + 32 * caps.len());
    for (i, line) in lines.iter().enumerate() {
        out.push_str(&line.content);
        match inserted.get(&i) {
            Some(extra) => {
                let eol = if line.eol.is_empty() { "\n" } else { &line.eol };
                out.push_str(eol);
                out.push_str(extra);
                out.push_str(&line.eol);
            }
            None => out.push_str(&line.eol),
        }
    }
    Some(out)
}

/// Replaces or inserts `capacity:` in the block mapping of the entry at line `key_line`, whose
/// body is the lines up to `body_end`.
fn edit_block_mapping(
    lines: &[Line],
    key_line: usize,
    body_end: usize,
    cap: i64,
    replaced: &mut BTreeMap<usize, String>,
    inserted: &mut BTreeMap<usize, String>,
) -> Option<()> {
    let body: Vec<usize> = (key_line + 1..body_end)
        .filter(|&j| !is_filler(&lines[j].content))
        .collect();
    let first = *body.first()?;
    let indent = indent_of(&lines[first].content)?;
    let mut capacity_line = None;
    let mut method_line = None;
    for (n, &j) in body.iter().enumerate() {
        let content = &lines[j].content;
        let ind = indent_of(content)?;
        if ind < indent {
            return None;
        }
        if ind > indent {
            continue;
        }
        let (code, comment) = split_comment(&content[ind..]);
        let (key, after) = parse_key(code)?;
        let value = code[after..].trim();
        let continues = body
            .get(n + 1)
            .is_some_and(|&k| indent_of(&lines[k].content).is_none_or(|d| d > indent));
        if key == "capacity" {
            if capacity_line.is_some() || value.is_empty() || continues {
                return None;
            }
            capacity_line = Some((
                j,
                format!("{}{} {cap}{comment}", &content[..ind], &code[..after]),
            ));
        } else if key == "method" && !value.is_empty() && !continues {
            method_line = Some(j);
        }
    }
    match capacity_line {
        Some((j, line)) => {
            replaced.insert(j, line);
        }
        None => {
            let at = method_line.unwrap_or(key_line);
            inserted.insert(at, format!("{}capacity: {cap}", " ".repeat(indent)));
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(p, c)| (p.to_string(), *c)).collect()
    }

    fn load(text: &str) -> GatewayConfig {
        GatewayConfig::from_yaml(text, Path::new("t.yml")).unwrap()
    }

    #[test]
    fn flow_mappings_are_edited_in_place() {
        let text = "# top\nendpoints:\n  /work: {method: POST, queue_timeout: 5}  # the work\n  \"/b\": {capacity: 3}\n  /c: {}\n  /d: { headers: {x: \"a,b}\"} }\nlisten: 127.0.0.1:1 # end\n";
        let out = edit_capacities(
            text,
            &caps(&[("/work", 8), ("/b", 9), ("/c", 1), ("/d", 2)]),
        )
        .unwrap();
        assert_eq!(
            out,
            "# top\nendpoints:\n  /work: {method: POST, capacity: 8, queue_timeout: 5}  # the work\n  \"/b\": {capacity: 9}\n  /c: {capacity: 1}\n  /d: { capacity: 2, headers: {x: \"a,b}\"} }\nlisten: 127.0.0.1:1 # end\n"
        );
        let cfg = load(&out);
        assert_eq!(
            cfg.admission.endpoints["/d"].headers.as_ref().unwrap()["x"],
            "a,b}"
        );
    }

    #[test]
    fn block_mappings_and_nulls_are_edited_in_place() {
        let text = "endpoints:\r\n  /a:\r\n    # comment\r\n    method: POST\r\n    body:\r\n      x: 1\r\n  /b:\r\n    capacity: 4   # old\r\n    queue_timeout: 2\r\n  /c:\r\n  /d: ~\r\nqueue_timeout: 3";
        let out =
            edit_capacities(text, &caps(&[("/a", 5), ("/b", 6), ("/c", 7), ("/d", 8)])).unwrap();
        assert_eq!(
            out,
            "endpoints:\r\n  /a:\r\n    # comment\r\n    method: POST\r\n    capacity: 5\r\n    body:\r\n      x: 1\r\n  /b:\r\n    capacity: 6   # old\r\n    queue_timeout: 2\r\n  /c: {capacity: 7}\r\n  /d: {capacity: 8}\r\nqueue_timeout: 3"
        );
        let cfg = load(&out);
        assert_eq!(cfg.admission.endpoints["/a"].capacity, Some(5));
        assert_eq!(cfg.admission.endpoints["/d"].capacity, Some(8));
    }

    #[test]
    fn insertion_after_the_last_line_adds_a_line_break() {
        let out =
            edit_capacities("endpoints:\n  /a:\n    method: GET", &caps(&[("/a", 2)])).unwrap();
        assert_eq!(out, "endpoints:\n  /a:\n    method: GET\n    capacity: 2");
    }

    #[test]
    fn unhandled_layouts_fall_back_to_a_rewrite_that_loads_back() {
        for text in [
            "endpoints: {/w: {method: POST}}\n",
            "{endpoints: {/w: {method: POST}}}\n",
            "endpoints:\n  /w: {method: POST,\n       queue_timeout: 5}\n",
        ] {
            let c = caps(&[("/w", 12)]);
            assert!(edit_capacities(text, &c).is_none(), "{text}");
            let config = load(text);
            let (yaml, layout) = updated_yaml(text, &config, &c, Path::new("t.yml")).unwrap();
            assert_eq!(layout, YamlLayout::Rewritten);
            assert_eq!(load(&yaml).admission.endpoints["/w"].capacity, Some(12));
            assert_eq!(
                load(&yaml).admission.endpoints["/w"].method.as_deref(),
                Some("POST")
            );
        }
    }

    #[test]
    fn edits_never_produce_a_config_that_differs_otherwise() {
        let text = "endpoints:\n  /w: {method: POST, capacity: 2, capacity: 3}\n";
        // A duplicate key does not load in the first place; the editor refuses it anyway.
        assert!(edit_capacities(text, &caps(&[("/w", 1)])).is_none());
        let text = "endpoints:\n  /w:\n    method: POST\n";
        let config = load(text);
        let (yaml, layout) =
            updated_yaml(text, &config, &caps(&[("/w", 4)]), Path::new("t.yml")).unwrap();
        assert_eq!(layout, YamlLayout::Edited);
        let mut expected = config.clone();
        expected.admission.endpoints.get_mut("/w").unwrap().capacity = Some(4);
        assert_eq!(load(&yaml), expected);
    }

    #[test]
    fn odd_layouts_never_panic_and_always_load_back() {
        let texts = [
            "endpoints:\n  /w: {}\n",
            "endpoints:\n  '/w': {method: \"PO#ST\"} # c: {x}\n",
            "endpoints:\n  \"/w\":\n    headers: {\"a\": \"b, c\"}\n    capacity: 1 # \u{e9}t\u{e9}\n",
            "endpoints:\n    /w:\n        body: |\n          capacity: 3\n        method: PUT\n",
            "endpoints:\n  /w: {body: {k: [1, {a: \"}\"}]}, capacity: 2}\n",
            "endpoints:\n  /w: {\"capacity\":5}\n",
            "endpoints:\n  /\u{fc}ber: {method: GET}   # \u{1f600}\n",
            "---\nendpoints:\n  /w: null\n...\n",
            "endpoints:\n  /w: &a {method: GET}\n",
            "endpoints:\n  ? /w\n  : {method: GET}\n",
            "endpoints:\n\t/w: {}\n",
            "endpoints: # watched\n  /w: {}\n  /v:\n    method: GET\n",
        ];
        for text in texts {
            for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let _ = edit_capacities(&text[..cut], &caps(&[("/w", 7)]));
            }
            let Ok(config) = GatewayConfig::from_yaml(text, Path::new("t.yml")) else {
                continue;
            };
            let c: BTreeMap<String, i64> = config
                .admission
                .endpoints
                .keys()
                .map(|k| (k.clone(), 7))
                .collect();
            let (yaml, _) = updated_yaml(text, &config, &c, Path::new("t.yml"))
                .unwrap_or_else(|e| panic!("{text:?}: {}", e.message));
            let back = load(&yaml);
            assert!(
                back.admission
                    .endpoints
                    .values()
                    .all(|e| e.capacity == Some(7)),
                "{yaml}"
            );
        }
    }

    #[test]
    fn comments_and_quotes_are_split_correctly() {
        assert_eq!(split_comment("a: 1 # c"), ("a: 1", " # c"));
        assert_eq!(split_comment("a: \"x # y\" # c"), ("a: \"x # y\"", " # c"));
        assert_eq!(split_comment("a: don't # c"), ("a: don't", " # c"));
        assert_eq!(split_comment("a: b#c"), ("a: b#c", ""));
        assert_eq!(parse_key("\"/a b\": 1"), Some(("/a b".into(), 7)));
        assert_eq!(parse_key("'it''s': 1"), Some(("it's".into(), 8)));
        assert_eq!(parse_key("/a:b: 1"), Some(("/a:b".into(), 5)));
        assert_eq!(parse_key("- a: 1"), None);
    }
}
