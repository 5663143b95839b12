//! `custos report`: the compliance report of a fixture history made through
//! the binary on a fake clock (`CUSTOS_NOW`, a test hook), so that forty
//! days of backups, drills, a rotation and a shred take seconds:
//!
//! - acme: created 40 days ago (its CMK never rotated: overdue under
//!   `cmk_max_age = "30d"`), a new epoch 20 days ago, daily backups with no
//!   backup 10 and 9 days ago (a 3-day gap), a passed drill, a drill whose
//!   verify command fails, a drill that misses its RTO, a full read-data
//!   check, and epoch 1 shredded yesterday;
//! - globex: three days old, everything on time.
//!
//! Each control's verdict is asserted from the JSON report, every record it
//! cites is checked against the audit log, and the HTML is checked to be
//! self-contained. `scripts/report-screenshot.sh` renders the same history.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::common::{Cli, Run};

const NOW: &str = "2026-03-31T12:00:00Z";

fn at(days_ago: i64) -> String {
    (DateTime::parse_from_rfc3339(NOW)
        .unwrap()
        .with_timezone(&Utc)
        - chrono::Duration::days(days_ago))
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

struct Fixture {
    cli: Cli,
}

const VERIFY_OK: &str = r#"["test", "-s", "{file:data/data.txt}"]"#;

impl Fixture {
    /// Runs custos as of `days_ago` days before [`NOW`].
    fn run(&self, days_ago: i64, args: &[&str]) -> Run {
        self.cli.run_env(args, &[("CUSTOS_NOW", &at(days_ago))])
    }

    fn ok(&self, days_ago: i64, args: &[&str]) -> Run {
        let r = self.run(days_ago, args);
        assert_eq!(r.code, 0, "custos {args:?}:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    fn policy(&self, tenant: &str, rto: &str, verify: &str) {
        let src = self.cli.path().join(format!("src-{tenant}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("data.txt"), format!("{tenant}\n")).unwrap();
        std::fs::write(
            self.cli.path().join(format!("policies/{tenant}.toml")),
            format!(
                "tenant = \"{tenant}\"\nkey = \"local:{tenant}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[retention]\nkeep_last = 30\n[drill]\nrto = \"{rto}\"\nverify_command = {verify}\n",
                src.display()
            ),
        )
        .unwrap();
    }

    /// The report as of [`NOW`].
    fn report(&self, args: &[&str]) -> Run {
        self.cli
            .run_env(&[&["report"], args].concat(), &[("CUSTOS_NOW", NOW)])
    }

    /// The audit log's records, by sequence number.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.cli.path().join("state/audit/log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn fixture() -> Fixture {
    let f = Fixture { cli: Cli::new() };
    let toml = f.cli.path().join("custos.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str("[controls]\ncmk_max_age = \"30d\"\n");
    std::fs::write(&toml, config).unwrap();
    f.policy("acme", "10m", VERIFY_OK);
    f.policy("globex", "10m", VERIFY_OK);
    f.ok(40, &["backup", "acme"]);
    f.ok(20, &["rotate", "acme", "--new-epoch"]);
    for day in [16, 15, 14, 13, 12, 11, 8, 7, 6, 5, 4, 3, 2, 1] {
        f.ok(day, &["backup", "acme"]);
        match day {
            13 => {
                f.ok(13, &["drill", "acme"]);
            }
            6 => {
                f.policy("acme", "10m", r#"["false"]"#);
                assert_eq!(f.run(6, &["drill", "acme"]).code, 1);
                f.policy("acme", "10m", VERIFY_OK);
            }
            3 => {
                f.ok(3, &["check", "acme", "--read-data"]);
                f.ok(3, &["backup", "globex"]);
            }
            2 => {
                f.policy("acme", "1ms", VERIFY_OK);
                assert_eq!(f.run(2, &["drill", "acme"]).code, 1);
                f.policy("acme", "10m", VERIFY_OK);
                f.ok(2, &["backup", "globex"]);
            }
            1 => {
                f.ok(1, &["forget", "acme", "--keep-last", "5", "--prune"]);
                f.ok(
                    1,
                    &[
                        "shred",
                        "acme",
                        "--confirm",
                        "acme",
                        "--epoch",
                        "1",
                        "--reason",
                        "epoch 1 expired",
                    ],
                );
                f.ok(1, &["backup", "globex"]);
                f.ok(1, &["drill", "globex"]);
                f.ok(1, &["check", "globex", "--read-data"]);
            }
            _ => {}
        }
    }
    f
}

fn tenant<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == name)
        .unwrap_or_else(|| panic!("no tenant {name} in {report}"))
}

fn verdict<'a>(t: &'a Value, id: &str) -> &'a str {
    let c = t["controls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no control {id} in {t}"));
    c["verdict"].as_str().unwrap()
}

/// Every `seq`, `*_seq` and `evidence` number anywhere in `v`.
fn cited(v: &Value, out: &mut Vec<u64>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    (k, Value::Number(n)) if k == "seq" || k.ends_with("_seq") => {
                        out.push(n.as_u64().unwrap())
                    }
                    ("evidence", Value::Array(a)) => {
                        out.extend(a.iter().map(|n| n.as_u64().unwrap()))
                    }
                    _ => cited(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| cited(x, out)),
        _ => {}
    }
}

#[test]
fn each_control_of_a_fixture_history_gets_its_verdict() {
    let f = fixture();
    let r = f.report(&["--format", "json", "--since", "30d"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let report = r.json();
    assert_eq!(report["format"], "custos-compliance-report/1");
    // The fake clock runs on from NOW while a command runs.
    let minute = |v: &Value| v.as_str().unwrap()[..16].to_owned();
    assert_eq!(minute(&report["generated_at"]), "2026-03-31T12:00");
    assert_eq!(minute(&report["period"]["since"]), "2026-03-01T12:00");
    assert_eq!(report["controls"]["cmk_max_age_seconds"], 30.0 * 86_400.0);
    assert_eq!(report["controls"]["backup_max_gap_seconds"], 26.0 * 3_600.0);

    let acme = tenant(&report, "acme");
    let expect = [
        ("backup.rpo", "fail"),
        ("backup.success_rate", "pass"),
        ("drill.frequency", "pass"),
        ("drill.passed", "fail"),
        ("drill.rto", "fail"),
        ("keys.cmk_age", "fail"),
        ("keys.epoch_age", "pass"),
        ("deletion.certified", "pass"),
        ("integrity.read_data", "pass"),
    ];
    for (id, want) in expect {
        assert_eq!(verdict(acme, id), want, "acme {id}: {acme:#}");
    }
    assert_eq!(acme["verdict"], "fail");
    let globex = tenant(&report, "globex");
    for (id, _) in expect {
        let want = if id == "deletion.certified" {
            "not_applicable"
        } else {
            "pass"
        };
        assert_eq!(verdict(globex, id), want, "globex {id}: {globex:#}");
    }
    assert_eq!(globex["verdict"], "pass");
    assert_eq!(report["summary"]["verdict"], "fail");
    assert_eq!(report["summary"]["failed"], 4);

    // The figures behind the verdicts.
    let records = f.records();
    let record = |seq: &Value| &records[seq.as_u64().unwrap() as usize];
    let gaps = acme["backups"]["gaps"].as_array().unwrap();
    let three_days = gaps
        .iter()
        .find(|g| (g["seconds"].as_f64().unwrap() - 3.0 * 86_400.0).abs() < 60.0)
        .unwrap_or_else(|| panic!("no 3-day gap in {gaps:#?}"));
    assert_eq!(minute(&three_days["from"]), at(11)[..16]);
    assert_eq!(minute(&three_days["until"]), at(8)[..16]);
    assert_eq!(record(&three_days["until_seq"])["event"], "backup.end");
    let drills = acme["drills"]["drills"].as_array().unwrap();
    let outcomes: Vec<(&str, Option<&str>)> = drills
        .iter()
        .map(|d| (d["outcome"].as_str().unwrap(), d["reason"].as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("passed", None),
            ("failed", Some("verify_command_failed")),
            ("failed", Some("rto_exceeded"))
        ]
    );
    assert_eq!(drills[1]["verify_command"]["passed"], false);
    assert_eq!(drills[1]["verify_command"]["exit_code"], 1);
    assert_eq!(drills[2]["rto_met"], false);
    assert_eq!(drills[2]["rto_seconds"], 0.001);
    assert!(drills[2]["restore_seconds"].as_f64().unwrap() > 0.001);
    assert_eq!(
        record(&drills[1]["seq"])["details"]["error_kind"],
        "verify_command_failed"
    );
    let cmk = &acme["keys"]["cmk"];
    assert_eq!(cmk["key"], "local:acme");
    assert_eq!(cmk["by"], "created");
    assert_eq!(record(&cmk["since_seq"])["event"], "tenant.init");
    assert!(cmk["age_days"].as_f64().unwrap() >= 39.9, "{cmk}");
    let epochs: Vec<(u64, &str)> = acme["keys"]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["epoch"].as_u64().unwrap(), e["state"].as_str().unwrap()))
        .collect();
    assert_eq!(epochs, [(1, "shredded"), (2, "current")]);
    assert_eq!(acme["keys"]["rotations"][0]["action"], "new_epoch");
    assert_eq!(acme["keys"]["keys"][0]["state"], "enabled");
    let deletions = acme["deletions"].as_array().unwrap();
    assert_eq!(deletions.len(), 1);
    assert_eq!(deletions[0]["subject"], "epoch");
    assert_eq!(deletions[0]["epoch"], 1);
    assert_eq!(deletions[0]["verified"], true);
    assert_eq!(deletions[0]["certificate_status"], "valid");
    assert_eq!(deletions[0]["reason"], "epoch 1 expired");
    assert_eq!(acme["integrity"]["read_data_complete"]["reads"][0], "all");

    // Every cited record exists, is covered by the checkpoint the report
    // names, and is the tenant's.
    let audit = &report["audit"];
    assert_eq!(audit["verification"]["ok"], true, "{audit:#}");
    let size = audit["checkpoint"]["size"].as_u64().unwrap();
    assert_eq!(size, records.len() as u64);
    assert!(
        audit["checkpoint"]["text"]
            .as_str()
            .unwrap()
            .contains(&format!("\n{size}\n"))
    );
    for (t, name) in [(acme, "acme"), (globex, "globex")] {
        let mut seqs = Vec::new();
        cited(t, &mut seqs);
        assert!(seqs.len() > 20, "{name}: {seqs:?}");
        for seq in seqs {
            assert!(
                seq < size,
                "{name} cites record {seq}, beyond the checkpoint"
            );
            assert_eq!(records[seq as usize]["seq"], seq);
            assert_eq!(records[seq as usize]["tenant"], name, "record {seq}");
        }
    }

    // One tenant, the other formats.
    let only = f.report(&["--format", "json", "--tenant", "globex"]).json();
    assert_eq!(only["tenants"].as_array().unwrap().len(), 1);
    let out = f.cli.path().join("report.html");
    let r = f.report(&["--format", "html", "--output", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("report written to"), "{}", r.stderr);
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in ["<script", "http://", "https://", "<link", "@import", "url("] {
        assert!(!html.contains(forbidden), "the HTML holds {forbidden:?}");
    }
    for wanted in [
        "<svg",
        "@media print",
        "Tenant acme",
        "Tenant globex",
        "rto_exceeded",
    ] {
        assert!(html.contains(wanted), "the HTML lacks {wanted:?}");
    }
    let md = f.report(&["--format", "md"]);
    assert_eq!(md.code, 0, "{}", md.stderr);
    assert!(
        md.stdout
            .contains("| Control | Verdict | Finding | Records |")
    );
    assert!(md.stdout.contains("## Tenant acme: FAIL"), "{}", md.stdout);

    // A record edited to hide the failed drill: the report is still made,
    // says the log did not verify, and exits 1.
    let log = f.cli.path().join("state/audit/log.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let failed = format!("\"seq\":{},", drills[1]["seq"]);
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains(&failed) {
                l.replace("\"outcome\":\"failure\"", "\"outcome\":\"success\"")
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(&log, edited.join("\n") + "\n").unwrap();
    let r = f.report(&["--format", "json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let tampered = r.json();
    assert_eq!(tampered["summary"]["audit_verified"], false);
    assert_eq!(tampered["summary"]["verdict"], "fail");
    assert_eq!(tampered["audit"]["verification"]["ok"], false);
    assert!(r.stderr.contains("did not verify"), "{}", r.stderr);
}

#[test]
fn bad_input_is_refused_naming_the_problem() {
    let f = Fixture { cli: Cli::new() };
    f.policy("acme", "10m", VERIFY_OK);
    f.ok(1, &["backup", "acme"]);

    let r = f.report(&["--format", "json", "--since", "banana"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--since \"banana\""), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    let r = f.report(&["--format", "html", "--since", "2027-01-01T00:00:00Z"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("after now"), "{}", r.stderr);

    let r = f.report(&["--format", "html", "--tenant", "nobody"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--tenant nobody: no audit record names tenant nobody"),
        "{}",
        r.stderr
    );
    let r = f.report(&["--format", "json", "--tenant", "nobody"]);
    assert_eq!(r.json()["error"]["kind"], "invalid_argument");

    let r = f.report(&["--format", "html", "--tenant", "Not/A/Tenant"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--tenant"), "{}", r.stderr);

    let r = f.report(&["--format", "pdf"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("expected html, json or md"),
        "{}",
        r.stderr
    );

    // Under a regular file: no directory to write into (root writes anywhere else).
    let file = f.cli.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("report.html");
    let r = f.report(&["--format", "html", "--output", out.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("--output {}", out.display())),
        "{}",
        r.stderr
    );
    let dir = f.cli.path().join("policies");
    let r = f.report(&["--format", "html", "--output", dir.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is a directory"), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    // A threshold that is not one: the configuration error names the key.
    let toml = f.cli.path().join("custos.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str("[controls]\nbackup_max_gap = \"soon\"\nbackup_min_success_rate = 2\n");
    std::fs::write(&toml, config).unwrap();
    let r = f.report(&["--format", "html"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("controls.backup_max_gap"), "{}", r.stderr);
    assert!(
        r.stderr.contains("controls.backup_min_success_rate"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_daemon_writes_the_report_on_its_schedule() {
    let f = Fixture { cli: Cli::new() };
    f.policy("acme", "10m", VERIFY_OK);
    f.ok(1, &["backup", "acme"]);
    let out = f.cli.path().join("compliance");
    let toml = f.cli.path().join("custos.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str(&format!(
        "[report]\nschedule = \"0 6 * * 1\"\noutput_dir = \"{}\"\nformats = [\"json\", \"md\"]\n",
        out.display()
    ));
    std::fs::write(&toml, config).unwrap();
    // Never ran: due at once; the policy schedules no job.
    let r = f
        .cli
        .run_env(&["daemon", "--once", "--json"], &[("CUSTOS_NOW", NOW)]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let summary = r.json();
    let run = &summary["result"]["report"];
    assert_eq!(run["outcome"], "success", "{summary:#}");
    let files: Vec<&str> = run["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let json = files.iter().find(|f| f.ends_with(".json")).unwrap();
    assert!(Path::new(json).starts_with(&out));
    let report: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    assert_eq!(report["format"], "custos-compliance-report/1");
    assert_eq!(tenant(&report, "acme")["verdict"], "fail", "no check yet");
    assert!(files.iter().any(|f| f.ends_with(".md")));
    // The slot ran: a second --once has nothing to do.
    let r = f
        .cli
        .run_env(&["daemon", "--once", "--json"], &[("CUSTOS_NOW", NOW)]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.json()["result"].get("report").is_none(), "{}", r.stdout);
}

#[test]
fn a_report_directory_other_users_may_write_is_refused() {
    let f = Fixture { cli: Cli::new() };
    f.policy("acme", "10m", VERIFY_OK);
    f.ok(1, &["backup", "acme"]);
    let out = f.cli.path().join("compliance");
    std::fs::create_dir(&out).unwrap();
    // Another user could plant or replace what the auditor is handed.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let toml = f.cli.path().join("custos.toml");
    let mut config = std::fs::read_to_string(&toml).unwrap();
    config.push_str(&format!(
        "[report]\nschedule = \"0 6 * * 1\"\noutput_dir = \"{}\"\n",
        out.display()
    ));
    std::fs::write(&toml, config).unwrap();
    let r = f
        .cli
        .run_env(&["daemon", "--once", "--json"], &[("CUSTOS_NOW", NOW)]);
    let run = r.json()["result"]["report"].clone();
    assert_eq!(run["outcome"], "failure", "{}", r.stdout);
    let detail = run["detail"].as_str().unwrap();
    assert!(detail.contains("report output directory"), "{detail}");
    assert!(detail.contains("chmod go-w"), "{detail}");
    assert!(crate::common::files_under(&out).is_empty());
}
