//! The Prometheus alerting rules in deploy/prometheus/: `promtool check rules`
//! accepts them, `promtool test rules` passes their unit tests (every alert
//! fires on its synthetic series and stays quiet in the healthy cases), every
//! alert has a test, and every metric they use is one turnd exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RULES: &str = "deploy/prometheus/turnd-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/turnd-rules.test.yaml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Runs promtool from the repository's top directory and asserts it succeeded,
/// showing everything it printed otherwise. Returns its standard output.
fn promtool_ok(args: &[&str]) -> String {
    let out: Output = match Command::new("promtool").args(args).current_dir(repo()).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("promtool is not installed: it comes with Debian's prometheus package (apt-get install prometheus; ./test.sh installs it)")
        }
        Err(e) => panic!("promtool {}: {e}", args.join(" ")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {} failed ({}):\n{stdout}\n{stderr}", args.join(" "), out.status);
    stdout
}

/// The names after `- alert:` in the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every `turnd_...` metric name in `text` (lowercase letters and underscores,
/// not part of a longer word).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("turnd_")
        .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(rest.len());
            rest[..end].to_owned()
        })
        .collect()
}

/// The Rust source of turnd's metrics (src/metrics/), concatenated.
fn metrics_source() -> String {
    fn walk(p: &Path, out: &mut String) {
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&repo().join("src/metrics"), &mut out);
    out
}

#[test]
fn promtool_accepts_the_rules() {
    let out = promtool_ok(&["check", "rules", RULES]);
    let n = alert_names(&read(RULES)).len();
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "promtool did not find the {n} alerts:\n{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let out = promtool_ok(&["test", "rules", RULE_TESTS]);
    assert!(out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

#[test]
fn every_alert_has_a_severity_and_a_unit_test() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let names = alert_names(&rules);
    for expected in [
        "TurndDown",
        "TurndNotReady",
        "TurndCertificateExpiringSoon",
        "TurndCertificateExpiring",
        "TurndAcmeRenewalFailing",
        "TurndRelayPortsNearlyExhausted",
        "TurndTlsHandshakeFailuresHigh",
        "TurndAuthFailuresHigh",
        "TurndStaleMediaDropsHigh",
    ] {
        assert!(names.iter().any(|n| n == expected), "{RULES} has no alert {expected}; it has {names:?}");
    }
    for name in &names {
        // Each alert is expected to fire (exp_alerts with its labels) in at
        // least one test, and promtool then checks its severity and annotations.
        let firing = tests.split(&format!("alertname: {name}\n")).skip(1).any(|after| {
            let case = after.split("alertname:").next().unwrap_or("");
            case.contains("exp_labels:") && (case.contains("severity: page") || case.contains("severity: warning"))
        });
        assert!(firing, "{RULE_TESTS} never expects {name} to fire with severity page or warning");
    }
    assert_eq!(rules.matches("severity: ").count(), names.len(), "every alert has exactly one severity label");
    assert_eq!(rules.matches("summary: ").count(), names.len(), "every alert has a summary");
    assert_eq!(rules.matches("description: ").count(), names.len(), "every alert has a description");
}

#[test]
fn rules_use_only_metrics_turnd_exports() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let source = metrics_source();
    let used = metric_names(&rules);
    assert!(used.len() >= 10, "too few metric names found in {RULES}: {used:?}");
    let exported = |n: &str| source.contains(&format!("\"{n}\""));
    let unknown: Vec<_> = used.union(&metric_names(&tests)).filter(|n| !exported(n)).cloned().collect();
    assert!(unknown.is_empty(), "{RULES} or its tests use metrics that src/metrics does not export: {unknown:?}");
}
