//! `cargo xtask bench`, accuracy part: every shutdown scenario rehearsed several times by
//! `draingate rehearse`, each replaced pod's verdict held against what the clients saw.
//!
//! - false pass: the agent said `pass`, the clients saw a failure on that pod while it
//!   terminated;
//! - false fail: the agent said `fail` with errors, the clients saw none (a fail for connections
//!   still open at exit is the verdict's rule, docs/verdict.md, and is counted apart, as "cut at exit");
//! - count mismatch: the agent's resets, refusals, unanswered connects (counted from the
//!   clients' side, through conntrack) and HTTP 5xx answers differ from the clients' failures.
//!
//! Appends a Markdown section to `--out` (draingate-bench writes the file first).
#![expect(
    clippy::cast_precision_loss,
    reason = "rates over counts far below 2^52"
)]

use std::{fmt::Write as _, path::PathBuf, process::Command, time::Instant};

use clap::Parser;
use draingate_tests::{build_bin, draingate_bin, require_root};
use serde_json::Value;

/// Rehearses every scenario several times and reports the agent's accuracy.
#[derive(Debug, Parser)]
struct Args {
    /// Runs per scenario.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Replicas per rehearsal.
    #[arg(long, default_value_t = 5)]
    replicas: u32,
    /// Requests per second.
    #[arg(long, default_value_t = 5000)]
    rate: u32,
    /// Append the Markdown section to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the scenarios whose name contains this text.
    #[arg(long)]
    only: Option<String>,
}

struct Scenario {
    name: &'static str,
    rehearse: &'static [&'static str],
    server: &'static [&'static str],
}

const SCENARIOS: [Scenario; 12] = [
    Scenario {
        name: "graceful drain, preStop 2s",
        rehearse: &["--pre-stop", "2s"],
        server: &["--mode", "graceful"],
    },
    Scenario {
        name: "abrupt exit, keep-alive clients",
        rehearse: &[],
        server: &["--mode", "abrupt"],
    },
    Scenario {
        name: "slow drain longer than the grace period",
        rehearse: &["--pre-stop", "1500ms", "--grace-period", "3s"],
        server: &["--mode", "slow", "--drain-time", "20s"],
    },
    Scenario {
        name: "no preStop: traffic after SIGTERM (new connection per request)",
        rehearse: &["--connections", "new-connection"],
        server: &["--mode", "graceful"],
    },
    Scenario {
        name: "new connection per request, preStop 2s",
        rehearse: &["--connections", "new-connection", "--pre-stop", "2s"],
        server: &["--mode", "graceful"],
    },
    Scenario {
        name: "ignores SIGTERM (SIGKILL at the grace period)",
        rehearse: &["--pre-stop", "1500ms", "--grace-period", "3s"],
        server: &["--mode", "ignore"],
    },
    Scenario {
        name: "app delays its own shutdown, no preStop",
        rehearse: &[],
        server: &["--mode", "late-close", "--drain-time", "2500ms"],
    },
    Scenario {
        name: "new pods without a readiness probe listen 2s late",
        rehearse: &[
            "--connections",
            "new-connection",
            "--pre-stop",
            "2s",
            "--no-readiness",
        ],
        server: &["--mode", "graceful", "--startup-delay", "2s"],
    },
    Scenario {
        name: "the same behind a readiness probe (probes refused)",
        rehearse: &[
            "--connections",
            "new-connection",
            "--pre-stop",
            "2s",
            "--readiness-path",
            "/",
            "--readiness-period",
            "200ms",
        ],
        server: &["--mode", "graceful", "--startup-delay", "2s"],
    },
    Scenario {
        name: "sandbox gone while the Service still sends to it (3 s propagation)",
        rehearse: &["--connections", "new-connection", "--propagation", "3s"],
        server: &["--mode", "abrupt"],
    },
    Scenario {
        name: "accept queue overflows (backlog 2, 10 accepts/s per pod)",
        rehearse: &["--connections", "new-connection", "--pre-stop", "2s"],
        server: &[
            "--mode",
            "graceful",
            "--backlog",
            "2",
            "--accept-pause",
            "100ms",
        ],
    },
    Scenario {
        name: "answers 503 for 2.5 s after SIGTERM, then drains (no preStop)",
        rehearse: &[],
        server: &[
            "--mode",
            "late-close",
            "--drain-time",
            "2500ms",
            "--status-after-term",
            "503",
        ],
    },
];

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    pods: u64,
    agent_pass: u64,
    agent_fail: u64,
    other: u64,
    false_pass: u64,
    false_fail: u64,
    cut_at_exit: u64,
    count_mismatch: u64,
    client_failures: u64,
    agent_errors: u64,
    /// Client failures on connections the exit closed without a reset.
    cut_requests: u64,
    requests: u64,
    seconds: f64,
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn rehearse(args: &Args, scenario: &Scenario) -> Value {
    let out = std::env::temp_dir().join(format!("draingate-accuracy-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let status = Command::new(draingate_bin())
        .arg("rehearse")
        .args(["--replicas", &args.replicas.to_string()])
        .args(["--rate", &args.rate.to_string(), "--clients", "64"])
        .args(scenario.rehearse)
        .arg("--report")
        .arg(&out)
        .args(["-o", "json", "--"])
        .arg(build_bin("draingate-test-server"))
        .args(scenario.server)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run draingate rehearse");
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|err| panic!("no report from draingate rehearse ({status}): {err}"));
    serde_json::from_str(&text).expect("a JSON report")
}

fn tally(report: &Value, t: &mut Tally) {
    t.requests += n(&report["clients"]["requests"]);
    t.seconds += report["clients"]["seconds"].as_f64().unwrap_or(0.0);
    for pod in report["pods"].as_array().into_iter().flatten() {
        // Resets and refusals the pod's kernel saw, connects that got no answer, which the
        // agent counts from the clients' side, and HTTP 5xx answers, read from its packets.
        let client_failures = n(&pod["client_connection_errors"])
            + n(&pod["client_no_answer"])
            + n(&pod["client_http_5xx"]);
        let agent_errors = n(&pod["agent_connection_errors"])
            + n(&pod["agent_no_answer"])
            + n(&pod["agent_http_5xx"]);
        t.client_failures += client_failures;
        let cut = n(&pod["cut_at_exit"]);
        t.agent_errors += agent_errors;
        t.cut_requests += cut;
        if agent_errors + cut != client_failures {
            t.count_mismatch += 1;
        }
        let agent = &pod["agent"];
        // A replaced pod is judged on its termination window; a new one on its startup errors,
        // which fail the rollout just the same.
        let (clients_failed, verdict) = if pod["role"] == "old" {
            (
                n(&pod["client_failures_terminating"]) > 0,
                agent["verdict"].as_str(),
            )
        } else {
            let verdict = if n(&agent["startup_errors"]) > 0 {
                "fail"
            } else {
                "pass"
            };
            (client_failures > 0, Some(verdict))
        };
        t.pods += 1;
        match verdict {
            Some("pass") => {
                t.agent_pass += 1;
                if clients_failed {
                    t.false_pass += 1;
                }
            }
            Some("fail") => {
                t.agent_fail += 1;
                if !clients_failed {
                    if n(&agent["errors"]) == 0 && n(&agent["open_at_exit"]) > 0 {
                        t.cut_at_exit += 1;
                    } else {
                        t.false_fail += 1;
                    }
                }
            }
            _ => t.other += 1,
        }
    }
}

fn main() {
    require_root();
    let args = Args::parse();
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n## Verdict accuracy (rehearsals)\n\nReproduce: `sudo -E cargo xtask bench` \
         (`draingate-accuracy --runs {} --replicas {} --rate {}`)\n",
        args.runs, args.replicas, args.rate
    );
    let _ = writeln!(
        report,
        "Each scenario is a whole rolling update of {} replicas of the test server at {} req/s \
         (64 keep-alive or new-connection clients, endpoint propagation 1 s), run {} times. \
         Per pod: the agent's verdict against the clients' ground truth; a replaced pod's is its \
         termination verdict (a failure on a connection to it after its deletion began), a new \
         pod's is fail when the agent counted startup errors (a failure on a connection to it).\n",
        args.replicas, args.rate, args.runs
    );
    let _ = writeln!(
        report,
        "| scenario | pods | agent pass / fail | false pass | false fail | cut at exit | pods with count mismatch | client failures = agent errors (+ requests cut at exit) | req/s |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|");
    let mut total = Tally::default();
    for scenario in SCENARIOS.iter().filter(|s| {
        args.only
            .as_ref()
            .is_none_or(|only| s.name.contains(only.as_str()))
    }) {
        let mut t = Tally::default();
        for run in 0..args.runs {
            eprintln!(
                "accuracy: {} (run {} of {})",
                scenario.name,
                run + 1,
                args.runs
            );
            tally(&rehearse(&args, scenario), &mut t);
        }
        let _ = writeln!(
            report,
            "| {} | {} | {} / {}{} | {} | {} | {} | {} | {} = {}{} | {:.0} |",
            scenario.name,
            t.pods,
            t.agent_pass,
            t.agent_fail,
            if t.other > 0 {
                format!(" ({} other)", t.other)
            } else {
                String::new()
            },
            t.false_pass,
            t.false_fail,
            t.cut_at_exit,
            t.count_mismatch,
            t.client_failures,
            t.agent_errors,
            if t.cut_requests > 0 {
                format!(" + {}", t.cut_requests)
            } else {
                String::new()
            },
            t.requests as f64 / t.seconds.max(1e-9)
        );
        for (a, b) in [
            (&mut total.pods, t.pods),
            (&mut total.agent_pass, t.agent_pass),
            (&mut total.agent_fail, t.agent_fail),
            (&mut total.other, t.other),
            (&mut total.false_pass, t.false_pass),
            (&mut total.false_fail, t.false_fail),
            (&mut total.cut_at_exit, t.cut_at_exit),
            (&mut total.count_mismatch, t.count_mismatch),
            (&mut total.client_failures, t.client_failures),
            (&mut total.agent_errors, t.agent_errors),
            (&mut total.cut_requests, t.cut_requests),
        ] {
            *a += b;
        }
    }
    let _ = writeln!(
        report,
        "| **all** | {} | {} / {} | **{}** | **{}** | {} | **{}** | {} = {} + {} | |",
        total.pods,
        total.agent_pass,
        total.agent_fail,
        total.false_pass,
        total.false_fail,
        total.cut_at_exit,
        total.count_mismatch,
        total.client_failures,
        total.agent_errors,
        total.cut_requests
    );
    let _ = writeln!(
        report,
        "\nTargets: zero false passes, zero false fails. \"Cut at exit\": the agent failed the pod \
         because connections were still open when its last process exited (SIGKILL), while the \
         clients on them happened to be idle; the verdict (docs/verdict.md) counts that as fail. \
         \"Requests cut at exit\": client failures explained only by connections open at the \
         exit (requests the process had read and died before answering, which the kernel closes \
         with a FIN); the agent counts those it followed as requests_cut, among its errors, so \
         this is what it missed. Took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    if let Some(out) = &args.out {
        draingate_tests::write_section(out, "Verdict accuracy (rehearsals)", &report);
    }
}
