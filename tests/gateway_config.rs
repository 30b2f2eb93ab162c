//! The example binary's config handling: `--check`, and exit status 2 with a message naming
//! the file and the field for every kind of bad config. No panic, no backtrace.

mod support;

use std::process::Command;

fn run_with(yaml: Option<&str>, extra: &[&str]) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("portcullis-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("cfg-{}.yml", rand::random::<u64>()));
    if let Some(y) = yaml {
        std::fs::write(&path, y).unwrap();
    }
    let out = Command::new(support::gateway_binary())
        .arg("--config")
        .arg(&path)
        .args(extra)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "panic for {yaml:?}: {text}");
    assert!(
        !text.contains("stack backtrace"),
        "backtrace for {yaml:?}: {text}"
    );
    (
        out.status.code().unwrap_or(-1),
        text.replace(&path.display().to_string(), "FILE"),
    )
}

#[test]
fn valid_config_checks_ok() {
    let (code, text) = run_with(
        Some("upstreams:\n  - {url: http://127.0.0.1:9001, primary: true}\n  - {url: http://127.0.0.1:9002}\nendpoints:\n  /work: {method: POST, capacity: 8, queue_timeout: 5}\n"),
        &["--check"],
    );
    assert_eq!(code, 0, "{text}");
}

#[test]
fn bad_configs_exit_2_naming_file_and_field() {
    let cases: &[(Option<&str>, &str)] = &[
        (None, "cannot read"),
        (Some("listen: [1, 2\n"), "line"),
        (Some("upstreams: []\nnot_a_field: 3\n"), "`not_a_field`"),
        (Some("upstream_timeout: soon\n"), "`upstream_timeout`"),
        (Some("failure_threshold: -2\n"), "`failure_threshold`"),
        (
            Some("upstreams:\n  - {url: \"::nope::\"}\n"),
            "`upstreams[0].url`",
        ),
        (
            Some("upstreams:\n  - {url: http://127.0.0.1:1}\n  - {url: http://127.0.0.1:1}\n"),
            "duplicate upstream",
        ),
        (
            Some("endpoints:\n  /work: {capacity: 0}\n"),
            "`endpoints./work.capacity`",
        ),
        (
            Some("endpoints:\n  /work: {capacity: -1}\n"),
            "`endpoints./work.capacity`",
        ),
        (
            Some("endpoints:\n  /a*b: {capacity: 1}\n"),
            "`endpoints./a*b`",
        ),
        (
            Some("probe_on_startup: true\nendpoints:\n  /v1/*: {}\n"),
            "`endpoints./v1/*.probe_path`",
        ),
        (Some("fallback: {url: \"ftp://x\"}\n"), "`fallback.url`"),
        (Some("storage: {type: redis}\n"), "`storage.url`"),
        (
            Some("health_check_interval: 0\n"),
            "`health_check_interval`",
        ),
        (Some("health_check_timeout: -1\n"), "`health_check_timeout`"),
        (Some("queue_timeout: 0\n"), "`queue_timeout`"),
        (
            Some("storage: {type: redis, url: http://x}\n"),
            "`storage.url`",
        ),
        (Some("routing_strategy: random\n"), "`routing_strategy`"),
        (Some("strategy: random\n"), "`strategy`"),
        (
            Some("strategy: p2c\nrouting_strategy: weighted\n"),
            "`strategy`",
        ),
        (
            Some("ui_password: a\nui: {password: b}\n"),
            "`ui_password`",
        ),
        (
            Some("ui_username: a\nui: {username: b}\n"),
            "`ui_username`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://127.0.0.1:1\", weight: 0}\n"),
            "`upstreams[0].weight`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://127.0.0.1:1\", weight: -1}\n"),
            "`upstreams[0].weight`",
        ),
        (Some("storage: redis\n"), "`storage`"),
        (Some("storage: \"http://:pw@h:1\"\n"), "`storage`"),
        (Some("storage: \"redis://:pw@h:99999\"\n"), "`storage.url`"),
        (Some("listen: ${GW_CONFIG_TEST_UNSET}\n"), "GW_CONFIG_TEST_UNSET"),
        (
            Some("grpc_failure_codes: [UNAVAILABLE, PERMISION_DENIED]\n"),
            "`grpc_failure_codes`",
        ),
        (
            Some("health_check: {kind: grpc, servce: pkg.Svc}\n"),
            "`health_check.servce`",
        ),
        (
            Some("max_probe_concurrency: 1000000000\n"),
            "`max_probe_concurrency`",
        ),
        (
            Some("storage: {type: redis, url: \"redis://127.0.0.1:1\", tls_ca_file: /etc/passwd}\n"),
            "`storage.tls_ca_file`",
        ),
        (
            Some("storage: {type: redis, url: \"rediss://127.0.0.1:1\", tls_ca_file: /nonexistent/ca.pem}\n"),
            "`storage.tls_ca_file`",
        ),
        (
            Some("storage: {type: redis, url: \"rediss://127.0.0.1:1\", tls_cert_file: /etc/passwd}\n"),
            "`storage.tls_cert_file`",
        ),
        (Some("workers: 5000\n"), "`workers`"),
        (
            Some("health_check_interval: 0.001\n"),
            "`health_check_interval`",
        ),
        (
            Some("health_check_interval: 1\nhealth_check_jitter: 2\n"),
            "`health_check_jitter`",
        ),
        (
            Some("storage: {ping_interval: 0.001}\n"),
            "`storage.ping_interval`",
        ),
        (Some("upstream_admin: true\n"), "`upstream_admin`"),
        (
            Some("upstream_admin_allow: [10.0.0.0/8, 10.0.0.0/99]\n"),
            "`upstream_admin_allow[1]`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://127.0.0.1:99999\"}\n"),
            "`upstreams[0].url`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://user:pw@127.0.0.1:1\"}\n"),
            "`upstreams[0].url`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://HOST:1\"}\n"),
            "`upstreams[0].url`",
        ),
        (
            Some("upstreams:\n  - {url: \"https://127.0.0.1:1\"}\nhealth_check: {kind: grpc}\n"),
            "`upstreams[0].url`",
        ),
        (
            Some("upstreams:\n  - {url: \"https://127.0.0.1:1\"}\nhttp2: true\n"),
            "`http2`",
        ),
        (Some("http2: sometimes\n"), "`http2`"),
        (Some("admin: {listen: nowhere}\n"), "`admin.listen`"),
        (Some("log_level: \"info,portcullis=loud\"\n"), "`log_level`"),
        (
            Some("fallback: {failure_threshold: 2}\nadmin: {listen: \"0.0.0.0:9901\"}\n"),
            "`admin.listen`",
        ),
        (
            Some("tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}\n"),
            "`tls.cert_file`",
        ),
        (
            Some("upstream_tls: {ca_file: /nonexistent/ca.pem}\n"),
            "`upstream_tls.ca_file`",
        ),
        (Some("retry: {max_attempts: 0}\n"), "`retry.max_attempts`"),
        (Some("retry: {budget_percent: -5}\n"), "`retry.budget_percent`"),
        (
            Some("retry: {min_retries_per_second: .inf}\n"),
            "`retry.min_retries_per_second`",
        ),
        (Some("retry: {on: [5xx, 4xx]}\n"), "`retry.on[1]`"),
        (Some("retry: {buffer_limit: -1}\n"), "`retry.buffer_limit`"),
        (
            Some("upstreams:\n  - {url: \"http://127.0.0.1:1\"}\npools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\nroutes:\n  - {prefix: /v1/chat/, pool: gpu}\n  - {prefix: /v1/embed, pool: tpu}\n"),
            "`routes[1].pool`",
        ),
        (
            Some("upstreams:\n  - {url: \"http://127.0.0.1:1\"}\npools:\n  default:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\n"),
            "`pools.default`",
        ),
        (
            Some("pools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\n    routing_strategy: fastest\n"),
            "`pools.gpu.routing_strategy`",
        ),
        (
            Some("pools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\n    eject_for: 0\n"),
            "`pools.gpu.eject_for`",
        ),
        (
            Some("pools:\n  gpu:\n    upstreams: [{url: \"http://127.0.0.1:2\"}]\n    fallback: {url: \"ftp://x\"}\n"),
            "`pools.gpu.fallback.url`",
        ),
        (Some("pools:\n  gpu: {upstreams: []}\n"), "`pools.gpu.upstreams`"),
        (
            Some("routes:\n  - {path: /a, pool: default, strip_prefix: true}\n"),
            "`routes[0].strip_prefix`",
        ),
    ];
    let long_host = format!("http://{}:1", "a".repeat(300));
    let cases: Vec<(Option<String>, &str)> = cases
        .iter()
        .map(|(y, n)| {
            let y = y.map(|y| y.replace("HOST", &long_host["http://".len()..long_host.len() - 2]));
            (y, *n)
        })
        .collect();
    for (yaml, needle) in &cases {
        let yaml = yaml.as_deref();
        let (code, text) = run_with(yaml, &["--check"]);
        assert_eq!(code, 2, "{yaml:?}: {text}");
        assert!(
            text.contains("FILE"),
            "{yaml:?} does not name the file: {text}"
        );
        assert!(
            text.contains(needle),
            "{yaml:?} should mention {needle}: {text}"
        );
    }
    // Without --check too: the gateway refuses to start.
    let (code, text) = run_with(Some("bogus: true\n"), &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("line 1"), "{text}");
}

/// `--check` refuses what `Gateway::build` would: a config that parses but has no upstream to
/// serve (an empty file is one) exits 2 naming `upstreams`, with or without `--check`.
#[test]
fn configs_without_upstreams_exit_2_naming_upstreams() {
    for yaml in [
        "",
        "\n# only a comment line, no keys\n\n",
        "listen: 127.0.0.1:0\n",
        "upstreams: []\nendpoints:\n  /work: {capacity: 2}\n",
    ] {
        for extra in [&["--check"][..], &[][..]] {
            let (code, text) = run_with(Some(yaml), extra);
            assert_eq!(code, 2, "{yaml:?} {extra:?}: {text}");
            assert!(text.contains("FILE"), "{yaml:?} {extra:?}: {text}");
            assert!(
                text.contains("field `upstreams`"),
                "{yaml:?} {extra:?}: {text}"
            );
            assert!(!text.contains("config OK"), "{yaml:?} {extra:?}: {text}");
        }
    }
}

/// The crates' sections read from the same flat mapping: a balance, admission and probe
/// field refused by its own crate is named by its path from the top, with its line.
#[test]
fn section_fields_are_named_with_their_line() {
    let cases = [
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\neject_for: 0\n",
            "line 3",
            "`eject_for`",
        ),
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nendpoints:\n  /a: {}\n  /b: {queue_timeout: -1}\n",
            "line 5",
            "`endpoints./b.queue_timeout`",
        ),
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\n  - {url: http://127.0.0.1:2, weight: 0}\n",
            "line 3",
            "`upstreams[1].weight`",
        ),
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nerror_threshold: 2\n",
            "line 3",
            "`error_threshold`",
        ),
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nfallback:\n  half_open: {one_in: 0}\n",
            "line 4",
            "`fallback.half_open.one_in`",
        ),
        // The adaptive bounds hold the initial capacity: `--check` refuses it outside them.
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nendpoints:\n  /w: {capacity: 50}\nadaptive:\n  max_capacity: 20\n",
            "line 4",
            "`endpoints./w.capacity`",
        ),
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nendpoints:\n  /w:\n    adaptive: {window: 0}\n",
            "line 5",
            "`endpoints./w.adaptive.window`",
        ),
        // A Redis URL that RedisStorage::connect could not parse is refused by --check too.
        (
            "upstreams:\n  - {url: http://127.0.0.1:1}\nstorage: {type: redis, url: \"redis://:pw@127.0.0.1:99999\"}\n",
            "line 3",
            "`storage.url`",
        ),
    ];
    for (yaml, line, field) in cases {
        let (code, text) = run_with(Some(yaml), &["--check"]);
        assert_eq!(code, 2, "{yaml:?}: {text}");
        assert!(text.contains(line), "{yaml:?} should say {line}: {text}");
        assert!(text.contains(field), "{yaml:?} should name {field}: {text}");
        assert!(!text.contains(":pw@"), "{yaml:?} shows a password: {text}");
    }
}

/// The file size and nesting limits: `/dev/zero` and an 80,000-deep file are refused at once
/// (exit 2), by `--check` and at startup alike.
#[test]
fn oversized_and_deep_configs_are_refused_fast() {
    for extra in [&["--check"][..], &[][..]] {
        let started = std::time::Instant::now();
        let out = Command::new(support::gateway_binary())
            .args(["--config", "/dev/zero"])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains("/dev/zero") && text.contains("16 MiB"),
            "{text}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));

        let deep = format!("listen: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
        let started = std::time::Instant::now();
        let (code, text) = run_with(Some(&deep), extra);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("nested more than 128"), "{text}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
