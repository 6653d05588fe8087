//! The in-process decision, no I/O: what one consume costs Tollgate's domain code
//! before and after the store. Per iteration: the windows of a meter (day 5 and
//! month 150 as seed 003, then with a rolling hour too) with their counter keys, the
//! all-or-nothing decision against the current counts, and the per-window answer;
//! then one GCRA rate-limit step. A plain timing loop (`harness = false`), no framework: run with
//! `cargo bench -p tollgate-core --bench decision`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tollgate_core::metering::window::Window;
use tollgate_core::metering::{self, UsageOp, WindowCheck, WindowState};
use tollgate_core::plans::WindowLimit;
use tollgate_core::ratelimit::{RateLimit, gcra};

const ROUNDS: usize = 5;
const PER_ROUND: u64 = 2_000_000;

fn main() {
    let anchor = Some(OffsetDateTime::now_utc() - time::Duration::days(40));
    let start = OffsetDateTime::now_utc();
    let day_and_month =
        [WindowLimit { window: Window::Day, limit: Some(5) }, WindowLimit { window: Window::Month, limit: Some(150) }];
    let with_rolling_hour = [
        WindowLimit { window: Window::Day, limit: Some(5) },
        WindowLimit { window: Window::Month, limit: Some(150) },
        WindowLimit { window: Window::Rolling { seconds: 3600 }, limit: Some(100) },
    ];
    for (name, limits) in [
        ("quota decision, day + month windows", &day_and_month[..]),
        ("quota decision, day + month + rolling hour (60 buckets)", &with_rolling_hour[..]),
    ] {
        report(name, |i| {
            let now = start + time::Duration::milliseconds(i as i64);
            let checks: Vec<WindowCheck> = limits.iter().map(|l| WindowCheck::for_limit(l, now, anchor)).collect();
            let used: Vec<i64> = (0..limits.len() as u64).map(|w| ((i + w) % 5) as i64).collect();
            let applied = metering::apply(UsageOp::Consume, &checks, &used, 1);
            let answer: Vec<WindowState> =
                checks.iter().zip(&applied.after).map(|(c, u)| WindowState::new(c, *u)).collect();
            black_box((applied.allowed, answer));
        });
    }

    let limit = RateLimit { requests: 300, window_seconds: 60 };
    let mut tat = None;
    report("rate-limit step (GCRA)", |i| {
        let decision = gcra(limit, tat, i as i128 * 1_000_000, 1);
        if decision.allowed {
            tat = Some(decision.new_tat);
        }
        black_box(decision);
    });
}

/// Runs `f` ROUNDS times PER_ROUND and prints the best round's rate (the least
/// disturbed by other work on the machine) and the median.
fn report(name: &str, mut f: impl FnMut(u64)) {
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..PER_ROUND {
                f(black_box(i));
            }
            started.elapsed()
        })
        .collect();
    rounds.sort();
    let rate = |d: Duration| PER_ROUND as f64 / d.as_secs_f64();
    println!(
        "{name}: best {:.2} M/s ({:.0} ns each), median {:.2} M/s",
        rate(rounds[0]) / 1e6,
        rounds[0].as_nanos() as f64 / PER_ROUND as f64,
        rate(rounds[ROUNDS / 2]) / 1e6
    );
}
