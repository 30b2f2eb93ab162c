//! Property: `GatewayConfig::from_yaml` (parse and validate) never panics, whatever YAML
//! values it is given — arbitrary value trees, and a valid config with random keys replaced
//! by random values. It must return `Ok` or `Err`.

use portcullis::gateway::config::GatewayConfig;
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value};
use std::path::Path;

/// The config's own field names, so that random trees reach the field parsers and
/// `validate` instead of stopping at `deny_unknown_fields`.
const KEYS: &[&str] = &[
    "listen",
    "upstream_timeout",
    "connect_timeout",
    "drain_timeout",
    "workers",
    "storage",
    "type",
    "url",
    "upstreams",
    "primary",
    "routing_strategy",
    "health_endpoint",
    "health_check_interval",
    "health_check_timeout",
    "failure_threshold",
    "recovery_threshold",
    "health_check_jitter",
    "eject_after",
    "eject_for",
    "eject_max",
    "panic_threshold",
    "queue_timeout",
    "max_queue",
    "default_capacity",
    "endpoints",
    "/work",
    "method",
    "capacity",
    "headers",
    "body",
    "probe_path",
    "probe_on_startup",
    "force_reprobe",
    "error_threshold",
    "latency_threshold_ms",
    "max_probe_concurrency",
    "probe_min_requests",
    "probe_growth",
    "fallback",
    "ui",
    "health_server",
    "upstream_admin",
    "on_error",
    "upstream_admin_allow",
    "client_body_timeout",
    "upstream_body_timeout",
    "upstream_max_idle",
    "upstream_idle_timeout",
    "http2",
    "client_header_timeout",
    "client_idle_timeout",
    "max_connections",
    "on_client_cancel",
    "client_cancel_hold_timeout",
    "lease_ttl",
    "ping_interval",
    "half_open",
    "one_in",
];

const VALID: &str = r#"
listen: 127.0.0.1:0
upstream_timeout: 30
storage: {type: memory}
upstreams:
  - {url: "http://127.0.0.1:9001", primary: true}
  - {url: "http://127.0.0.1:9002"}
routing_strategy: round-robin
health_check_interval: 1
eject_after: 5
endpoints:
  /work: {method: POST, capacity: 8, queue_timeout: 5}
"#;

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
            Just(1e300)
        ]
        .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        prop::sample::select(KEYS).prop_map(|k| Value::String(k.to_string())),
        prop::sample::select(
            &[
                "http://127.0.0.1:1",
                "http://[::1]:99999",
                "memory",
                "redis",
                "redis://127.0.0.1:1",
                "p2c",
                "first-healthy",
                "0.0.0.0:70000",
                "",
                "*",
                "/x/*"
            ][..]
        )
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Sequence),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                let mut m = Mapping::new();
                for (k, v) in kv {
                    m.insert(Value::String(k.to_string()), v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

fn check(v: &Value) {
    let text = serde_yaml_ng::to_string(v).expect("a Value serializes");
    // Ok or Err; a panic fails the property.
    let _ = GatewayConfig::from_yaml(&text, Path::new("prop.yaml"));
}

/// Replaces the value at a random path of `v` (chosen by `path`) with `new`.
fn mutate(v: &mut Value, path: &[prop::sample::Index], new: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = new;
        return;
    };
    let child = match v {
        Value::Mapping(m) if !m.is_empty() => {
            let i = first.index(m.len());
            m.values_mut().nth(i)
        }
        Value::Sequence(s) if !s.is_empty() => {
            let i = first.index(s.len());
            s.get_mut(i)
        }
        _ => None,
    };
    match child {
        Some(c) if !rest.is_empty() => mutate(c, rest, new),
        Some(c) => *c = new,
        None => *v = new,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_yaml_trees_never_panic(v in value()) {
        check(&v);
    }

    #[test]
    fn mutated_valid_configs_never_panic(
        mutations in prop::collection::vec(
            (prop::collection::vec(any::<prop::sample::Index>(), 1..4), value()),
            1..4,
        )
    ) {
        let mut v: Value = serde_yaml_ng::from_str(VALID).unwrap();
        for (path, new) in mutations {
            mutate(&mut v, &path, new);
        }
        check(&v);
    }
}

#[test]
fn the_unmutated_config_is_valid() {
    GatewayConfig::from_yaml(VALID, Path::new("prop.yaml")).unwrap();
}
