//! Parsing `wrk --latency` output.

/// One wrk run's numbers.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct WrkResult {
    /// Completed requests.
    pub(crate) requests: u64,
    /// Wall time of the run, seconds.
    pub(crate) seconds: f64,
    /// `Requests/sec`.
    pub(crate) rps: f64,
    /// Median latency, ms.
    pub(crate) p50_ms: f64,
    /// 99th percentile latency, ms.
    pub(crate) p99_ms: f64,
    /// Maximum latency, ms.
    pub(crate) max_ms: f64,
    /// Responses that were not 2xx/3xx.
    pub(crate) non_2xx: u64,
    /// Socket errors (connect + read + write + timeout).
    pub(crate) socket_errors: u64,
}

/// A wrk duration (`812.00us`, `1.23ms`, `2.00s`, `1.00m`, `1.00h`) in milliseconds.
pub(crate) fn parse_time_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(v * factor)
}

/// Parses wrk's stdout (run with `--latency`).
pub(crate) fn parse(out: &str) -> Result<WrkResult, String> {
    let mut r = WrkResult::default();
    let (mut have_rps, mut have_p50, mut have_p99, mut have_max, mut have_req) =
        (false, false, false, false, false);
    for line in out.lines() {
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        match f.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => {
                r.max_ms = parse_time_ms(max).ok_or_else(|| format!("bad max latency `{t}`"))?;
                have_max = true;
            }
            ["50%", v] => {
                r.p50_ms = parse_time_ms(v).ok_or_else(|| format!("bad p50 `{t}`"))?;
                have_p50 = true;
            }
            ["99%", v] => {
                r.p99_ms = parse_time_ms(v).ok_or_else(|| format!("bad p99 `{t}`"))?;
                have_p99 = true;
            }
            ["Requests/sec:", v] => {
                r.rps = v.parse().map_err(|_| format!("bad req/s `{t}`"))?;
                have_rps = true;
            }
            [n, "requests", "in", secs, ..] => {
                r.requests = n.parse().map_err(|_| format!("bad request count `{t}`"))?;
                r.seconds = parse_time_ms(secs.trim_end_matches(','))
                    .ok_or_else(|| format!("bad duration `{t}`"))?
                    / 1000.0;
                have_req = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                r.non_2xx = n.parse().map_err(|_| format!("bad non-2xx count `{t}`"))?;
            }
            _ if t.starts_with("Socket errors:") => {
                r.socket_errors = t
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if !(have_rps && have_p50 && have_p99 && have_max && have_req) {
        return Err(format!("incomplete wrk output:\n{out}"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 2s test @ http://127.0.0.1:40001/bench
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.62ms  513.24us  13.09ms   85.61%
    Req/Sec    19.89k     1.02k   21.86k    72.50%
  Latency Distribution
     50%    1.52ms
     75%    1.80ms
     90%    2.15ms
     99%    3.40ms
  79212 requests in 2.00s, 9.14MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  39580.61
Transfer/sec:      4.57MB
";

    #[test]
    fn parses_a_full_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 79212);
        assert!((r.seconds - 2.0).abs() < 1e-9);
        assert!((r.rps - 39580.61).abs() < 1e-6);
        assert!((r.p50_ms - 1.52).abs() < 1e-9);
        assert!((r.p99_ms - 3.40).abs() < 1e-9);
        assert!((r.max_ms - 13.09).abs() < 1e-9);
        assert_eq!(r.non_2xx, 3);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn units() {
        assert!((parse_time_ms("812.00us").unwrap() - 0.812).abs() < 1e-9);
        assert_eq!(parse_time_ms("2.00s"), Some(2000.0));
        assert_eq!(parse_time_ms("1.00m"), Some(60_000.0));
        assert_eq!(parse_time_ms("3.0xs"), None);
        assert_eq!(parse_time_ms("ms"), None);
    }

    #[test]
    fn incomplete_output_is_an_error() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
        let no_latency: String = SAMPLE
            .lines()
            .filter(|l| !l.contains("99%"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse(&no_latency).is_err());
    }
}
