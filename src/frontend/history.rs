//! History `created_by` texts, written as dockerd 20.10's BuildKit writes them. Those texts
//! are Go's `fmt` renderings of the values (`%q` of a string slice, `%v` of a map or a
//! struct), so this module renders values the way Go's `fmt` and `strconv` do.

use crate::syntax::quote::go_quote;

/// Go's `strconv.QuoteRune`, as `%q` renders an integer.
fn go_quote_rune(n: u64) -> String {
    let c = u32::try_from(n)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('\u{FFFD}');
    let quoted = go_quote(&c.to_string());
    let inner = &quoted[1..quoted.len() - 1];
    let inner = match inner {
        "\\\"" => "\"".to_string(),
        "'" => "\\'".to_string(),
        other => other.to_string(),
    };
    format!("'{}'", inner)
}

/// `%q` of a string slice: `["a" "b"]`.
pub fn quoted_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| go_quote(s)).collect();
    format!("[{}]", inner.join(" "))
}

/// `%v` of a string slice: `[a b]`.
pub fn plain_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// `%v` of the set of ports one EXPOSE names: Go prints a map with its keys sorted.
pub fn port_map(ports: &[String]) -> String {
    let mut keys: Vec<&String> = ports.iter().collect();
    keys.sort();
    keys.dedup();
    let inner: Vec<String> = keys.iter().map(|p| format!("{}:{{}}", p)).collect();
    format!("map[{}]", inner.join(" "))
}

/// Go's `time.Duration.String` for a count of nanoseconds.
pub fn go_duration(nanos: u64) -> String {
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (unit, scale) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{}", decimal(nanos, scale), unit);
    }
    let mut out = String::new();
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let rest = nanos % 60_000_000_000;
    if hours > 0 {
        out.push_str(&format!("{}h", hours));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{}m", minutes));
    }
    out.push_str(&format!("{}s", decimal(rest, 1_000_000_000)));
    out
}

/// `value / scale` with the fraction's trailing zeros dropped.
fn decimal(value: u64, scale: u64) -> String {
    let whole = value / scale;
    let frac = value % scale;
    if frac == 0 {
        return whole.to_string();
    }
    let width = scale.to_string().len() - 1;
    let digits = format!("{:0width$}", frac, width = width);
    format!("{}.{}", whole, digits.trim_end_matches('0'))
}

/// `HEALTHCHECK %q` of docker's HealthConfig pointer: `&{["CMD" "x"] "30s" "0s" "0s" '\x00'}`.
pub fn healthcheck(
    test: &[String],
    interval: u64,
    timeout: u64,
    start_period: u64,
    retries: u64,
) -> String {
    format!(
        "HEALTHCHECK &{{{} {} {} {} {}}}",
        quoted_list(test),
        go_quote(&go_duration(interval)),
        go_quote(&go_duration(timeout)),
        go_quote(&go_duration(start_period)),
        go_quote_rune(retries)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_go_does() {
        assert_eq!(quoted_list(&["x".into(), "y\"z".into()]), r#"["x" "y\"z"]"#);
        assert_eq!(go_quote_rune(3), r"'\x03'");
        assert_eq!(go_quote_rune(65), "'A'");
        assert_eq!(plain_list(&["/a".into(), "/b".into()]), "[/a /b]");
        assert_eq!(
            port_map(&["9000/tcp".into(), "10000/tcp".into(), "80/udp".into()]),
            "map[10000/tcp:{} 80/udp:{} 9000/tcp:{}]"
        );
        assert_eq!(go_duration(300_000_000_000), "5m0s");
        assert_eq!(go_duration(3_000_000_000), "3s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(500_000_000), "500ms");
        assert_eq!(
            healthcheck(
                &[
                    "CMD-SHELL".into(),
                    "curl -f http://localhost/ || exit 1".into()
                ],
                300_000_000_000,
                3_000_000_000,
                0,
                3
            ),
            r#"HEALTHCHECK &{["CMD-SHELL" "curl -f http://localhost/ || exit 1"] "5m0s" "3s" "0s" '\x03'}"#
        );
    }
}
